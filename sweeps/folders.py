"""Image-folder targets: FOLDER/{train,test}/<class>/* read as a target named after the folder, with its
classes the subfolders. Imported by start (which registers the folders a command line names); it imports
the template only."""

import dataclasses
import types
from pathlib import Path

import torch
import torchvision

import transfer_mnist as tm

TO_MNIST = torchvision.transforms.Compose([
    torchvision.transforms.Grayscale(num_output_channels=1),  # the backbone takes one channel
    torchvision.transforms.Resize((28, 28)),  # and MNIST's size
    torchvision.transforms.PILToTensor(),  # uint8, normalised later like every other target
])


@dataclasses.dataclass(frozen=True)
class ImageFolderSplits:
    """An image folder read as the template reads torchvision's MNIST: called with the split, it returns its
    images (N, 28, 28, uint8) as .data and its class indices as .targets. Equal for the same folder, so
    that --disjoint knows two targets on one folder read the same files."""

    folder: str

    def __call__(self, root: str, train: bool, download: bool) -> types.SimpleNamespace:
        split = Path(self.folder, "train" if train else "test")
        try:
            dataset = torchvision.datasets.ImageFolder(split, transform=TO_MNIST)
            images = torch.stack([image for image, _ in dataset]).squeeze(1)
        except (OSError, ValueError) as err:  # no images (FileNotFoundError), or one PIL cannot read
            raise tm.ExperimentError(f"image folder {split}: {str(err).strip().splitlines()[0]}") from None
        return types.SimpleNamespace(data=images, targets=torch.tensor(dataset.targets))


def folder_of(target: tm.Target) -> str | None:
    """The folder an image-folder target reads, None for any other."""
    return target.dataset.folder if isinstance(target.dataset, ImageFolderSplits) else None


def register_image_folder(path: str) -> str:
    """Register FOLDER/{train,test}/<class>/* as a target named after the folder; return its name.

    The class names come from the subfolders (sorted, as ImageFolder numbers them) and must be the
    same in train/ and test/.
    """
    root = Path(path)
    name = root.resolve().name
    layout = f"lay it out as {root}/train/<class>/*.png and {root}/test/<class>/*.png"
    classes = {}
    for split in ("train", "test"):
        if not (root / split).is_dir():
            raise tm.ExperimentError(f"image folder {root} has no {split}/ subfolder; {layout}")
        try:
            classes[split], _ = torchvision.datasets.folder.find_classes(root / split)
        except FileNotFoundError:
            raise tm.ExperimentError(f"image folder {root / split} has no class subfolders; {layout}") from None
    if classes["train"] != classes["test"]:
        only = sorted(set(classes["train"]) ^ set(classes["test"]))
        raise tm.ExperimentError(f"image folder {root}: train/ and test/ have different classes ({', '.join(only)})")
    if name in tm.TARGETS and folder_of(tm.TARGETS[name]) is None:
        raise tm.ExperimentError(f"image folder {root} is named like the registered target {name}; rename the folder")
    tm.TARGETS[name] = tm.Target(ImageFolderSplits(str(root)), tuple(classes["train"]))
    return name
