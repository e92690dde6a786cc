"""Fine-tune a pretrained network, or train it from scratch on few labels?

The blog post "Fine tuning example for transfer learning" done right, and
a template to ask it of your own network and images. By default a LeNet-5
is pretrained on 10,000 MNIST digits; then each arm (finetuned,
from_scratch, frozen, lp_ft) learns a target from 200 labelled images.

    python transfer_mnist.py             # the post's runs
    python transfer_mnist.py --dry-run   # each stage on two batches
    tensorboard --logdir pretraining_logs

Your own network, with nothing pretrained here:

    python transfer_mnist.py --backbone resnet18 --weights IMAGENET1K_V1
    python transfer_mnist.py --backbone resnet18 --weights mine.pt

Adapt TARGETS, ARMS or make_backbone(). python -m sweeps imports the
registries (Target, TARGETS, ARMS), ExperimentError, logger, VAL_SHARE,
LIBRARY_WARNINGS, read_split, draw_subset, View, prepare, input_view,
describe, load_data, make_data, TensorLoader, TargetData,
resolve_network, weights_path, read_weights, read_backbone, LitModule,
fit, pretrain, train, RunResult, RESULT_COLUMNS and make_parser.
"""

import argparse
import csv
import dataclasses
import functools
import logging
import math
import os
import sys
import tempfile
import time
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path

import lightning
import torch
import torchvision
from torch import nn
from torchvision import models
from torchvision.transforms.v2 import functional as vision

logger = logging.getLogger(__name__)


# ---- Registries: add targets and arms
@dataclasses.dataclass(frozen=True)
class Target:
    """A data set to learn, read as torchvision's MNIST is."""

    # called as torchvision's: (root, train, download); it has
    # .data, uint8 (N, H, W) or (N, H, W, C), and .targets
    dataset: Callable
    label_names: tuple
    relabel: Callable | None = None  # labels -> class indices
    keep: Callable | None = None  # labels -> mask of those kept
    # per channel, of pixels in [0, 1]: MNIST's, as in the post
    mean: tuple = (0.1307,)
    std: tuple = (0.3081,)


MNIST = torchvision.datasets.MNIST
FASHION = torchvision.datasets.FashionMNIST
TARGETS = {
    "mnist": Target(MNIST, tuple(MNIST.classes)),
    "even-odd": Target(MNIST, ("even", "odd"), lambda d: d % 2),
    "fashion-mnist": Target(FASHION, tuple(FASHION.classes)),
    "digits-0-4": Target(MNIST, tuple("01234"), keep=lambda d: d < 5),
    "digits-5-9": Target(MNIST, tuple("56789"), lambda d: d - 5, lambda d: d > 4),
}


@dataclasses.dataclass(frozen=True)
class Arm:
    """How one arm trains on a target."""

    learning_rate: float
    pretrained: bool
    train_backbone: bool = True
    # LP-FT: the share of epochs for the head alone, first
    head_fraction: float = 0.0
    head_lr: float = 0.0


HEAD_LR = 1e-3  # the best of 1e-4..3e-3 on seed 0's validation
# The post's rates: "transfer learning needs smaller learning
# rates than from scratch"
ARMS = {
    "finetuned": Arm(5e-5, pretrained=True),
    "from_scratch": Arm(1e-4, pretrained=False),
    "frozen": Arm(HEAD_LR, True, train_backbone=False),
    "lp_ft": Arm(5e-5, True, head_fraction=0.2, head_lr=HEAD_LR),
}

TRAIN_BATCH_SIZE = 128  # the post's: 200 images, 2 steps an epoch
VAL_SHARE = 0.2  # the post's
EVAL_BATCH_SIZE = 500  # larger is faster, where the images are small
EVAL_VALUES = 2**22  # an evaluation batch's input, at most
FLOAT_BYTES = 2**28  # a split larger as floats is prepared per batch
PROGRESS = 20  # seconds: a slow run's console line, at most this often
LIBRARY_WARNINGS = [
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",  # Lightning's
    r"Found \d+ module\(s\) in eval mode",  # a frozen backbone
]


class ExperimentError(Exception):
    """Bad input: main() prints it in one line and exits with 2."""


