"""Image-folder targets: FOLDER/{train,test}/<class>/* read as a target named after the folder,
with its classes the subfolders and its images at the source's channels and size. Imported by
start (which registers the folders a command line names); it imports the template only."""

import dataclasses
import types
from pathlib import Path

import torch
from PIL import Image
from torchvision import transforms
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import find_classes

import transfer_mnist as tm


@dataclasses.dataclass(frozen=True)
class ImageFolderSplits:
    """An image folder read as the template reads torchvision's MNIST: called with the split, it
    returns its images as .data, uint8 (N, H, W, C) at `channels` (1: grey, 3: RGB) and `size`
    (height, width), the source's, and its class indices as .targets. Equal for the same folder
    and shape, so that --disjoint knows two targets on one folder read the same files."""

    folder: str
    channels: int
    size: tuple[int, int]

    def __call__(self, root, train, download):
        split = Path(self.folder, "train" if train else "test")
        # ImageFolder reads every image as RGB; uint8, normalised later like every other target
        grey = [transforms.Grayscale(1)] if self.channels == 1 else []
        to_tensor = transforms.Compose([*grey, transforms.Resize(self.size),
                                        transforms.PILToTensor()])
        try:
            dataset = ImageFolder(split, transform=to_tensor)
            images = torch.stack([image for image, _ in dataset]).permute(0, 2, 3, 1)
        # no images (FileNotFoundError), or one PIL cannot read
        except (OSError, ValueError) as err:
            reason = str(err).strip().splitlines()[0]
            raise tm.ExperimentError(f"image folder {split}: {reason}") from None
        labels = torch.tensor(dataset.targets)
        return types.SimpleNamespace(data=images.contiguous(), targets=labels)


def folder_shape(path):
    """The channels and size of an image folder's first training image: a source folder's own
    shape."""
    first = min(Path(path, "train").glob("*/*"), default=None)
    if first is None:
        raise tm.ExperimentError(f"image folder {path}/train has no images")
    try:
        with Image.open(first) as image:
            return (1 if image.mode in ("L", "1", "I", "F") else 3), (image.height, image.width)
    except OSError as err:
        raise tm.ExperimentError(
            f"image folder {path}: {first.name} cannot be read ({err})") from None


def folder_of(target):
    """The folder an image-folder target reads, None for any other."""
    return target.dataset.folder if isinstance(target.dataset, ImageFolderSplits) else None


def register_image_folder(path, channels, size):
    """Register FOLDER/{train,test}/<class>/* as a target named after the folder, its images read at
    `channels` and `size` (the source's); return its name. The class names come from the
    subfolders (sorted, as ImageFolder numbers them) and must be the same in train/ and test/."""
    root = Path(path)
    name = root.resolve().name
    layout = f"lay it out as {root}/train/<class>/*.png and {root}/test/<class>/*.png"
    classes = {}
    for split in ("train", "test"):
        if not (root / split).is_dir():
            raise tm.ExperimentError(f"image folder {root} has no {split}/ subfolder; {layout}")
        try:
            classes[split] = find_classes(root / split)[0]
        except FileNotFoundError:
            raise tm.ExperimentError(
                f"image folder {root / split} has no class subfolders; {layout}") from None
    if classes["train"] != classes["test"]:
        only = ", ".join(sorted(set(classes["train"]) ^ set(classes["test"])))
        raise tm.ExperimentError(
            f"image folder {root}: train/ and test/ have different classes ({only})")
    if name in tm.TARGETS and folder_of(tm.TARGETS[name]) is None:
        raise tm.ExperimentError(
            f"image folder {root} is named like the registered target {name}; rename the folder")
    tm.TARGETS[name] = tm.Target(ImageFolderSplits(str(root), channels, tuple(size)),
                                 tuple(classes["train"]))
    tm.read_split.cache_clear()  # a folder registered anew under a name read before
    return name
