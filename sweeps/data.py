"""A sweep run's images, as the harness draws them: the sizes checked with the flag that sets them,
--n-val and --stratify, --disjoint's images that pretraining did not see, and the training
batches of --shuffle and --augment. Imported by runs and start; it imports settings, augment and
the template."""

import functools
import zlib

import torch

import transfer_mnist as tm
from sweeps.augment import Augment
from sweeps.settings import backbone_seed


def n_images(target, data_dir):
    """The target's training images (of its training split)."""
    return len(tm.read_split(target, data_dir, True)[1])


def file_positions(target, data_dir):
    """Where each training image of the target sits in its data set's files."""
    spec = tm.TARGETS[target]
    return kept_positions(spec, data_dir) if spec.keep else torch.arange(n_images(target, data_dir))


@functools.cache
def kept_positions(spec, data_dir):
    labels = torch.as_tensor(spec.dataset(root=data_dir, train=True, download=True).targets)
    return torch.arange(len(labels))[spec.keep(labels)]


def same_files(cfg, target):
    """Whether a target reads the files that pretraining read (even-odd and mnist: MNIST's training
    split); with --weights nothing was pretrained here."""
    return not cfg.weights and tm.TARGETS[cfg.source].dataset == tm.TARGETS[target].dataset


def pretraining_images(cfg, pretrain_seed):
    """Positions in the files of the images that pretraining with this seed trained and validated
    on."""
    drawn = tm.draw_subset(cfg.source, cfg.n_pretrain, n_images(cfg.source, cfg.data_dir),
                           pretrain_seed)
    return file_positions(cfg.source, cfg.data_dir)[torch.cat(drawn)]


def available_images(cfg, target, pretrain_seed):
    """The target's training images a run may draw from (with --disjoint: none its backbone saw),
    and what they are, for messages."""
    everything = torch.arange(n_images(target, cfg.data_dir))
    if not (cfg.disjoint and same_files(cfg, target)):
        return everything, target
    seen = torch.isin(file_positions(target, cfg.data_dir), pretraining_images(cfg, pretrain_seed))
    return everything[~seen], f"{target} without the {int(seen.sum())} images that pretraining used"


def subset_draw(cfg, target):
    """How a target run's training and validation images are drawn: the template's draw (the
    post's), or with --n-val and --stratify the same shuffled order, cut to --n-val validation
    images and taken class by class."""
    labels = tm.read_split(target, cfg.data_dir, True)[1] if cfg.stratify else None
    return functools.partial(draw_subset, n_val=cfg.n_val, strata=labels)


def draw_subset(target, n_train, available, seed, where="the dataset", flag="--n-train",
                n_val=None, strata=None):
    """tm.draw_subset's shuffled order of `available`, with n_val validation images (None: a
    quarter of n_train, the template's); with strata (the labels of the target's images), each
    class in proportion to its share of `available`, in training and validation alike, and each
    class once at least in validation where n_val allows (12 validation images drawn at random
    missed 3-5 of FashionMNIST's 10 classes). Sizes that do not fit are errors that name `flag`
    and `where`."""
    if n_val is None:
        try:  # the template's share of validation images, and its check
            n_val = len(tm.draw_subset(target, n_train, len(available), seed)[1])
        except tm.ExperimentError:
            raise tm.ExperimentError(
                f"{flag} {n_train} and a quarter as many to validate do not fit the "
                f"{len(available)} images of {where}; use 4 to "
                f"{int(len(available) * (1 - tm.VAL_SHARE))}") from None
    if n_train + n_val > len(available):
        raise tm.ExperimentError(
            f"{flag} {n_train} with --n-val {n_val} needs {n_train + n_val} training images, "
            f"but {where} has {len(available)}")
    # tm.draw_subset's order
    generator = torch.Generator().manual_seed(zlib.crc32(f"{target}/{seed}".encode()))
    order = available[torch.randperm(len(available), generator=generator)]
    if strata is None:
        return order[:n_train], order[n_train : n_train + n_val]
    classes, counts = strata[order], torch.bincount(strata[available])
    # each class once at least in validation where n_val allows; a class of one image to training
    once = (counts > 1) & (n_val >= int((counts > 1).sum()))
    train_share = shares(n_train, counts)
    val_share = once.long() + shares(n_val - int(once.sum()), counts)
    if bool((train_share + val_share > counts).any()):
        raise tm.ExperimentError(f"{flag} {n_train} with {n_val} validation images takes more "
                                 f"images of a class than {where} has")
    # each image's place among the images of its class, in `order`
    rank = torch.empty_like(classes)
    rank[torch.argsort(classes, stable=True)] = torch.cat([torch.arange(int(n)) for n in counts])
    in_val = (rank >= train_share[classes]) & (rank < (train_share + val_share)[classes])
    return order[rank < train_share[classes]], order[in_val]


def shares(n, counts):
    """n images shared out over the classes in proportion to their counts, by largest remainder."""
    quota = counts * n / counts.sum()
    share = quota.floor().long()
    share[torch.argsort(quota - share, descending=True, stable=True)[: n - int(share.sum())]] += 1
    return share


class TrainingBatches(tm.TensorLoader):
    """The template's training batches, in a new order every epoch drawn from a generator of the
    run's seed (--shuffle; the post's order is fixed), and each image transformed as it is taken
    (--augment): the same for every arm of a seed. Validation and test images stay as they are."""

    def __init__(self, loader, seed, shuffle, augment):
        super().__init__(loader.images, loader.labels, loader.batch_size, loader.view)
        self.order = None
        if shuffle:
            self.order = torch.Generator().manual_seed(zlib.crc32(f"shuffle/{seed}".encode()))
        self.augment = Augment(seed) if augment else None

    def __iter__(self):
        batches = self
        if self.order is not None:
            order = torch.randperm(len(self.labels), generator=self.order)
            images = self.images[order]
            if self.view is None:  # floats, prepared once: channels-last again
                images = images.contiguous(memory_format=torch.channels_last)
            batches = tm.TensorLoader(images, self.labels[order], self.batch_size, self.view)
        for images, labels in tm.TensorLoader.__iter__(batches):
            yield (images if self.augment is None else self.augment(images)), labels


def target_data(cfg, target, n_train, seed):
    """A target run's images, as the sweep's settings draw them and batch them for training."""
    available, where = available_images(cfg, target, backbone_seed(cfg, seed))
    drawn = subset_draw(cfg, target)(target, n_train, available, seed, where)
    view = tm.input_view(tm.resolve_network(cfg), target)
    data = tm.make_data(target, cfg.data_dir, *drawn, view)
    if cfg.shuffle or cfg.augment:
        data.train = TrainingBatches(data.train, seed, cfg.shuffle, cfg.augment)
    return data


def pretraining_data(cfg, seed):
    """Pretraining's images, as the template draws them (tm.load_data), batched for training as
    --shuffle says; never augmented."""
    view = tm.input_view(tm.resolve_network(cfg), cfg.source)
    data = tm.load_data(cfg.source, cfg.n_pretrain, cfg.data_dir, seed, view)
    if cfg.shuffle:
        data.train = TrainingBatches(data.train, seed, shuffle=True, augment=False)
    return data