# ---- Data
@functools.cache  # a target registered anew: read_split.cache_clear()
def read_split(target, data_dir, train):
    """A target's split: uint8 images (N, H, W, C) and class indices."""
    spec = TARGETS[target]
    try:
        data = spec.dataset(root=data_dir, train=train, download=True)
    except Exception as err:
        raise ExperimentError(
            f"cannot read {target} in {data_dir}: {err}") from None
    images = torch.as_tensor(data.data)
    labels = torch.as_tensor(data.targets)
    if images.dim() == 3:
        images = images.unsqueeze(-1)
    mask = spec.keep(labels) if spec.keep else labels >= 0
    bools = getattr(mask, "dtype", 0) == torch.bool
    if not bools or mask.shape != labels.shape:
        raise ExperimentError(
            f"target {target}: keep must give a bool per label; fix TARGETS")
    labels = labels[mask]
    labels = spec.relabel(labels) if spec.relabel else labels
    n = len(spec.label_names)
    kind = getattr(labels, "dtype", type(labels).__name__)
    good = kind in (torch.int64, torch.int32, torch.uint8)
    good = good and len(labels) == int(mask.sum()) > 0
    if not (good and 0 <= labels.min() <= labels.max() < n):
        raise ExperimentError(
            f"target {target}: relabel gave {kind}, not 0 to {n - 1}; fix TARGETS")
    return images[mask], labels.long()


def draw_subset(target, n_train, n_images, seed):
    """Training images and a quarter as many to validate, as the post."""
    n_val = int(n_train * VAL_SHARE / (1 - VAL_SHARE))
    if n_val < 1 or n_train + n_val > n_images:
        raise ExperimentError(
            f"{target}: {n_train} images (+25% to validate) do not "
            f"fit its {n_images}; use 4 to {n_images * 4 // 5}")
    # per target: even-odd's draw is no slice of mnist's
    seed = zlib.crc32(f"{target}/{seed}".encode())
    draw = torch.Generator().manual_seed(seed)
    order = torch.randperm(n_images, generator=draw)
    return order[:n_train], order[n_train : n_train + n_val]


@dataclasses.dataclass(frozen=True)
class View:
    """The images a backbone takes: channels, size, normalisation."""

    channels: int
    size: tuple  # (height, width)
    mean: tuple
    std: tuple
    stats: str  # whose mean and std, for the console

    @property
    def shape(self):
        """The model's input shape: (C, H, W)."""
        return (self.channels, *self.size)


def prepare(images, view):
    """uint8 images (N, H, W, C) as the model takes them: floats
    (N, C, H, W) in the view's channels and size, normalised."""
    images = images.permute(0, 3, 1, 2)
    if images.shape[1] == 1 < view.channels:  # grey to RGB
        images = images.expand(-1, 3, -1, -1)
    if images.shape[1] > view.channels:
        images = vision.rgb_to_grayscale(images)
    if images.shape[2:] != view.size:
        images = vision.resize(images, view.size, antialias=True)
    mean = torch.tensor(view.mean).view(-1, 1, 1)
    std = torch.tensor(view.std).view(-1, 1, 1)
    images = (images.float() / 255 - mean) / std
    # channels-last, as the backbone: faster convolutions
    return images.contiguous(memory_format=torch.channels_last)


@dataclasses.dataclass(eq=False)
class TensorLoader:
    """Batches sliced from tensors in memory, in the post's fixed order.
    With a view, the images are uint8 (N, H, W, C), prepared a batch at
    a time (loader())."""

    images: torch.Tensor
    labels: torch.Tensor
    batch_size: int
    view: View | None = None

    def __len__(self):
        return math.ceil(len(self.labels) / self.batch_size)

    def __iter__(self):
        size = self.batch_size
        batches = zip(self.images.split(size), self.labels.split(size))
        for images, labels in batches:
            yield prepare(images, self.view) if self.view else images, labels


def loader(images, labels, batch_size, view):
    """Batches as the view says: prepared once where the split fits in
    FLOAT_BYTES as floats (faster), else held as uint8 and prepared a
    batch at a time: FashionMNIST's 10,000 test images at 224 pixels in
    RGB would take 6 GB as floats, 1.5 GB as uint8, 0.01 GB at 28."""
    if len(images) * math.prod(view.shape) * 4 > FLOAT_BYTES:
        return TensorLoader(images, labels, batch_size, view)
    return TensorLoader(prepare(images, view), labels, batch_size)


@dataclasses.dataclass
class TargetData:
    """A run's training, validation and test batches."""

    target: str
    train: TensorLoader
    val: TensorLoader
    test: TensorLoader
    shape: tuple = (1, 28, 28)  # what the model takes: the post's


def make_data(target, data_dir, train_idx, val_idx, view=None):
    """A target's subsets and test split, batched as the view says
    (None: as they are, normalised with the target's stats)."""
    images, labels = read_split(target, data_dir, True)
    spec = TARGETS[target]
    shape = images.shape[3], images.shape[1:3]
    view = view or View(*shape, spec.mean, spec.std, "its registered")
    # evaluation batches sized to the image
    size = min(EVAL_BATCH_SIZE, EVAL_VALUES // math.prod(view.shape))
    size = max(1, size)
    train = loader(images[train_idx], labels[train_idx],
                   TRAIN_BATCH_SIZE, view)
    val = loader(images[val_idx], labels[val_idx], size, view)
    test = loader(*read_split(target, data_dir, False), size, view)
    return TargetData(target, train, val, test, view.shape)


def load_data(target, n_train, data_dir, seed, view=None):
    """A target's images for a run of n_train labels."""
    n_images = len(read_split(target, data_dir, True)[1])
    drawn = draw_subset(target, n_train, n_images, seed)
    return make_data(target, data_dir, *drawn, view)


# ---- Model: swap the backbone here
def decapitated_lenet(channels):
    """The post's LeNet-5 without its classifier: 120 features."""
    return nn.Sequential(
        nn.Conv2d(channels, 6, kernel_size=5, padding=2), nn.ReLU(),
        nn.MaxPool2d(kernel_size=2),
        nn.Conv2d(6, 16, kernel_size=5), nn.ReLU(),
        nn.MaxPool2d(kernel_size=2),
        nn.Conv2d(16, 120, kernel_size=5), nn.ReLU(),
        nn.Flatten(),
    )


def classification_head(features, n_classes):
    """What decapitated_lenet() cut off, for the target's classes."""
    return nn.Sequential(nn.Linear(features, 84), nn.ReLU(),
                         nn.Linear(84, n_classes))


def make_backbone(name, channels):
    """A backbone at its random initialisation: lenet, or a torchvision
    model whose final Linear (fc, classifier or heads) is cut off. Add
    your own here: a module whose output is (N, features)."""
    if name == "lenet":
        return decapitated_lenet(channels)
    if name not in models.list_models(module=models):
        raise ExperimentError(f"--backbone {name}: not lenet nor "
                              f"torchvision's: see make_backbone()")
    net = models.get_model(name, weights=None)
    for key in ("fc", "classifier", "heads"):
        owner, part = net, getattr(net, key, None)
        if isinstance(part, nn.Sequential) and len(part):
            owner, (key, part) = part, list(part.named_children())[-1]
        if isinstance(part, nn.Linear):
            # a Flatten: features (N, C, 1, 1) become (N, C)
            setattr(owner, key, nn.Flatten())
            # GoogLeNet, Inception: the logits alone, also in training
            if hasattr(net, "aux_logits"):
                net.aux_logits = False
            return net
    raise ExperimentError(f"--backbone {name}: no final Linear to cut; "
                          f"cut it in make_backbone()")


def published(args):
    """torchvision's record of --weights; for a file, or none, the
    architecture's DEFAULT, whose crop size and stats the input takes."""
    kinds = models.get_model_weights(args.backbone)
    if args.weights is None or os.path.isfile(args.weights):
        return kinds.DEFAULT
    if args.weights not in kinds.__members__:
        raise ExperimentError(f"--weights {args.weights}: no such file "
                              f"nor weights of {args.backbone}")
    return kinds[args.weights]


def resolve_network(args):
    """The View of --backbone, --weights and --image-size, checked
    before any training. A torchvision model's: RGB, at its published
    weights' crop size and stats. LeNet's (and yours): the source's
    channels and size (with a weights file, the file's channels, 28
    pixels), and each target's registered stats (mean None)."""
    side = args.image_size
    if args.backbone in models.list_models(module=models):
        record = published(args)
        preset = record.transforms()
        side = side or preset.crop_size[0]
        mean, std = tuple(preset.mean), tuple(preset.std)
        return View(3, (side, side), mean, std,
                    f"{args.backbone} {record.name}'s")
    make_backbone(args.backbone, 1)  # an unknown one fails first
    if args.weights is None:
        images = read_split(args.source, args.data_dir, True)[0]
        channels = images.shape[3]
        size = (side, side) if side else tuple(images.shape[1:3])
    else:
        state = read_file(args.weights).values()
        channels = ([v.shape[1] for v in state if v.dim() == 4] or [1])[0]
        size = (side or 28,) * 2
    return View(channels, size, None, None, "")


def input_view(network, target):
    """How the network's View sees a target: lenet's, normalised with
    the target's registered stats (averaged for RGB ones on grey)."""
    if network.mean is not None:
        return network
    spec = TARGETS[target]
    mean, std = spec.mean, spec.std
    if len(mean) > network.channels:  # RGB stats, grey images
        mean, std = [(sum(v) / len(v),) for v in (mean, std)]
    return View(network.channels, network.size, mean, std,
                f"{target}'s registered")


def describe(target, view):
    """What the model sees of a target, for the console."""
    shape = "x".join(map(str, view.shape))
    colour = "RGB" if view.channels == 3 else "grey"
    return (f"{target}: {shape} {colour}, normalised with "
            f"{view.stats} mean and std")


def weights_path(args):
    """The file --weights reads: its own, or where torch's cache keeps
    the published weights. None: pretrained here."""
    if args.weights is None or os.path.isfile(args.weights):
        return args.weights
    name = os.path.basename(published(args).url)
    return os.path.join(torch.hub.get_dir(), "checkpoints", name)


def read_file(path):
    """A weights file's tensors: a state_dict, or a checkpoint's."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        return state.get("state_dict", state)  # Lightning's checkpoint
    except Exception as err:  # main() prints the first line
        raise ExperimentError(f"--weights {path}: {err}") from None


def read_backbone(checkpoint_path):
    """The backbone's tensors in this project's pretraining checkpoint."""
    state = read_file(checkpoint_path)
    return {k[8:]: v for k, v in state.items() if k[:8] == "convnet."}


def read_weights(args, channels):
    """--weights' tensors, keyed as the backbone names them: every one
    of its tensors, of its shape, and nothing but the classifier left."""
    path = weights_path(args)
    if os.path.isfile(args.weights):
        state = read_file(path)
    else:  # torchvision's own loader: from torch's cache, or the web
        record = published(args)
        try:
            state = record.get_state_dict(weights_only=True)
        except Exception as err:  # offline, say: main() prints a line
            raise ExperimentError(
                f"--weights {args.weights}: {path} (from {record.url}) "
                f"cannot be read or downloaded: {err}") from None
    wanted = make_backbone(args.backbone, channels).state_dict()
    # keys under one prefix lose it
    for prefix in ("", "convnet.", "model.", "module.", "backbone."):
        kept = {k.removeprefix(prefix): v for k, v in state.items()
                if k.startswith(prefix)}
        if wanted.keys() <= kept.keys():
            state = kept
            break
    # only the classifier that make_backbone() cut may be left over
    left = [k for k in state if k not in wanted
            and k.split(".")[0] not in ("fc", "classifier", "heads")]
    wrong = [k for k in wanted if k not in state
             or state[k].shape != wanted[k].shape]
    if wrong or left:
        raise ExperimentError(
            f"--weights {path} does not fit {args.backbone} with "
            f"{channels} channels: {len(wrong)} tensors missing or "
            f"other, {len(left)} extra ({(wrong or left)[0]})")
    logger.info(f"--weights {args.weights}: {len(wanted)} tensors, "
                f"not its classifier's")
    return {k: state[k] for k in wanted}


# ---- LightningModule
class LitModule(lightning.LightningModule):
    """A backbone (convnet) and a classification head, trained as an
    arm says; it keeps the weights of its best validation epoch."""

    def __init__(self, label_names, learning_rate, image_shape=(1, 28, 28),
                 train_backbone=True, backbone="lenet"):
        super().__init__()
        # lists: yaml.safe_load reads them back
        label_names, image_shape = list(label_names), list(image_shape)
        self.save_hyperparameters()  # as they are now
        self.convnet = make_backbone(backbone, image_shape[0])
        width = self.width(image_shape)
        self.classification_head = classification_head(width, len(label_names))
        # channels-last, as the batches: faster
        self.convnet.to(memory_format=torch.channels_last)
        self.epochs_before = 0  # LP-FT's head stage
        self.sums, self.counts = {}, {}  # per stage, this epoch
        self.best_loss, self.best_epoch = math.inf, 0
        self.best_state, self.said = None, time.time()
        self.set_stage(learning_rate, train_backbone)

    def width(self, shape):
        # a blank image in eval mode: no random number drawn
        try:
            with torch.no_grad():
                return self.convnet.eval()(torch.zeros(1, *shape)).shape[1]
        except RuntimeError:
            side = shape[-1]
            raise ExperimentError(f"--image-size {side}: too small") from None

    def set_stage(self, learning_rate, train_backbone):
        self.hparams.learning_rate = learning_rate
        self.hparams.train_backbone = train_backbone
        self.convnet.requires_grad_(train_backbone)
        # frozen: no Dropout, fixed BatchNorm statistics
        self.convnet.train(train_backbone)

    def forward(self, x):
        return self.classification_head(self.convnet(x))

    def step(self, batch, stage):
        images, labels = batch
        logits = self(images)
        loss = nn.functional.cross_entropy(logits, labels)
        # summed here, logged once an epoch: faster than self.log()
        hits = (logits.argmax(1) == labels).sum().float()
        sums = torch.stack([loss.detach() * len(labels), hits])
        self.sums[stage] = self.sums.get(stage, 0) + sums
        self.counts[stage] = self.counts.get(stage, 0) + len(labels)
        return loss

    def log_epoch(self, stage):
        loss, accuracy = self.sums.pop(stage) / self.counts.pop(stage)
        metrics = {f"ce_loss/{stage}": loss, f"accuracy/{stage}": accuracy}
        self.log_dict(metrics, logger=False)
        # from 1, on across LP-FT's stages
        epoch = self.epochs_before + self.current_epoch + 1
        # NaN, a diverged run, is the worst
        worse = math.isnan(loss) or loss >= self.best_loss
        if stage == "val" and (self.best_state is None or not worse):
            self.best_loss, self.best_epoch = loss.item(), epoch
            state = self.state_dict().items()
            self.best_state = {k: v.detach().clone() for k, v in state}
        # fit() logs test at the best epoch
        if self.logger is not None and stage != "test":
            values = {k: v.item() for k, v in metrics.items()}
            self.logger.log_metrics(values, step=epoch)
        # a ResNet at 224 pixels on a CPU takes minutes an epoch
        if stage == "train" and time.time() > self.said + PROGRESS:
            self.said = time.time()
            end = self.epochs_before + self.trainer.max_epochs
            logger.info(f"{getattr(self.logger, 'name', 'fit')}: epoch "
                        f"{epoch} of {end}, best val loss {self.best_loss:.4f}")

    def training_step(self, batch, batch_idx):
        return self.step(batch, "train")

    def validation_step(self, batch, batch_idx):
        return self.step(batch, "val")

    def test_step(self, batch, batch_idx):
        return self.step(batch, "test")

    def on_train_epoch_end(self):
        self.log_epoch("train")

    def on_validation_epoch_end(self):
        self.log_epoch("val")

    def on_test_epoch_end(self):
        self.log_epoch("test")

    def configure_optimizers(self):
        trainable = [p for p in self.parameters() if p.requires_grad]
        rate = self.hparams.learning_rate
        return torch.optim.Adam(trainable, rate, fused=True)


# ---- Training
@dataclasses.dataclass
class RunResult:
    """A run's row of the results CSV."""

    target: str
    mode: str  # an arm, or "pretrain"
    seed: int
    n_train: int
    best_epoch: int
    test_loss: float
    test_acc: float
    learning_rate: float
    val_loss: float
    selected: bool  # the harness's grids mark their picks
    max_epochs: int


RESULT_COLUMNS = [f.name for f in dataclasses.fields(RunResult)]


def csv_value(value):
    """A value as the results CSV writes it."""
    if type(value) is float:
        return f"{value:.6g}"
    return str(value).lower() if type(value) is bool else value


def write_results(path, results):
    """The results CSV, whole, with the runs so far."""
    rows = [map(csv_value, dataclasses.astuple(r)) for r in results]
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([RESULT_COLUMNS] + rows)


def fit(module, data, mode, seed, budget, args, test=True):
    """Train for the rest of the budget, keep the best validation
    epoch's weights, test them; the trainer and the run's row."""
    run, folder, n = mode, None, len(data.train.labels)
    if mode in ARMS:
        run = f"{data.target}/{mode}"
        folder = f"n{n}_seed{seed}_lr{args.lr[mode]:g}"
    limit = 2 if args.dry_run else 1.0
    epochs = budget - module.epochs_before
    callbacks = []
    if args.patience:
        callbacks.append(lightning.pytorch.callbacks.EarlyStopping(
            "ce_loss/val", args.min_delta, args.patience))
    trainer = lightning.Trainer(
        max_epochs=1 if args.dry_run else max(1, epochs),
        accelerator=args.accelerator, devices=args.devices,
        callbacks=callbacks,
        logger=lightning.pytorch.loggers.TensorBoardLogger(
            args.log_dir, run, args.version, sub_dir=folder,
            default_hp_metric=False),
        # same seed, same numbers ("warn": CUDA lacks a few)
        deterministic="warn", enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, log_every_n_steps=1,
        limit_train_batches=limit, limit_val_batches=limit,
        limit_test_batches=limit)
    trainer.fit(module, data.train, data.val)
    module.load_state_dict(module.best_state)
    if not test:
        return trainer, None
    last = module.epochs_before + trainer.current_epoch
    if module.best_epoch == last and not args.dry_run:
        logger.warning(f"{run}: its best epoch was its last: still improving")
    trainer.test(module, data.test, verbose=False)
    metrics = {m: trainer.callback_metrics[m].item()
               for m in ("ce_loss/test", "accuracy/test")}
    r = RunResult(data.target, mode, seed, n, module.best_epoch, *metrics.values(),
                  module.hparams.learning_rate, module.best_loss, True, budget)
    shape = "x".join(map(str, data.shape))
    hparams = {**vars(r), "backbone": args.backbone,
               "weights": str(args.weights), "input": shape}
    trainer.logger.log_hyperparams(hparams, metrics, step=r.best_epoch)
    trainer.logger.finalize("success")  # test() closed it once already
    return trainer, r


# ---- Pretrain and train
def pretrain(args, seed):
    """A backbone pretrained on --source: its checkpoint and row."""
    logger.info(f"pretrain: {args.n_pretrain} {args.source} images")
    view = input_view(resolve_network(args), args.source)
    data = load_data(args.source, args.n_pretrain, args.data_dir, seed, view)
    lightning.seed_everything(seed, verbose=False)
    names = TARGETS[args.source].label_names
    module = LitModule(names, args.pretrain_lr, data.shape,
                       backbone=args.backbone)
    trainer, result = fit(module, data, "pretrain", seed,
                          args.pretrain_epochs, args)
    path = f"{trainer.logger.log_dir}/checkpoints/best.ckpt"
    trainer.save_checkpoint(path, weights_only=True)
    return path, result


def train(backbone, mode, data, args):
    """One arm on a target, from the backbone's tensors where the arm
    is pretrained; its row."""
    arm, rate = ARMS[mode], args.lr[mode]
    logger.info(f"{data.target}/{mode}: seed {args.seed}, rate {rate:g}")
    # every arm of a seed: the same head
    lightning.seed_everything(args.seed, verbose=False)
    names = TARGETS[data.target].label_names
    module = LitModule(names, rate, data.shape, arm.train_backbone,
                       args.backbone)
    if arm.pretrained:
        module.convnet.load_state_dict(backbone, strict=True)
    if arm.head_fraction:
        # LP-FT: two fits, a fresh Adam each, tested with the best
        module.set_stage(arm.head_lr, train_backbone=False)
        epochs = round(arm.head_fraction * args.train_epochs)
        trainer = fit(module, data, mode, args.seed, max(1, epochs),
                      args, test=False)[0]
        module.epochs_before = trainer.current_epoch
        module.set_stage(rate, train_backbone=True)
    return fit(module, data, mode, args.seed, args.train_epochs, args)[1]


# ---- Command line and main()
def positive(kind):
    """An argparse type: a positive int or float."""
    def parse(text):
        if not 0 < kind(text) < math.inf:
            raise argparse.ArgumentTypeError(
                f"must be positive, not {text}")
        return kind(text)
    return parse


def make_parser():
    """The template's flags, each with its default."""
    parser = argparse.ArgumentParser(
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = parser.add_argument
    count, rate = positive(int), positive(float)
    add("--data-dir", default="data", help="of MNIST/raw...")
    add("--log-dir", default="pretraining_logs", help="for TensorBoard")
    add("--results-csv", help="None: in --log-dir")
    add("--seed", type=int, default=0, help="of draws and weights")
    add("--backbone", default="lenet",
        help="lenet or a torchvision model: resnet18, vgg11...")
    add("--weights", help="None: pretrain on --source; published "
        "weights (DEFAULT, IMAGENET1K_V1...) or a file")
    add("--image-size", type=count, help="None: the weights' for "
        "torchvision's, the source's for lenet")
    add("--source", choices=TARGETS, default="mnist", help="to pretrain")
    add("--n-pretrain", type=count, default=10_000, help="+25%% to validate")
    add("--pretrain-epochs", type=count, default=50, help="at most")
    add("--pretrain-lr", type=rate, default=1e-4, help="Adam's")
    add("--targets", nargs="+", default=["even-odd", "fashion-mnist"],
        help=", ".join(TARGETS))
    add("--modes", nargs="+", choices=ARMS,
        default=["finetuned", "from_scratch"], help="arms")
    add("--n-train", type=count, default=200, help="+25%% to validate")
    add("--train-epochs", type=count, default=500, help="at most")
    add("--patience", type=int, default=100,
        help="epochs after the best; 0: no early stop")
    add("--threads", type=count, help="None: torch's own")
    add("--dry-run", action="store_true", help="2 batches a stage")
    return parser


def parse_args(argv=None):
    """The command line, and the settings the harness varies."""
    parser = make_parser()
    args, unknown = parser.parse_known_args(argv)
    unknown += [t for t in args.targets if t not in TARGETS]
    if unknown:
        given = " ".join(sys.argv[1:] if argv is None else argv)
        parser.exit(2, f"error: {unknown[0]} is no flag or target here; "
                    f"for seeds, grids, image folders: python -m sweeps "
                    f"{given}\n")
    # the harness's flags; here the post's values
    args.lr = {name: a.learning_rate for name, a in ARMS.items()}
    args.min_delta, args.version = 0.0, None
    args.accelerator = args.devices = "auto"  # Lightning's choice
    return args


def run_all(args, csv_path):
    """The post's runs: pretraining (unless --weights), then every
    arm on every target, the CSV rewritten after each run."""
    network = resolve_network(args)  # what can fail, fails first
    data = {}
    for target in args.targets:
        view = input_view(network, target)
        data[target] = load_data(target, args.n_train, args.data_dir,
                                 args.seed, view)
        logger.info(describe(target, view))
    results = []
    if args.weights:
        backbone = read_weights(args, network.channels)
    os.makedirs(Path(csv_path).absolute().parent, exist_ok=True)
    write_results(csv_path, results)
    if not args.weights:
        checkpoint, result = pretrain(args, args.seed)
        backbone = read_backbone(checkpoint)
        results.append(result)
    for target in args.targets:
        for mode in args.modes:
            write_results(csv_path, results)
            results.append(train(backbone, mode, data[target], args))
    write_results(csv_path, results)
    return results


def main(argv=None):
    """The post's experiment from the command line; the exit status."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # Lightning's banners and LIBRARY_WARNINGS are not for users
    rank_zero = "lightning.pytorch.utilities.rank_zero"
    logging.getLogger(rank_zero).setLevel(logging.WARNING)
    for message in LIBRARY_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    torch.set_num_threads(args.threads or torch.get_num_threads())
    if args.dry_run:
        args.log_dir = tempfile.mkdtemp()
    versions = Path(args.log_dir).glob("**/version_*")
    taken = [p.name[8:] for p in versions if p.name[8:].isdigit()]
    args.version = f"version_{max(map(int, taken), default=-1) + 1}"
    csv_path = args.results_csv or os.path.join(
        args.log_dir, f"results_{args.version}.csv")
    try:
        results = run_all(args, csv_path)
    # OSError: an output path; a full disk
    except (ExperimentError, OSError) as err:
        line = str(err).strip().splitlines()[0]
        print(f"error: {line}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C
        print(f"\nInterrupted: the finished runs are in {csv_path}",
              file=sys.stderr)
        return 130
    for r in results:
        print(f"{r.target}/{r.mode}: best epoch {r.best_epoch}, val loss "
              f"{r.val_loss:.4f}, test loss {r.test_loss:.4f}, "
              f"test accuracy {r.test_acc:.4f}")
    print(f"Results: {csv_path}. TensorBoard: "
          f"tensorboard --logdir {args.log_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
