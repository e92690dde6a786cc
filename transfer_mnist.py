r"""Transfer learning with PyTorch Lightning: does fine-tuning a pretrained network beat training
from scratch when labels are scarce?

A truncated LeNet-5 is pretrained on 10,000 labelled MNIST digits. Its convolutional backbone is
then reused under a fresh classification head on targets that have only 200 labelled training
images: even/odd digits (MNIST labels mod 2), FashionMNIST, or a folder of your own images. Each
target is trained on the very same images by each arm: fine-tuned from the pretrained backbone,
from scratch, with the backbone frozen, or in two stages (LP-FT: the head first, then everything),
each at its own learning rate or the best of a grid chosen on validation data. Every run keeps the
weights of its best validation epoch, is tested with them on the whole test set, and is logged to
TensorBoard.
A corrected port of the blog post "Fine tuning example for transfer learning" (README.md).

Run it:
    pip install -r requirements.txt
    python transfer_mnist.py                      # the post's protocol; downloads the data into ./data
    python transfer_mnist.py --dry-run            # every stage on two batches: a smoke test in seconds
    python transfer_mnist.py --protocol fair --workers 2   # the honest answer: 5 seeds, every arm at its best rate
    python transfer_mnist.py ... --cluster auto   # the same on a Ray cluster (`ray start` on every node)
    python transfer_mnist.py --resume pretraining_logs/results_version_0.csv   # an interrupted sweep
    python transfer_mnist.py --protocol fair --targets my_images   # my_images/{train,test}/<class>/*.png
    tensorboard --logdir pretraining_logs

Headline, on a 2-core Intel Xeon without a GPU: the default run takes about 65 s. Under --protocol fair
(5 seeds, a backbone per seed, every arm at its best of 7 learning rates, no target image that
pretraining saw; about 25 min a sweep), at 200 labels fine-tuning beats training from scratch on
even/odd by 5.0 points of test accuracy (95% interval +3.4 to +6.7), and shows no detectable difference
once every arm trains with --augment (+0.5, -0.5 to +1.4) nor on FashionMNIST (-0.9, -2.7 to +0.9).
README.md has the tables, the figures and the commands; results/ has the sweeps behind them.

To adapt it: a target is one TARGETS entry, an arm one ARMS entry, a setting one Config field;
everything else, the command line included, is derived from them.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import functools
import gc
import hashlib
import importlib
import importlib.metadata
import io
import json
import logging
import math
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
import types
import typing
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path

import lightning
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

logger = logging.getLogger(__name__)


# ---- Targets and arms: one entry each; add yours here -------------------------------------
@dataclasses.dataclass(frozen=True)
class Target:
    """Everything about one task. Its head gets one output per label name."""

    dataset: type[torchvision.datasets.VisionDataset]  # read from <data-dir>/<class name>/raw, or from `folder`
    label_names: tuple[str, ...]
    relabel: Callable[[torch.Tensor], torch.Tensor] | None = None  # dataset labels -> this task's class indices
    keep: Callable[[torch.Tensor], torch.Tensor] | None = None  # dataset labels -> mask of the samples to keep
    folder: str | None = None  # an ImageFolder target's root, holding train/ and test/ (see register_image_folder)


def digit_parity(labels: torch.Tensor) -> torch.Tensor:
    return labels % 2


TARGETS: dict[str, Target] = {
    "mnist": Target(torchvision.datasets.MNIST, tuple(torchvision.datasets.MNIST.classes)),
    "even-odd": Target(torchvision.datasets.MNIST, ("even", "odd"), relabel=digit_parity),
    "fashion-mnist": Target(torchvision.datasets.FashionMNIST, tuple(torchvision.datasets.FashionMNIST.classes)),
}


@dataclasses.dataclass(frozen=True)
class Arm:
    """One way to train a target: where its backbone starts, whether it learns, and Adam's rate."""

    learning_rate: float  # the default; --lr ARM=RATE overrides it, --lr-grid searches it
    pretrained: bool  # start from the pretrained backbone; an arm without it is the baseline the others are paired with
    train_backbone: bool = True  # False: the backbone is a fixed feature extractor and only the head learns
    # Two stages (LP-FT): this share of the epoch budget first trains the head alone on the frozen
    # backbone at head_lr, then the rest fine-tunes every weight at learning_rate
    head_fraction: float = 0.0
    head_lr: float = 0.0


# Adam's rate for a fresh head on a frozen backbone: only the head learns, so a larger step is safe
# (the best of 1e-4..3e-3 on seed 0's validation loss at 200 labels)
HEAD_LR = 1e-3
ARMS: dict[str, Arm] = {
    # The post's rates: "transfer learning needs smaller learning rates than training from scratch"
    "finetuned": Arm(learning_rate=5e-5, pretrained=True),
    "from_scratch": Arm(learning_rate=1e-4, pretrained=False),
    "frozen": Arm(learning_rate=HEAD_LR, pretrained=True, train_backbone=False),
    # LP-FT (Kumar et al. 2022; fastai's fine_tune): a head trained first does not send large, random
    # gradients into the pretrained features when they start to learn. The head stage gets a fifth of
    # the budget: by epoch 100 a head on the frozen backbone was within 0.05 of its best validation loss
    # (seeds 0-1, 200 labels, both targets), while fine-tuning at the post's rate still improved near
    # epoch 500. --lr lp_ft=RATE and --lr-grid set the fine-tuning stage's rate; the head's stays HEAD_LR.
    "lp_ft": Arm(learning_rate=5e-5, pretrained=True, head_fraction=0.2, head_lr=HEAD_LR),
}


# ---- Defaults: every setting once, with its why; the command line is built from Config ----
TRAIN_BATCH_SIZE = 128  # the post's; 200 target images make 2 steps an epoch
EVAL_BATCH_SIZE = 500  # evaluation only, same numbers at any size; pretraining is 29% slower at 32, 19% at 2500
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081  # the post normalises every dataset with MNIST's statistics
VAL_FRACTION = 0.2  # the post draws n_train / 0.8 images and holds 20% of them out for validation
MONITOR = "ce_loss/val"  # best epoch = lowest validation cross-entropy, as in the post
PROGRESS_LINES = 5  # progress lines a run prints (plus its result): visible, and cheap
DRY_RUN_BATCHES = 2  # --dry-run: batches per stage, one epoch each
# Lightning 2.6 calls a pytree API that torch 2.14 deprecates: nothing for a user to act on
LIBRARY_WARNINGS = [r"`isinstance\(treespec, LeafSpec\)` is deprecated"]


def setting(default: typing.Any, help: str, **parser_options: typing.Any) -> typing.Any:
    """A Config field that is also a command-line flag: its default, its help, and any argparse options
    (choices, a stricter type, a metavar) beyond what the field's type says."""
    value = {"default_factory": lambda: default.copy()} if isinstance(default, dict) else {"default": default}
    return dataclasses.field(**value, metadata={"help": help, **parser_options})


def number(kind: type, low: float, high: float, what: str, open_low: bool = False) -> Callable[[str], typing.Any]:
    """An argparse type: a `kind` from low to high (above low if open_low), else the error says `what`."""
    def parse(text: str) -> typing.Any:
        try:
            value = kind(text)
        except ValueError:
            value = math.nan
        if not (low < value if open_low else low <= value) or not value <= high:
            raise argparse.ArgumentTypeError(f"must be {what}, not {text}")
        return value
    return parse


positive_int = number(int, 1, math.inf, "a positive whole number")
non_negative_int = number(int, 0, math.inf, "0 or more")
positive_float = number(float, 0, math.nextafter(math.inf, 0), "a positive number", open_low=True)
gpu_share = number(float, 0, 1, "a share of one GPU, from 0 to 1")


def target_name(text: str) -> str:
    """A registered target, or a folder to read as an image-folder target."""
    if text in TARGETS or os.path.isdir(text):
        return text
    raise argparse.ArgumentTypeError(f"{text!r} is neither a registered target ({', '.join(TARGETS)}) nor a folder")


def arm_rate(text: str) -> tuple[str, float]:
    """ARM=RATE, e.g. finetuned=1e-3."""
    arm, _, rate = text.partition("=")
    if arm not in ARMS:
        raise argparse.ArgumentTypeError(f"unknown arm {arm!r} in {text!r}; choose from {', '.join(ARMS)}")
    return arm, positive_float(rate)


# --protocol fair: what an honest comparison needs, for every flag that the command line does not give
FAIR = {
    "seeds": 5,  # an interval over seeds; with 2 or 3, t(0.975) is 12.7 or 4.3
    "modes": tuple(ARMS),  # every arm
    # every arm at its best rate (Kornblith, Shlens and Le 2019); the arms' choices fall inside this grid
    "lr_grid": (3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2),
    "select": "pooled",  # one rate over the seeds: 12-50 validation images pick a rate per seed noisily
    "backbone_per_seed": True,  # pretraining's noise in the intervals too
    "disjoint": True,  # no target image that pretraining learned with its digit label
}


@dataclasses.dataclass
class Config:
    """One invocation's settings. Each field with a help text is the flag of the same name (n_train is
    --n-train); its type, default and help come from here, so change a default here."""

    protocol: str = setting("post", "post: the blog post's protocol, as the defaults below say; fair: an honest "
                            "comparison, with these settings unless the command line gives them: "
                            + ", ".join(f"--{name.replace('_', '-')} " + (" ".join(f"{v:g}" for v in value)
                                        if name == "lr_grid" else " ".join(value) if isinstance(value, tuple) else
                                        "on" if value is True else str(value)) for name, value in FAIR.items()),
                            choices=("post", "fair"))
    data_dir: str = setting("data", "folder holding MNIST/raw and FashionMNIST/raw as torchvision lays them "
                            "out; missing files are downloaded")
    log_dir: str = setting("pretraining_logs",  # the post's folder
                           "TensorBoard folder; each invocation adds a new version to it")
    results_csv: str | None = setting(None, "results CSV, one row per run; the summary goes beside it with a .md "
                                      "suffix (default: <log-dir>/results_<version>.csv)", metavar="PATH")
    seed: int = setting(0, "first seed: draws the training subsets and initial weights, and seeds pretraining "
                        "unless --pretrain-seed says otherwise")
    seeds: int = setting(1,  # one seed is the post's single run; the summary over seeds needs two or more
                         "repeat every target run for this many seeds, --seed upwards", type=positive_int)
    # Pretraining runs once per invocation: the seeds sample the target side, where the noise is
    pretrain_seed: int | None = setting(None, "seed of pretraining (default: --seed); fix it to split the seeds "
                                        "of one sweep over machines, e.g. --seed 3 --seeds 2 --pretrain-seed 0")
    # One backbone answers "what is this backbone worth"; one per seed puts the pretraining noise in the intervals
    backbone_per_seed: bool = setting(False, "pretrain one backbone per seed (pretraining seed s for the target "
                                      "runs of seed s) instead of one for the whole invocation")
    source: str = setting("mnist", "registered target (or image folder) to pretrain the backbone on",
                          type=target_name)
    n_pretrain: int = setting(10_000,  # the post's
                              "training images to pretrain on, plus a quarter as many for validation")
    pretrain_epochs: int = setting(50,  # the post's; pretraining validation loss is still falling at 50
                                   "epochs of pretraining", type=positive_int)
    pretrain_lr: float = setting(1e-4, "Adam's learning rate for pretraining")  # the post's
    targets: tuple[str, ...] = setting(("even-odd", "fashion-mnist"),  # the post's two
                                       "registered targets, or folders of your own images laid out as "
                                       "FOLDER/train/<class>/* and FOLDER/test/<class>/*", type=target_name)
    modes: tuple[str, ...] = setting(("finetuned", "from_scratch"),  # the post's two arms
                                     "arms to run on every target", choices=ARMS)
    lr: dict[str, float] = setting({}, "Adam's learning rate of an arm, e.g. --lr finetuned=1e-3",
                                   type=arm_rate, metavar="ARM=RATE")
    # Empty: the post's protocol, each arm at its own rate. A fair comparison gives every arm its own
    # search over rates, chosen on validation data (Kornblith, Shlens and Le 2019)
    lr_grid: tuple[float, ...] = setting((), "train every target run once per learning rate, the same grid for "
                                         "every arm, and select per (target, arm, n_train, seed) the rate with the "
                                         "lowest validation loss, e.g. 1e-5 3e-5 1e-4 3e-4 1e-3 3e-3",
                                         type=positive_float, metavar="LR")
    # With few validation images (12 at 50 labels) a rate chosen per seed is noisy; pooling the seeds is not
    select: str = setting("seed", "how --lr-grid picks: per seed on its own validation loss, or pooled: one rate per "
                          "(target, arm, n_train), the lowest mean validation loss over seeds", choices=("seed", "pooled"))
    n_train: tuple[int, ...] = setting((200,),  # the scarce-label regime the post is about
                                       "training images per target run, plus a quarter as many for validation; "
                                       "several sizes give a learning curve, e.g. 50 100 200 500")
    train_epochs: int = setting(500,  # the post's; long enough for every target run to overfit
                                "epochs of every target run; its best-validation epoch is tested", type=positive_int)
    # Over seeds 0-2 none of the 12 target runs tested other weights than with all 500 epochs
    patience: int = setting(100, "stop a run this many epochs after its best validation loss; 0 never stops "
                            "early (the post)", type=non_negative_int)
    # Off: the post draws its subsets independently, so even-odd trains on some images that pretraining
    # learned with their digit, which decides their parity: that flatters fine-tuning by about a point
    disjoint: bool = setting(False, "draw each target's training and validation images only from those that its "
                             "backbone was not pretrained on, where source and target read the same files "
                             "(even-odd and mnist)")
    # Off: the post trains on the images as they are. With 200 labels augmentation is the strongest lever there is
    augment: bool = setting(False, "train the target runs on randomly shifted, rotated and scaled images (a new "
                            "transform per image and epoch, drawn from the run's seed); never validation or test")
    accelerator: str = setting("auto", "Lightning accelerator: auto, cpu, gpu, mps, ...")
    devices: str = setting("auto", "Lightning devices; the experiment runs on one")
    overwrite: bool = setting(False, "delete the log folder first, instead of adding a new version beside the "
                              "earlier ones")
    dry_run: bool = setting(False, "smoke test: every stage for one epoch of two batches, logs in a temporary folder")
    # The target runs are independent once pretraining is done: several small runs side by side use a
    # machine better than one (torch cannot spread convolutions this small over many threads)
    workers: int = setting(1, "target runs side by side on a local Ray instance (1: all in this process, no Ray); "
                           "each run's numbers depend on --threads, not on this", type=positive_int)
    threads: int | None = setting(None, "torch threads of every run, pretraining included; the same --threads "
                                  "gives the same numbers (default: torch's own in one process, the machine's "
                                  "cores divided by --workers with workers, 1 on a cluster)", type=positive_int)
    # Only this flag joins a cluster: --workers always starts a Ray instance of its own
    cluster: str | None = setting(None, "run the target runs on a running Ray cluster: auto (the one `ray start` "
                                  "runs on this machine), or host:port as `ray start --head` prints it",
                                  metavar="ADDRESS")
    gpus_per_run: float | None = setting(None, "share of a GPU that each target run asks Ray for, so that several "
                                         "runs share one GPU (default: 1/--workers on a GPU accelerator, else 0)",
                                         type=gpu_share)
    resume: str | None = setting(None, "continue the sweep whose results are in CSV with its saved settings "
                                 "(CSV's .json): skip its finished runs and its pretraining", metavar="CSV")
    report: tuple[str, ...] = setting((), "no training: rebuild the summary, its Markdown and the figure from "
                                      "results CSVs, merged; written beside the first CSV, or beside --results-csv "
                                      "(which then gets the merged rows). LABEL=CSV ... compares sweeps side by "
                                      "side (a label on several CSVs merges them)", metavar="CSV")
    version: str = "version_0"  # set at start: the log version that all runs of this invocation share

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):  # the command line gives lists: keep the order, drop repeats
            if isinstance(getattr(self, field.name), list):
                setattr(self, field.name, tuple(dict.fromkeys(getattr(self, field.name))))
        self.lr = {**{name: arm.learning_rate for name, arm in ARMS.items()}, **dict(self.lr)}


class ExperimentError(Exception):
    """Input the experiment cannot run on. main() prints the message in one line and exits with status 2."""


class ExperimentFailure(Exception):
    """A run failed for a reason outside the user's input (a worker killed, out of memory): exit status 1."""


class StopSignal:
    """Ctrl-C (SIGINT) and SIGTERM stop the experiment whenever they arrive. The handler raises
    KeyboardInterrupt and remembers the signal: code that swallows exceptions may meet it first (the
    garbage collector runs Lightning's Profiler.__del__, which drops what is raised in it), and check(),
    called between runs, raises it again."""

    received: int | None = None
    deferring = False

    @classmethod
    def handle(cls, signum: int, frame: typing.Any) -> None:
        cls.received = signum
        if not cls.deferring:
            raise KeyboardInterrupt

    @classmethod
    @contextlib.contextmanager
    def deferred(cls):
        """A signal that arrives in here stops the experiment at the end of the block (around gc.collect():
        an exception raised in a __del__ is printed as 'Exception ignored' and dropped)."""
        cls.deferring = True
        try:
            yield
        finally:
            cls.deferring = False
        cls.check()

    @classmethod
    def install(cls) -> None:
        """Also after ray.init(), which sets a SIGTERM handler of its own. A SIGINT ignored from the start (a
        job in the background of a script) stays ignored."""
        for signum in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(signum) is not signal.SIG_IGN or signum == signal.SIGTERM:
                signal.signal(signum, cls.handle)

    @classmethod
    def check(cls) -> None:
        if cls.received is not None:
            raise KeyboardInterrupt


# ---- Data ---------------------------------------------------------------------------------
INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)  # what cross-entropy can take


class LabelError(ExperimentError):
    """A target's keep/relabel gave something other than a mask or class indices; check_data() names the target."""


def describe_tensor(value: typing.Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {str(value.dtype).removeprefix('torch.')} tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"


@functools.cache
def read_split(target: Target, data_dir: str, train: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """uint8 images (N, 28, 28) and int64 class indices of one split of a target, read once per process, and
    each image's position in the split as the files hold it (before `keep`): what two targets that read
    the same files (even-odd and mnist) can compare."""
    if target.folder is None:
        images, labels = read_torchvision(target.dataset, data_dir, train)
    else:
        images, labels = read_image_folder(Path(target.folder, "train" if train else "test"))
    positions = torch.arange(len(labels))
    if target.keep is not None:
        mask = target.keep(labels)
        if not (isinstance(mask, torch.Tensor) and mask.dtype == torch.bool and mask.shape == labels.shape):
            raise LabelError(f"keep returned {describe_tensor(mask)}, not a bool mask of one entry per label")
        images, labels, positions = images[mask], labels[mask], positions[mask]
    if target.relabel is not None:
        labels = target.relabel(labels)
        if not (isinstance(labels, torch.Tensor) and labels.dtype in INDEX_DTYPES and labels.dim() == 1):
            raise LabelError(f"relabel returned {describe_tensor(labels)}, not integer class indices")
    return images, labels.long(), positions  # the int64 that cross-entropy takes


def read_torchvision(cls: type[torchvision.datasets.MNIST], data_dir: str, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """An MNIST-like split through torchvision, which downloads the raw files only when they are missing."""
    raw = Path(data_dir, cls.__name__, "raw")
    files = [raw / Path(name).stem for name, _ in cls.resources]  # the unzipped names
    try:
        # torchvision prints every mirror it fails to reach; the error below says it in one line
        with contextlib.redirect_stdout(io.StringIO()):
            dataset = cls(root=data_dir, train=train, download=True)
    except Exception as err:  # a failed download, or a file torchvision cannot parse
        if all(file.is_file() for file in files):
            raise ExperimentError(damaged_file(raw, train)) from None
        reason = str(err).strip().splitlines()[-1]
        raise ExperimentError(
            f"{cls.__name__} is not in {raw} and could not be downloaded ({reason}); put "
            f"{', '.join(file.name for file in files)} there, or pass --data-dir with a folder that holds "
            f"{cls.__name__}/raw/"
        ) from None
    if len(dataset.data) != len(dataset.targets):
        raise ExperimentError(f"{raw}: the {'train' if train else 't10k'} image and label files hold "
                              f"{len(dataset.data)} and {len(dataset.targets)} entries; one of them is damaged")
    return dataset.data, dataset.targets


def damaged_file(raw: Path, train: bool) -> str:
    """Which raw file of a split torchvision could not read, and what to do about it."""
    prefix = "train" if train else "t10k"
    readers = {f"{prefix}-images-idx3-ubyte": torchvision.datasets.mnist.read_image_file,
               f"{prefix}-labels-idx1-ubyte": torchvision.datasets.mnist.read_label_file}
    for name, read in readers.items():
        try:
            read(str(raw / name))
        except OSError as err:
            return f"cannot read {raw / name} ({err.strerror})"
        except Exception:  # a short file fails a size check or a reshape inside torchvision
            return (f"{raw / name} is damaged (truncated or corrupt); delete it to download it again, "
                    f"or replace it with the original file")
    return f"the raw files in {raw} are damaged; delete them to download them again"


# ---- Image-folder targets (optional: delete this section, the folder branch of read_split() and the
# resolve_targets() call in check_inputs(), and --targets takes registered names only) ----
FOLDER_TRANSFORM = torchvision.transforms.Compose([
    torchvision.transforms.Grayscale(num_output_channels=1),  # the backbone takes one channel
    torchvision.transforms.Resize((28, 28)),  # and MNIST's size
    torchvision.transforms.PILToTensor(),  # uint8, normalised later like every other target
])


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
            raise ExperimentError(f"image folder {root} has no {split}/ subfolder; {layout}")
        try:
            classes[split], _ = torchvision.datasets.folder.find_classes(root / split)
        except FileNotFoundError:
            raise ExperimentError(f"image folder {root / split} has no class subfolders; {layout}") from None
    if classes["train"] != classes["test"]:
        only = sorted(set(classes["train"]) ^ set(classes["test"]))
        raise ExperimentError(f"image folder {root}: train/ and test/ have different classes ({', '.join(only)})")
    if name in TARGETS and TARGETS[name].folder is None:
        raise ExperimentError(f"image folder {root} is named like the registered target {name}; rename the folder")
    TARGETS[name] = Target(torchvision.datasets.ImageFolder, tuple(classes["train"]), folder=str(root))
    return name


def read_image_folder(split: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image of one split, as one channel of 28x28 uint8 pixels, and the class indices."""
    try:
        dataset = torchvision.datasets.ImageFolder(split, transform=FOLDER_TRANSFORM)
        images = torch.stack([image for image, _ in dataset]).squeeze(1)
    except (OSError, ValueError) as err:  # no images (FileNotFoundError), or one PIL cannot read
        raise ExperimentError(f"image folder {split}: {str(err).strip().splitlines()[0]}") from None
    return images, torch.tensor(dataset.targets)


def resolve_targets(cfg: Config) -> None:
    """Replace image folders in --source and --targets by the names they are registered under."""
    folders = {}
    for arg in (cfg.source, *cfg.targets):
        if arg not in TARGETS and arg not in folders:
            folders[arg] = register_image_folder(arg)
    names = list(folders.values())
    if len(set(names)) < len(names):
        raise ExperimentError(f"two image folders share a name ({', '.join(folders)}); rename one")
    cfg.source = folders.get(cfg.source, cfg.source)
    cfg.targets = tuple(folders.get(arg, arg) for arg in cfg.targets)


# ---- Subsets and loaders ------------------------------------------------------------------
def validation_size(n_train: int) -> int:
    """Validation images beside n_train training images: the post draws n_train / 0.8 in all."""
    return int(n_train * VAL_FRACTION / (1 - VAL_FRACTION))


def split_sizes(n_train: int, n_available: int, flag: str = "--n-train", where: str = "the dataset") -> tuple[int, int]:
    """(train, validation) sizes for n_train training samples, checked against the data."""
    n_val = validation_size(n_train)
    if n_train < 1 or n_val < 1:
        smallest = next(n for n in range(1, n_available) if validation_size(n) >= 1)
        raise ExperimentError(f"{flag} {n_train} is too small to split off a validation set; use at least {smallest}")
    if n_train + n_val > n_available:
        largest = int(n_available * (1 - VAL_FRACTION))
        raise ExperimentError(
            f"{flag} {n_train} needs {n_train + n_val} training images with validation, "
            f"but {where} has {n_available}; use at most {largest}"
        )
    return n_train, n_val


def draw_subset(target: str, n_train: int, available: torch.Tensor, seed: int,
                where: str = "the dataset") -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the training and validation samples of one (target, seed), drawn from `available`.

    Every arm of a target calls this with the same seed, so they train and validate on the same
    images. The stream depends on the target's name too, so the even-odd subset is not a slice of
    the pretraining subset that the same seed draws from the same MNIST images.
    """
    n_train, n_val = split_sizes(n_train, len(available), where=where)
    generator = torch.Generator().manual_seed(zlib.crc32(f"{target}/{seed}".encode()))
    order = available[torch.randperm(len(available), generator=generator)]
    return order[:n_train], order[n_train : n_train + n_val]


def backbone_seed(cfg: Config, seed: int) -> int:
    """The pretraining seed of the backbone that the target runs of `seed` start from."""
    if cfg.backbone_per_seed:
        return seed
    return cfg.seed if cfg.pretrain_seed is None else cfg.pretrain_seed


def shares_images(source: str, target: str) -> bool:
    """Whether two targets read the same files (even-odd and mnist both read MNIST's training split)."""
    return (TARGETS[source].dataset, TARGETS[source].folder) == (TARGETS[target].dataset, TARGETS[target].folder)


def pretraining_images(cfg: Config, seed: int) -> torch.Tensor:
    """Positions (read_split()) of the images that pretraining with `seed` trained and validated on."""
    _, labels, positions = read_split(TARGETS[cfg.source], cfg.data_dir, train=True)
    train_idx, val_idx = draw_subset(cfg.source, cfg.n_pretrain, torch.arange(len(labels)), seed)
    return positions[torch.cat([train_idx, val_idx])]


def available_images(cfg: Config, target: str, seed: int) -> tuple[torch.Tensor, str]:
    """Indices of the target's training split that its runs of `seed` draw from, and what they are: every
    image, or with --disjoint those that its backbone was not pretrained on."""
    _, labels, positions = read_split(TARGETS[target], cfg.data_dir, train=True)
    everything = torch.arange(len(labels))
    if not (cfg.disjoint and shares_images(cfg.source, target)):
        return everything, target
    seen = torch.isin(positions, pretraining_images(cfg, backbone_seed(cfg, seed)))
    return everything[~seen], f"{target} without the {int(seen.sum())} images that pretraining used"


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 28, 28) -> float (N, 1, 28, 28), normalised once for the whole set."""
    normalized = ((images.float() / 255 - MNIST_MEAN) / MNIST_STD).unsqueeze(1)
    return normalized.contiguous(memory_format=torch.channels_last)  # see LitModule.__init__


class TensorLoader:
    """Batches sliced from two in-memory tensors, in a fixed order (the post does not shuffle).

    Stands in for DataLoader(TensorDataset(...)): the data is a few MB, so per-sample indexing and
    collation only cost (DataLoader made target runs 21% and pretraining 12% slower, measured).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int):
        self.images, self.labels, self.batch_size = images, labels, batch_size

    def __len__(self) -> int:
        return math.ceil(len(self.labels) / self.batch_size)

    def __iter__(self):
        for start in range(0, len(self.labels), self.batch_size):
            stop = start + self.batch_size
            yield self.images[start:stop], self.labels[start:stop]

    def to(self, device: torch.device) -> TensorLoader:
        """The same batches, with the data moved to `device` once rather than once per step."""
        return TensorLoader(self.images.to(device), self.labels.to(device), self.batch_size)


def load_data(target: str, n_train: int, data_dir: str, seed: int, available: torch.Tensor | None = None
              ) -> tuple[TensorLoader, TensorLoader, TensorLoader, tuple[str, ...]]:
    """Train, validation and test loaders of a registered target, and its label names.

    n_train training and n_train/4 validation images are drawn from the training split (from its
    `available` indices only, if given); the test loader holds the whole test split.
    """
    spec = TARGETS[target]
    images, labels, _ = read_split(spec, data_dir, train=True)
    test_images, test_labels, _ = read_split(spec, data_dir, train=False)
    train_idx, val_idx = draw_subset(target, n_train, torch.arange(len(labels)) if available is None else available,
                                     seed)
    train_loader = TensorLoader(normalize(images[train_idx]), labels[train_idx], TRAIN_BATCH_SIZE)
    val_loader = TensorLoader(normalize(images[val_idx]), labels[val_idx], EVAL_BATCH_SIZE)
    test_loader = TensorLoader(normalize(test_images), test_labels, EVAL_BATCH_SIZE)
    return train_loader, val_loader, test_loader, spec.label_names


def check_data(cfg: Config) -> None:
    """Fail before pretraining, not half an hour later, when a dataset, its labels or a size is wrong."""
    for name, sizes, flag in [(cfg.source, [cfg.n_pretrain], "--n-pretrain")] + [
        (name, cfg.n_train, "--n-train") for name in cfg.targets
    ]:
        target = TARGETS[name]
        try:
            _, labels, _ = read_split(target, cfg.data_dir, train=True)
            _, test_labels, _ = read_split(target, cfg.data_dir, train=False)
        except LabelError as err:
            raise ExperimentError(f"target {name}: {err}; fix its entry in TARGETS") from None
        for split_labels in (labels, test_labels):
            wrong = split_labels[(split_labels < 0) | (split_labels >= len(target.label_names))]
            if len(wrong):
                raise ExperimentError(
                    f"target {name} has label {wrong[0].item()}, outside its {len(target.label_names)} label names "
                    f"({', '.join(target.label_names[:4])}{', ...' if len(target.label_names) > 4 else ''}); "
                    f"fix its entry in TARGETS")
        for n_train in sizes:
            if flag == "--n-pretrain":
                split_sizes(n_train, len(labels), flag, target.folder or name)
            for seed in range(cfg.seed, cfg.seed + cfg.seeds) if flag == "--n-train" else []:
                available, where = available_images(cfg, name, seed)
                split_sizes(n_train, len(available), flag, target.folder or where)


def describe_subsets(cfg: Config) -> list[str]:
    """Per target and n_train, over the seeds: training and validation images per class, and how many of
    them pretraining saw (the backbone of that seed, on the same files)."""
    lines, seeds = [], range(cfg.seed, cfg.seed + cfg.seeds)
    span = lambda values: f"{min(values)}" if min(values) == max(values) else f"{min(values)}-{max(values)}"  # noqa: E731
    for name in cfg.targets:
        names = TARGETS[name].label_names
        _, labels, positions = read_split(TARGETS[name], cfg.data_dir, train=True)
        for n_train in cfg.n_train:
            counts, seen = [], []
            for seed in seeds:
                subsets = draw_subset(name, n_train, available_images(cfg, name, seed)[0], seed)
                counts.append([torch.bincount(labels[idx], minlength=len(names)).tolist() for idx in subsets])
                pretrained_on = pretraining_images(cfg, backbone_seed(cfg, seed)) if shares_images(cfg.source, name) \
                    else torch.empty(0, dtype=torch.long)
                seen.append([int(torch.isin(positions[idx], pretrained_on).sum()) for idx in subsets])
            per_class = ", ".join(f"{label} {span([c[0][k] for c in counts])} + {span([c[1][k] for c in counts])}"
                                  for k, label in enumerate(names))
            overlap = (f"pretraining saw {span([s[0] for s in seen])} of the training and {span([s[1] for s in seen])} "
                       f"of the validation images" + ("" if cfg.disjoint else " (--disjoint keeps them apart)")
                       if shares_images(cfg.source, name) else f"pretraining ({cfg.source}) saw none of them")
            lines.append(f"{name}: {n_train} training + {validation_size(n_train)} validation images a run"
                         f"{f', seeds {seeds[0]}-{seeds[-1]}' if len(seeds) > 1 else ''}; per class {per_class}; "
                         f"{overlap}")
    return lines


# ---- Model --------------------------------------------------------------------------------
BACKBONE_FEATURES = 120  # width of decapitated_lenet()'s output


def decapitated_lenet() -> nn.Sequential:
    """LeNet-5's three convolution blocks without its classifier: (N, 1, 28, 28) -> (N, 120)."""
    return nn.Sequential(
        nn.Conv2d(1, 6, kernel_size=5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(kernel_size=2, stride=2),
        nn.Conv2d(6, 16, kernel_size=5),
        nn.ReLU(),
        nn.MaxPool2d(kernel_size=2, stride=2),
        nn.Conv2d(16, BACKBONE_FEATURES, kernel_size=5),
        nn.ReLU(),
        nn.Flatten(),
    )


def classification_head(n_classes: int) -> nn.Sequential:
    """The part of LeNet-5 that decapitated_lenet() cut off: 120 -> 84 -> n_classes."""
    return nn.Sequential(nn.Linear(BACKBONE_FEATURES, 84), nn.ReLU(), nn.Linear(84, n_classes))


# ---- Augmentation (optional: delete this section, --augment and the `augment` lines of LitModule) ----
class Augment:
    """A random affine transform per image, drawn from its own generator on the images' device: the same
    seed gives the same transforms, and each call (each batch, each epoch) new ones. Small rotations,
    scalings and shifts keep a digit a digit; no flips (a mirrored 2 is no digit). Measured at 200 labels, one
    thread, on the 2-core AMD EPYC: a target epoch takes 31.1 ms with it against 29.7 ms without (+5%)."""

    ROTATION, SCALING, SHIFT = math.radians(10), 0.1, 2 / 14  # up to 10 degrees, 10%, 2 of the 28 pixels

    def __init__(self, seed: int):
        # a stream of its own: seeded with the run's seed, as the weights are, its first rotation angles
        # were a rescaling of conv1's initial weights
        self.seed, self.generator = zlib.crc32(f"augment/{seed}".encode()), None

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.generator is None or self.generator.device != images.device:
            self.generator = torch.Generator(images.device).manual_seed(self.seed)
        angle, scale, dx, dy = (torch.rand(4, len(images), generator=self.generator, device=images.device) * 2 - 1) \
            * torch.tensor([self.ROTATION, self.SCALING, self.SHIFT, self.SHIFT], device=images.device)[:, None]
        cos, sin = torch.cos(angle) / (1 + scale), torch.sin(angle) / (1 + scale)
        theta = torch.stack([torch.stack([cos, -sin, dx], 1), torch.stack([sin, cos, dy], 1)], 1)
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        # border padding: the pixels shifted in are the background's, not 0 (which normalised is grey)
        moved = F.grid_sample(images, grid, padding_mode="border", align_corners=False)
        return moved.contiguous(memory_format=torch.channels_last)


# ---- LightningModule ----------------------------------------------------------------------
class LitModule(lightning.LightningModule):
    """Backbone plus a swappable classification head, trained with cross-entropy and Adam."""

    def __init__(self, label_names: typing.Sequence[str], learning_rate: float, train_backbone: bool = True,
                 augment_seed: int | None = None):
        super().__init__()
        self.save_hyperparameters()  # into every checkpoint and hparams.yaml
        self.convnet = decapitated_lenet()
        self.classification_head = classification_head(len(label_names))
        self.set_stage(learning_rate, train_backbone)
        # channels-last convolutions and pooling: NCHW makes target runs 12% and pretraining 42% slower here
        self.convnet.to(memory_format=torch.channels_last)
        self.augment = None if augment_seed is None else Augment(augment_seed)
        self.epochs_before = 0  # epochs of an earlier stage (LP-FT): this stage's epochs count on from there
        self._epoch_sums: dict[str, torch.Tensor] = {}  # per stage: summed loss and correct predictions
        self._epoch_counts: dict[str, int] = {}  # per stage: samples seen

    def set_stage(self, learning_rate: float, train_backbone: bool) -> None:
        """What trains, and how fast, from the next fit on; the only place that freezes. A frozen backbone
        is a fixed feature extractor: no gradients, no optimizer state, only the head learns."""
        self.hparams.learning_rate, self.hparams.train_backbone = learning_rate, train_backbone
        self.convnet.requires_grad_(train_backbone)

    def epoch(self) -> int:
        """The epoch being run, counted from 1 and on across stages, as in every log, table and file."""
        return self.epochs_before + self.current_epoch + 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classification_head(self.convnet(x))

    def _shared_step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        images, labels = batch
        logits = self(images)
        loss = F.cross_entropy(logits, labels)
        # Add the epoch up here and log it once at its end: self.log() costs ~0.6 ms a call in Lightning
        # 2.6; logging every step made target runs 6% and pretraining 10% slower, measured.
        batch_sums = torch.stack([loss.detach() * len(labels), (logits.argmax(dim=1) == labels).sum().float()])
        self._epoch_sums[stage] = self._epoch_sums.get(stage, 0) + batch_sums
        self._epoch_counts[stage] = self._epoch_counts.get(stage, 0) + len(labels)
        return loss

    def _log_epoch(self, stage: str) -> None:
        """The epoch's mean loss and accuracy as <metric>/<stage>: train, val and test read alike.

        TensorBoard's step axis is the epoch, counted from 1 as everywhere else in this script; the
        test metrics are written there by fit_and_test(), at the best epoch whose weights they test.
        """
        mean_loss, accuracy = self._epoch_sums.pop(stage) / self._epoch_counts.pop(stage)
        metrics = {f"ce_loss/{stage}": mean_loss, f"accuracy/{stage}": accuracy}
        self.log_dict(metrics, logger=False)  # for EarlyStopping, KeepBestWeights and trainer.test()'s result
        if self.logger is not None and stage != "test":
            self.logger.log_metrics({key: value.item() for key, value in metrics.items()}, step=self.epoch())

    def training_step(self, batch, batch_idx):
        images, labels = batch
        if self.augment is not None:  # training batches only: validation and test images stay as they are
            images = self.augment(images)
        return self._shared_step((images, labels), "train")

    def validation_step(self, batch, batch_idx):
        return self._shared_step(batch, "val")

    def test_step(self, batch, batch_idx):
        return self._shared_step(batch, "test")

    def on_train_epoch_end(self):
        self._log_epoch("train")

    def on_validation_epoch_end(self):
        self._log_epoch("val")

    def on_test_epoch_end(self):
        self._log_epoch("test")

    def configure_optimizers(self):
        trainable = [p for p in self.parameters() if p.requires_grad]
        # fused: one kernel for all tensors; the CPU default makes pretraining 14% slower, measured
        return torch.optim.Adam(trainable, lr=self.hparams.learning_rate, fused=True)

    def parameter_counts(self) -> dict[str, int]:
        """Trainable and total parameters: logged with every run, so a frozen backbone shows."""
        return {"trainable_params": sum(p.numel() for p in self.parameters() if p.requires_grad),
                "total_params": sum(p.numel() for p in self.parameters())}


def read_backbone(checkpoint_path: str) -> dict[str, torch.Tensor]:
    """The backbone tensors of a pretrain() checkpoint, read once (weights_only: no code runs) and shared by
    every target run: in this process, or through Ray's object store."""
    try:
        state_dict = torch.load(checkpoint_path, map_location="cpu", weights_only=True)["state_dict"]
    except Exception as err:  # missing file, not a checkpoint, not loadable with weights_only
        raise ExperimentError(f"cannot read a Lightning checkpoint from {checkpoint_path}: {err}") from None
    prefix = "convnet."
    backbone = {key.removeprefix(prefix): value for key, value in state_dict.items() if key.startswith(prefix)}
    try:  # strict: every backbone tensor must be there with the right shape (checked on the meta device: no RNG draws)
        with torch.device("meta"):
            decapitated_lenet().load_state_dict(backbone, strict=True, assign=True)
    except RuntimeError as err:
        first_line = str(err).splitlines()[1].strip() if "\n" in str(err) else str(err)
        raise ExperimentError(f"{checkpoint_path} does not hold this script's backbone: {first_line}") from None
    logger.info(f"Pretrained backbone: {len(backbone)} tensors from {checkpoint_path}")
    return backbone


def save_backbone(backbone: dict[str, torch.Tensor], checkpoint_path: str) -> None:
    """A backbone as a checkpoint that read_backbone() reads."""
    os.makedirs(os.path.dirname(checkpoint_path), exist_ok=True)
    torch.save({"state_dict": {f"convnet.{key}": value for key, value in backbone.items()}}, checkpoint_path)


def transfer_backbone(module: LitModule, backbone: dict[str, torch.Tensor]) -> None:
    """Copy the pretrained backbone (read_backbone()) into `module`; its head stays fresh."""
    module.convnet.load_state_dict(backbone, strict=True)


# ---- Experiment ---------------------------------------------------------------------------
@dataclasses.dataclass
class RunResult:
    """One run: a row of the results CSV (every field but `seconds`, which differs between identical runs).
    Losses and accuracies are kept to 6 significant digits, as the CSV holds them, so that a summary
    rebuilt from the CSV (--report) is the very summary of the run."""

    target: str
    mode: str
    seed: int
    n_train: int
    best_epoch: int  # counted from 1, as in the progress lines and TensorBoard
    test_loss: float
    test_acc: float
    learning_rate: float  # Adam's; for a two-stage arm, the fine-tuning stage's
    val_loss: float  # the best validation loss: what selects the best epoch, and the rate from --lr-grid
    selected: bool  # the rate chosen for its (target, mode, n_train, seed); every run is, without a grid
    max_epochs: int  # the epoch budget: a best epoch near it means the run was still improving
    seconds: float = dataclasses.field(default=math.nan, metadata={"csv": False})  # wall time of the run


RESULT_COLUMNS = tuple(f.name for f in dataclasses.fields(RunResult) if f.metadata.get("csv", True))


def not_nan(loss: float) -> float:
    """A loss to compare: NaN (a diverged run) counts as the worst."""
    return math.inf if math.isnan(loss) else loss


class KeepBestWeights(lightning.Callback):
    """Remembers the weights of the epoch with the lowest validation loss.

    This is what the post means by "Lightning model checkpoint 'best'", kept in memory: writing a
    ModelCheckpoint file at every improvement made target runs 17% slower, measured. fit_best()
    restores these weights at the end of the fit.
    """

    def __init__(self, monitor: str = MONITOR):
        self.monitor = monitor
        self.best_loss = math.inf
        self.best_epoch = 0  # counted from 1; 0 until the first validation
        self.best_state: dict[str, torch.Tensor] | None = None

    def on_validation_end(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule) -> None:
        loss = trainer.callback_metrics[self.monitor].item()
        if self.best_state is None or not_nan(loss) < not_nan(self.best_loss):  # a diverged run keeps its first epoch
            self.best_loss, self.best_epoch = loss, pl_module.epoch()
            self.best_state = {key: value.detach().clone() for key, value in pl_module.state_dict().items()}


class ProgressLog(lightning.Callback):
    """A few log lines per run. Lightning's progress bar, redrawn at every step, made target runs 14%
    and pretraining 19% slower; these lines cost too little to measure."""

    def __init__(self, run_name: str, keep_best: KeepBestWeights, lines: int = PROGRESS_LINES):
        self.run_name, self.keep_best, self.lines = run_name, keep_best, lines

    def on_validation_end(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule) -> None:
        epoch, last = pl_module.epoch(), pl_module.epochs_before + trainer.max_epochs
        if epoch % max(1, last // self.lines) == 0 or epoch == last:
            loss = trainer.callback_metrics[self.keep_best.monitor].item()
            logger.info(f"{self.run_name}: epoch {epoch}/{last}, val loss {loss:.4f}, "
                        f"best {self.keep_best.best_loss:.4f} at epoch {self.keep_best.best_epoch}")

    def on_train_end(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule) -> None:
        if trainer.current_epoch < trainer.max_epochs:  # EarlyStopping ended the run
            last = pl_module.epochs_before + trainer.max_epochs
            logger.info(f"{self.run_name}: stopped after epoch {pl_module.epochs_before + trainer.current_epoch}/"
                        f"{last}, no better validation loss since epoch {self.keep_best.best_epoch}")


def fit_best(
    module: LitModule,
    loaders: tuple[TensorLoader, TensorLoader],
    run_name: str,
    max_epochs: int,
    cfg: Config,
    sub_dir: str | None = None,
    keep_best: KeepBestWeights | None = None,
) -> tuple[lightning.Trainer, KeepBestWeights]:
    """Train for up to max_epochs and restore the best-validation weights, those of an earlier stage if
    `keep_best` (its tracker) holds better ones; log to TensorBoard under <log_dir>/<run_name>/<version>[/<sub_dir>]."""
    tb_logger = lightning.pytorch.loggers.TensorBoardLogger(
        cfg.log_dir, name=run_name, version=cfg.version, sub_dir=sub_dir,
        default_hp_metric=False,  # no -1 placeholder in the HPARAMS tab
    )
    keep_best = keep_best or KeepBestWeights()
    callbacks = [keep_best, ProgressLog(run_name, keep_best)]
    if cfg.patience:
        callbacks.append(lightning.pytorch.callbacks.EarlyStopping(MONITOR, patience=cfg.patience, mode="min"))
    dry = {"limit_train_batches": DRY_RUN_BATCHES, "limit_val_batches": DRY_RUN_BATCHES,
           "limit_test_batches": DRY_RUN_BATCHES} if cfg.dry_run else {}
    trainer = lightning.Trainer(
        max_epochs=1 if cfg.dry_run else max_epochs,
        accelerator=cfg.accelerator,
        devices=cfg.devices,
        logger=tb_logger,
        callbacks=callbacks,
        # same seed, same numbers; "warn" rather than fail where CUDA lacks a deterministic kernel (nll_loss)
        deterministic="warn",
        enable_checkpointing=False,  # KeepBestWeights does the model selection
        enable_progress_bar=False,  # ProgressLog reports instead
        enable_model_summary=False,
        num_sanity_val_steps=0,  # nothing to sanity-check: the same step runs at the end of epoch 1
        log_every_n_steps=1,  # metrics are per epoch anyway; this stops a warning about 2-step epochs
        **dry,
    )
    device = trainer.strategy.root_device
    train_loader, val_loader = (loader.to(device) for loader in loaders)
    try:
        trainer.fit(module, train_loader, val_loader)
    except SystemExit:  # Lightning turns Ctrl-C into sys.exit(1) after shutting the run down
        if trainer.interrupted:
            raise KeyboardInterrupt from None
        raise
    if trainer.interrupted:  # older Lightning returns from fit() instead
        raise KeyboardInterrupt
    module.load_state_dict(keep_best.best_state)
    return trainer, keep_best


def fit_and_test(
    module: LitModule,
    loaders: tuple[TensorLoader, TensorLoader, TensorLoader],
    run_name: str,
    max_epochs: int,
    cfg: Config,
    hparams: dict,
    sub_dir: str | None = None,
    keep_best: KeepBestWeights | None = None,
) -> tuple[lightning.Trainer, KeepBestWeights, dict[str, float]]:
    """fit_best(), then test the best-validation weights and log the run's hyperparameters with the result."""
    trainer, keep_best = fit_best(module, loaders[:2], run_name, max_epochs, cfg, sub_dir, keep_best)
    trainer.test(module, loaders[2].to(trainer.strategy.root_device), verbose=False)
    metrics = {key: trainer.callback_metrics[key].item() for key in ("ce_loss/test", "accuracy/test")}
    # HPARAMS tab: one row per run, compared on the test metrics, which it also logs as scalars at the best epoch
    trainer.logger.log_hyperparams({**hparams, "best_epoch": keep_best.best_epoch}, metrics=metrics,
                                   step=keep_best.best_epoch)
    trainer.logger.finalize("success")  # flush now: trainer.test() already closed the file once
    return trainer, keep_best, metrics


def six_digits(value: float) -> float:
    """float32 metrics printed in full carry noise (0.9754999876022339): 6 significant digits hold them,
    the digits the CSV writes, so a run read back from it is the run."""
    return float(csv_text(value))


def run_result(hparams: dict, keep_best: KeepBestWeights, metrics: dict, started: float) -> RunResult:
    result = RunResult(hparams["target"], hparams["mode"], hparams["seed"], hparams["n_train"], keep_best.best_epoch,
                       six_digits(metrics["ce_loss/test"]), six_digits(metrics["accuracy/test"]),
                       hparams["learning_rate"], six_digits(keep_best.best_loss), True, hparams["max_epochs"],
                       seconds=time.perf_counter() - started)
    return result


def result_line(r: RunResult) -> str:
    """A finished run in the console, printed once its row is in the CSV."""
    return (f"{r.target}/{r.mode}: best epoch {r.best_epoch}, test loss {r.test_loss:.4f}, test accuracy "
            f"{r.test_acc:.4f}, {r.seconds:.1f} s")


def pretrain_checkpoint(cfg: Config, seed: int) -> str:
    """Where pretrain() writes the backbone that the target runs (of this seed) start from."""
    per_seed = [f"seed{seed}"] if cfg.backbone_per_seed else []
    return os.path.join(cfg.log_dir, "pretrain", cfg.version, *per_seed, "checkpoints", "best.ckpt")


def pretrain(cfg: Config, seed: int) -> tuple[str, RunResult]:
    """Train a model on the source's classes (MNIST's 10 digits); return its best checkpoint and result."""
    started = time.perf_counter()
    logger.info(f"Pretraining on {cfg.n_pretrain} {cfg.source} images, all {len(TARGETS[cfg.source].label_names)} classes")
    train_loader, val_loader, test_loader, label_names = load_data(cfg.source, cfg.n_pretrain, cfg.data_dir, seed)
    lightning.seed_everything(seed, verbose=False)
    module = LitModule(label_names, learning_rate=cfg.pretrain_lr)
    hparams = {"target": cfg.source, "mode": "pretrain", "seed": seed, "n_train": cfg.n_pretrain,
               "learning_rate": cfg.pretrain_lr, "max_epochs": cfg.pretrain_epochs, **module.parameter_counts()}
    trainer, keep_best, metrics = fit_and_test(module, (train_loader, val_loader, test_loader), "pretrain",
                                               cfg.pretrain_epochs, cfg, hparams,
                                               sub_dir=f"seed{seed}" if cfg.backbone_per_seed else None)
    # the module holds the best-validation weights now: that is the checkpoint to transfer
    checkpoint_path = pretrain_checkpoint(cfg, seed)
    try:
        trainer.save_checkpoint(checkpoint_path, weights_only=True)
    except RuntimeError as err:  # torch reports a full disk as a RuntimeError of its zip writer
        raise OSError(f"cannot write {checkpoint_path} ({err})") from None
    logger.info(f"Best pretraining checkpoint: {checkpoint_path}")
    return checkpoint_path, run_result(hparams, keep_best, metrics, started)


def train(backbone: dict[str, torch.Tensor], target: str, mode: str, cfg: Config, seed: int, n_train: int,
          learning_rate: float | None = None) -> RunResult:
    """Train one arm on a target, at `learning_rate` (default: the arm's, as --lr sets it): from the
    pretrained backbone if the arm says so, else from scratch; the backbone learns or stays
    frozen as the arm says, or (LP-FT) stays frozen while the head alone trains first."""
    started = time.perf_counter()
    arm, learning_rate = ARMS[mode], learning_rate or cfg.lr[mode]
    logger.info(f"{target}/{mode}: {n_train} training images, seed {seed}, learning rate {learning_rate:g}")
    train_loader, val_loader, test_loader, label_names = load_data(target, n_train, cfg.data_dir, seed,
                                                                   available_images(cfg, target, seed)[0])
    # Same seed for every arm: same subset (above) and the same fresh head
    lightning.seed_everything(seed, verbose=False)
    module = LitModule(label_names, learning_rate=learning_rate, train_backbone=arm.train_backbone,
                       augment_seed=seed if cfg.augment else None)  # every arm of a seed: the same transforms
    if arm.pretrained:
        transfer_backbone(module, backbone)
    hparams = {"target": target, "mode": mode, "seed": seed, "n_train": n_train, "learning_rate": learning_rate,
               "max_epochs": cfg.train_epochs, **module.parameter_counts()}
    logger.info(f"{target}/{mode}: {hparams['trainable_params']} of {hparams['total_params']} parameters train")
    run_name, sub_dir = f"{target}/{mode}", f"n{n_train}_seed{seed}" + (f"_lr{learning_rate:g}" if cfg.lr_grid else "")
    loaders, keep_best = (train_loader, val_loader, test_loader), None
    if arm.head_fraction:
        # Two fits rather than Lightning's BackboneFinetuning callback: that callback needs a `backbone`
        # attribute and adds an optimizer param group mid-fit, which breaks fused Adam's assumptions,
        # schedulers and resumed checkpoints. Here each stage is a plain fit with a fresh Adam; the second
        # continues the first one's epoch count and best-weights tracker, so the run is tested with the best
        # epoch of either stage (the head's, if fine-tuning never improves on it).
        module.set_stage(arm.head_lr, train_backbone=False)
        head_epochs = max(1, round(arm.head_fraction * cfg.train_epochs))
        trainer, keep_best = fit_best(module, loaders[:2], run_name, head_epochs, cfg, sub_dir)
        module.epochs_before = trainer.current_epoch
        module.set_stage(learning_rate, train_backbone=True)
    _, keep_best, metrics = fit_and_test(module, loaders, run_name, max(1, cfg.train_epochs - module.epochs_before),
                                         cfg, hparams, sub_dir, keep_best)
    return run_result(hparams, keep_best, metrics, started)


def selection_group(r: RunResult | tuple, select: str) -> tuple:
    """The runs among which one learning rate is selected: a (target, mode, n_train, seed), or with pooled
    selection every seed of a (target, mode, n_train). Takes a row or a run of sweep_runs()."""
    target, mode, seed, n_train = run_key(r)[:4] if isinstance(r, RunResult) else r[:4]
    return (target, mode, n_train) + ((seed,) if select == "seed" else ())


def select_rates(results: list[RunResult], select: str = "seed") -> list[RunResult]:
    """Mark, in each selection group, the runs of the rate with the lowest best-validation loss, averaged
    over seeds when pooled, as selected (the lower rate on a tie). Test data never enters the choice."""
    groups: dict[tuple, dict[float, list[float]]] = {}
    for r in results:
        groups.setdefault(selection_group(r, select), {}).setdefault(r.learning_rate, []).append(r.val_loss)
    best = {group: min(rates, key=lambda rate: (not_nan(sum(rates[rate]) / len(rates[rate])), rate))
            for group, rates in groups.items()}
    for r in results:
        r.selected = best[selection_group(r, select)] == r.learning_rate
    return results


def settle(results: list[RunResult], select: str, grid: typing.Iterable[float] = ()) -> list[RunResult]:
    """select_rates() in every complete selection group of rows read back (--report). A group that lacks a
    rate of `grid` (the sweeps' saved --lr-grid), or a rate or seed that its (target, mode, n_train) has
    elsewhere, the grid an interrupted sweep left half done, gets no selected row: it is not in the
    summary until --resume completes it."""
    grids: dict[tuple, tuple[set, set]] = {}  # (target, mode, n_train) -> (seeds, rates)
    groups: dict[tuple, list[RunResult]] = {}
    for r in results:
        seeds, rates = grids.setdefault((r.target, r.mode, r.n_train), (set(), set(grid) if r.mode in ARMS else set()))
        seeds.add(r.seed)
        rates.add(r.learning_rate)
        groups.setdefault(selection_group(r, select), []).append(r)
    for group in groups.values():
        seeds, rates = grids[(group[0].target, group[0].mode, group[0].n_train)]
        seeds = seeds if select == "pooled" else {group[0].seed}
        if {(r.seed, r.learning_rate) for r in group} >= {(s, rate) for s in seeds for rate in rates}:
            select_rates(group, select)
        else:
            for r in group:
                r.selected = False
    return results


def csv_text(value: typing.Any) -> str:
    """A CSV cell; floats to 6 significant digits (see six_digits)."""
    return f"{value:.6g}" if isinstance(value, float) else str(value).lower() if isinstance(value, bool) else str(value)


def csv_row(r: RunResult) -> list[str]:
    """A run's CSV cells; its learning rate exactly as given (repr), so that --resume recognises every rate."""
    return [repr(r.learning_rate) if column == "learning_rate" else csv_text(getattr(r, column))
            for column in RESULT_COLUMNS]


class ResultsCsv:
    """Appends each finished run's row at once, so an interrupted experiment keeps what it finished."""

    def __init__(self, path: str, append: bool = False):
        self.path, self.rows = path, 0
        if not append:
            with open(path, "w", newline="") as f:
                csv.writer(f).writerow(RESULT_COLUMNS)

    def rewrite(self, results: list[RunResult]) -> None:
        """Replace the file by these rows in this order, in one step (the old file stays if writing fails)."""
        partial = f"{self.path}.partial"
        with open(partial, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(RESULT_COLUMNS)
            writer.writerows(csv_row(r) for r in results)
        os.replace(partial, self.path)
        self.rows = len(results)

    def append(self, result: RunResult) -> None:
        row = csv_row(result)
        line = io.StringIO()
        csv.writer(line).writerow(row)
        data = line.getvalue().encode()
        with open(self.path, "ab", buffering=0) as f:
            end = f.seek(0, os.SEEK_END)
            try:
                while data:
                    data = data[f.write(data):]
            except OSError:  # a full disk: cut the half-written row, the finished ones stay intact
                f.truncate(end)
                raise
        self.rows += 1


def sweep_runs(cfg: Config) -> list[tuple[str, str, int, int, float]]:
    """Every target run of a sweep, (target, mode, seed, n_train, learning_rate), in the results' order."""
    return [(target, mode, seed, n_train, learning_rate)
            for target in cfg.targets
            for n_train in cfg.n_train
            for seed in range(cfg.seed, cfg.seed + cfg.seeds)
            for mode in cfg.modes
            for learning_rate in cfg.lr_grid or (cfg.lr[mode],)]


def describe_run(run: tuple) -> str:
    target, mode, seed, n_train, learning_rate = run
    return f"{target}/{mode} n_train {n_train} seed {seed} lr {learning_rate:g}"


def pretraining_runs(cfg: Config) -> list[tuple[str, str, int, int, float]]:
    """The pretraining runs, in sweep_runs()'s form: one for the invocation, or one per seed."""
    seeds = dict.fromkeys(backbone_seed(cfg, seed) for seed in range(cfg.seed, cfg.seed + cfg.seeds))
    return [(cfg.source, "pretrain", seed, cfg.n_pretrain, cfg.pretrain_lr) for seed in seeds]


def execute(cfg: Config, run: tuple, backbone: dict | None) -> tuple[RunResult, dict | None]:
    """One run, here: a pretraining returns the backbone it made too; a target run starts from `backbone`."""
    target, mode, seed, n_train, learning_rate = run
    if mode == "pretrain":
        checkpoint_path, result = pretrain(cfg, seed)
        return result, read_backbone(checkpoint_path)
    return train(backbone, target, mode, cfg, seed, n_train, learning_rate), None


def run_here(cfg: Config, jobs: dict, finished: Callable) -> None:
    """Each (run, backbone) of `jobs` in this process, one after the other; finished(key, result, backbone)."""
    for key, (run, backbone) in jobs.items():
        StopSignal.check()
        result, backbone = execute(cfg, run, backbone)
        finished(key, result, backbone)
        logger.info(result_line(result))


def run_experiment(cfg: Config, csv_out: ResultsCsv, resumed: Resumed | None = None,
                   on_pretrained: Callable[[int], None] | None = None) -> list[RunResult]:
    """Pretrain (once, or once per seed), then run every arm on every target, training-set size and seed,
    once per rate of --lr-grid, in this process or on Ray (--workers, --cluster). Rows go to the CSV as
    their runs finish; at the end the CSV holds them in the order of pretraining_runs() and sweep_runs(),
    whatever order they finished in. A resumed sweep skips the runs, pretraining included, that its CSV
    holds already. on_pretrained(seed) is called once seed's backbone checkpoint is written."""
    pretraining, runs = pretraining_runs(cfg), sweep_runs(cfg)
    grids: dict[tuple, list[int]] = {}  # the runs among which one rate is selected
    for index, run in enumerate(runs):
        grids.setdefault(selection_group(run, cfg.select), []).append(index)
    earlier = {run_key(r): r for r in resumed.rows} if resumed else {}
    done = {index: earlier[run] for index, run in enumerate(runs) if run in earlier}
    backbones = {run[2]: read_backbone(resumed.checkpoints[run[2]]) for run in pretraining if run in earlier}

    def in_order() -> list[RunResult]:
        return [earlier[run] for run in pretraining if run in earlier] + [done[i] for i in sorted(done)]

    def pretrained(seed: int, result: RunResult, backbone: dict) -> None:
        earlier[run_key(result)], backbones[seed] = result, backbone
        csv_out.append(result)
        if not os.path.isfile(pretrain_checkpoint(cfg, seed)):  # pretrained on another node: keep it for --resume
            save_backbone(backbone, pretrain_checkpoint(cfg, seed))
        if on_pretrained:
            on_pretrained(seed)
        StopSignal.check()

    def finished(index: int, result: RunResult, _=None) -> None:
        """Every row goes to the CSV as its run finishes, `selected` false until its grid is complete; then
        the grid's choice is made and the CSV rewritten with it."""
        done[index] = result
        grid = grids[selection_group(runs[index], cfg.select)]
        complete = all(i in done for i in grid)
        result.selected = complete
        if complete and len(grid) > 1:
            select_rates([done[i] for i in grid], cfg.select)
            csv_out.rewrite(in_order())
        else:
            csv_out.append(result)
        # Free the finished run now: Lightning's reference cycles keep its tensors until the cyclic
        # collector happens to run. Measured: without this, resident memory grew from 1.1 to 1.45 GB
        # over 24 runs (2.7 GB over 121); each collection takes 0.16 s.
        with StopSignal.deferred():
            gc.collect()

    todo = {index: run for index, run in enumerate(runs) if index not in done}
    if resumed:
        logger.info(f"Resuming {csv_out.path}: {len(done)} of {len(runs)} target runs and {len(backbones)} of "
                    f"{len(pretraining)} pretraining runs done, skipped; {len(todo)} target runs remain")
    threads = run_threads(cfg)
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(threads or torch_threads)  # pretraining too: the same --threads, the same numbers
    try:
        # Ray starts first: a cluster that cannot be reached fails before pretraining, not after it
        with RaySweep(cfg, threads) if cfg.workers > 1 or cfg.cluster else contextlib.nullcontext() as engine:
            run_all = engine.run if engine is not None else functools.partial(run_here, cfg)
            run_all({run[2]: (run, None) for run in pretraining if run[2] not in backbones}, pretrained)
            backbone_of = {run[2]: backbones[backbone_seed(cfg, run[2])] for run in runs}
            run_all({index: (run, backbone_of[run[2]]) for index, run in todo.items()}, finished)
    finally:
        torch.set_num_threads(torch_threads)
    for grid in grids.values():  # grids completed by rows of an earlier, interrupted invocation too
        select_rates([done[i] for i in grid], cfg.select)
    results = in_order()
    csv_out.rewrite(results)
    return results


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def run_threads(cfg: Config) -> int | None:
    """Torch threads of every run, pretraining included: --threads; else the machine's cores shared out among
    --workers; 1 per run on a cluster; in one process, torch's own choice (None)."""
    if cfg.threads:
        return cfg.threads
    if cfg.workers > 1:
        return max(1, available_cores() // cfg.workers)
    return 1 if cfg.cluster else None


# ---- Resume (optional: delete this section, --resume and the `resumed` lines of main() and
# run_experiment()) ----
# What a resumed sweep may change: where things are and how the runs are spread, not what a run computes.
# --threads may change too, with a warning: it changes the order of float sums, so a whole run's numbers
RESUME_MAY_CHANGE = {"data_dir", "log_dir", "results_csv", "workers", "threads", "cluster", "gpus_per_run",
                     "devices", "resume"}
CODE_END = "# ---- Reporting"  # the code above this line makes the rows; what is below only reports them


@dataclasses.dataclass
class Resumed:
    """What an interrupted sweep left: its rows, pretraining included, its backbones' checkpoints and what
    made its rows (made_by())."""

    rows: list[RunResult]
    checkpoints: dict[int, str]  # pretraining seed -> checkpoint
    made_by: dict[str, typing.Any]


def run_key(r: RunResult) -> tuple:
    """A run's place in pretraining_runs() or sweep_runs(): what identifies it, as a CSV row holds it."""
    return (r.target, r.mode, r.seed, r.n_train, r.learning_rate)


def settings_path(csv_path: str | Path) -> Path:
    """The settings of the sweep whose rows are in csv_path, saved beside it at its start."""
    return Path(csv_path).with_suffix(".json")


def sha256(path: str | Path, text: str | None = None) -> str:
    return hashlib.sha256(text.encode() if text is not None else Path(path).read_bytes()).hexdigest()


def made_by(threads: int, accelerator: str) -> dict[str, typing.Any]:
    """What makes a row besides the settings: this script's code (a digest of everything above the reporting
    section but the module docstring, and one of the whole file), the libraries, the kind of CPU, the torch
    threads and the accelerator."""
    script = Path(__file__).read_text()
    code = script[script.index('"""', 4) + 3:script.index(f"\n{CODE_END}")]  # not the docstring's headline
    versions = {}
    for package in ("torch", "torchvision", "lightning", "ray"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return {"code_sha256": sha256("", code), "script_sha256": sha256("", script), **versions,
            "cpu": cpu_model(), "threads": threads, "accelerator": accelerator}


def cpu_model() -> str:
    """The kind of CPU: float kernels differ between kinds, and 500 epochs amplify that."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def save_settings(cfg: Config, csv_path: str, checkpoints: dict[int, str], made: dict[str, typing.Any]) -> None:
    """The settings beside the CSV: the resolved Config, what made the rows, and each backbone's checkpoint
    (relative to the CSV, so a sweep moved with its log folder resumes) with a digest once it is written."""
    settings = {"config": dataclasses.asdict(cfg), "made_by": made,
                "checkpoints": {seed: {"path": os.path.relpath(path, Path(csv_path).parent), "sha256": None}
                                for seed, path in checkpoints.items()}}
    settings_path(csv_path).write_text(json.dumps(settings, indent=1) + "\n")


def record_backbone(csv_path: str, seed: int) -> None:
    """Add the digest of seed's freshly written backbone to the settings: --resume checks it."""
    path = settings_path(csv_path)
    settings = json.loads(path.read_text())
    checkpoint = settings["checkpoints"][str(seed)]
    checkpoint["sha256"] = sha256(Path(csv_path).parent / checkpoint["path"])
    path.write_text(json.dumps(settings, indent=1) + "\n")


def resume_settings(cfg: Config, given: set[str]) -> tuple[Config, Resumed]:
    """The saved settings of the sweep in --resume CSV, with what `given` (the flags on this command line)
    may change; a flag that would change a run's numbers must match the saved value, and nothing that
    destroys (--overwrite) is restored."""
    path = settings_path(cfg.resume)
    try:
        saved = json.loads(path.read_text())
        settings = Config(**saved["config"])
        checkpoints = {int(seed): Path(cfg.resume).parent / c["path"] for seed, c in saved["checkpoints"].items()}
        digests = {int(seed): c["sha256"] for seed, c in saved["checkpoints"].items()}
        made = saved["made_by"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ExperimentError(f"--resume {cfg.resume}: cannot read the sweep's settings from {path} "
                              f"({one_line(err)}); only a results CSV this script wrote can be resumed") from None
    if "overwrite" in given:
        raise ExperimentError(f"--resume {cfg.resume} continues that sweep; --overwrite would delete it")
    differ = [name for name in sorted(given - RESUME_MAY_CHANGE)
              if getattr(cfg, name) != getattr(settings, name)]
    if differ:
        name = differ[0]
        raise ExperimentError(f"--resume {cfg.resume}: --{name.replace('_', '-')} {getattr(cfg, name)} differs from "
                              f"the sweep's {getattr(settings, name)}, which produced its rows; drop it or start a "
                              f"new sweep" + (f" (also differing: {', '.join(differ[1:])})" if differ[1:] else ""))
    if cfg.results_csv and Path(cfg.results_csv).resolve() != Path(cfg.resume).resolve():
        raise ExperimentError(f"--resume {cfg.resume} writes to that file; drop --results-csv {cfg.results_csv}")
    if Path(cfg.log_dir).resolve() != Path(settings.log_dir).resolve() and "log_dir" in given:
        settings.version = ""  # another log folder: the resumed runs take a new version there
    for name in given & RESUME_MAY_CHANGE:
        setattr(settings, name, getattr(cfg, name))
    settings.overwrite = False  # it cleared the log folder once, at the sweep's start; never again
    if "threads" not in given:  # the sweep's threads, whatever --workers is now
        settings.threads = made["threads"]
    elif cfg.threads != made["threads"]:
        logger.warning(f"--threads {cfg.threads} differs from the sweep's {made['threads']}: the remaining rows "
                       f"come from another order of float sums, and may differ from an uninterrupted sweep's")
    try:  # a sweep stopped during its first pretraining has a header and no rows
        with open(cfg.resume) as f:
            rows = read_results([cfg.resume], "--resume") if len(f.readlines()) > 1 else []
    except OSError as err:
        raise ExperimentError(f"--resume {cfg.resume} cannot be read ({one_line(err)})") from None
    for seed in {r.seed for r in rows if r.mode not in ARMS}:
        checkpoint = checkpoints[seed]
        if not checkpoint.is_file():
            raise ExperimentError(f"--resume {cfg.resume}: the sweep's pretrained backbone {checkpoint} is missing; "
                                  f"resume where it was written, or start a new sweep")
        if digests[seed] != sha256(checkpoint):
            raise ExperimentError(f"--resume {cfg.resume}: the sweep's pretrained backbone {checkpoint} has changed "
                                  f"since it was written (another sweep in the same --log-dir?); start a new sweep")
    settings.resume, settings.results_csv = cfg.resume, cfg.resume
    return settings, Resumed(rows, {seed: str(path) for seed, path in checkpoints.items()}, made)


def check_made_by(resumed: Resumed, now: dict[str, typing.Any], resume: str) -> None:
    """--resume adds rows only where the same code, libraries and accelerator would make them."""
    names = {"code_sha256": "the code above the reporting section"}
    for key, value in resumed.made_by.items():
        if key not in ("script_sha256", "threads") and now.get(key) != value:
            raise ExperimentError(f"--resume {resume}: the sweep's rows were made with {names.get(key, key)} "
                                  f"{str(value)[:12]}, this is {str(now.get(key))[:12]}; resume with what made them, "
                                  f"or start a new sweep")


# ---- Sweeps on Ray (optional: delete this section and the `engine` lines of run_experiment(); --workers,
# --cluster and --gpus-per-run go with it) ----
# A run whose worker process dies (killed, out of memory, its node lost) runs again, at most this many
# times, whatever killed it (Ray's memory monitor too): the same seed gives the same row. An exception
# inside a run is not retried: a bug or bad input.
RETRIES = 2


def gpus_per_run(cfg: Config) -> float:
    """--gpus-per-run; by default, on a GPU accelerator, a GPU shared by --workers runs (0 elsewhere)."""
    if cfg.gpus_per_run is not None:
        return cfg.gpus_per_run
    on_gpu = cfg.accelerator in ("gpu", "cuda") or (cfg.accelerator == "auto" and torch.cuda.is_available())
    return 1 / cfg.workers if on_gpu else 0.0


def run_devices(cfg: Config, gpu_ids: list) -> Config:
    """A run's settings on the devices Ray gave it. Ray shows a task only the GPUs it was given, but leaves
    every GPU visible to a task that asked for none: such a run is put on the CPU, its GPUs hidden."""
    if gpu_ids:
        return cfg
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    return dataclasses.replace(cfg, accelerator="cpu") if cfg.accelerator in ("auto", "gpu", "cuda") else cfg


RECEIVED: dict[str, tuple[dict, dict]] = {}  # in a worker process: registries by object id, unpickled once


def run_remote(cfg: Config, registry: list, backbone: dict | None, run: tuple,
               threads: int) -> tuple[RunResult, dict | None, str]:
    """One run in a Ray worker process (execute()); returns its row, its backbone if it pretrained one, and
    where it ran (node, GPU). `registry` holds the object id of the driver's targets and arms: unpickled once
    per worker process, so a target's keep/relabel stays the same object and its data is read once
    (read_split's cache), not once per run."""
    import ray

    key = registry[0].hex()
    if key not in RECEIVED:
        RECEIVED[key] = ray.get(registry[0])
    TARGETS.update(RECEIVED[key][0])  # targets and arms registered at run time in the driver (image folders, say)
    ARMS.update(RECEIVED[key][1])
    quiet_libraries()
    torch.set_num_threads(threads)
    gpus = ray.get_gpu_ids()
    result, backbone = execute(run_devices(cfg, gpus), run, backbone)
    gc.collect()
    return result, backbone, ray.util.get_node_ip_address() + (f", GPU {', '.join(map(str, gpus))}" if gpus else ", CPU")


def local_processes(roots: list[int], session: str) -> set[int]:
    """Processes of a local Ray instance: those started by its own processes (`roots`), and by those, ...,
    and any whose command line names its session (Linux's /proc; none elsewhere)."""
    children: dict[int, list[int]] = {}
    found: set[int] = set()
    for proc in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            children.setdefault(int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]), []).append(int(proc.name))
            if session in (proc / "cmdline").read_text():
                found.add(int(proc.name))
    todo = list(roots)
    while todo:
        started = children.get(todo.pop(), [])
        found.update(started)
        todo += started
    return found - {os.getpid()}


class RaySweep:
    """The target runs as Ray tasks of `threads` CPUs and a share of a GPU each: on a local instance for
    --workers runs at a time, started and stopped here, or on the cluster at --cluster. This file reaches
    the workers as a module (py_modules), the backbone through the object store; the rows come back here."""

    def __init__(self, cfg: Config, threads: int):
        self.cfg, self.threads, self.gpus = cfg, threads, gpus_per_run(cfg)
        self.pending: dict = {}  # task -> index of its run

    def __enter__(self) -> RaySweep:
        cfg = self.cfg
        if not cfg.cluster:  # a local instance binds to loopback only: a sweep opens no port on the network
            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        # Ray's memory monitor retries the runs it kills without limit unless told (its own count, beside
        # max_retries); the driver owns the tasks, so this holds on a cluster too
        os.environ.setdefault("RAY_task_oom_retries", str(RETRIES))
        import ray

        self.ray = ray
        quiet = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.ERROR,
                 "runtime_env": {"py_modules": [__file__]}}
        # "local": a new instance of our own, even where `ray start` runs or left its address behind
        local = {"address": "local", "num_cpus": cfg.workers * self.threads,
                 "num_gpus": torch.cuda.device_count() if self.gpus else 0}
        try:
            ray.init(**({"address": cfg.cluster} if cfg.cluster else local), **quiet)
        except Exception as err:  # ConnectionError, or a ValueError/RuntimeError for an address Ray cannot use
            raise ExperimentError(f"cannot start Ray on {cfg.cluster or 'this machine'}: {one_line(err)}") from None
        StopSignal.install()  # ray.init() replaced the SIGTERM handler
        resources = ray.cluster_resources()
        if self.gpus and not resources.get("GPU"):
            self.__exit__()
            raise ExperimentError(f"--gpus-per-run {self.gpus:g}, but Ray has no GPU here; pass --gpus-per-run 0")
        # Worker processes start now and import torch (seconds) while this process pretrains
        warm_up = ray.remote(quiet_libraries).options(num_cpus=self.threads)
        self.pending = {warm_up.remote(): None for _ in range(int(resources["CPU"] // self.threads))}
        logger.info(f"Target runs on {f'the Ray cluster at {cfg.cluster}' if cfg.cluster else 'a local Ray instance'}: "
                    f"{resources['CPU']:g} CPUs, {resources.get('GPU', 0):g} GPUs; each run takes {self.threads} "
                    f"CPU(s) and torch thread(s)" + (f" and {self.gpus:g} of a GPU" if self.gpus else ""))
        return self

    def __exit__(self, *exc_info) -> None:
        for task in self.pending:  # Ctrl-C or an error: nothing of this sweep keeps running on the cluster
            with contextlib.suppress(Exception):  # an instance that died has nothing left to cancel
                self.ray.cancel(task, force=True)
        node = None if self.cfg.cluster else self.ray._private.worker._global_node
        if node is None:
            self.ray.shutdown()
            return
        session = node.session_name
        started = local_processes([p.process.pid for infos in node.all_processes.values() for p in infos], session)
        self.ray.shutdown()  # a local instance stops with every process it started,
        for pid in started | local_processes([], session):  # unless it lost its GCS: the raylet's agents outlive it
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)

    def run(self, jobs: dict, finished: Callable) -> None:
        """Submit each (run, backbone) of `jobs`; call finished(key, result, backbone) here as each one ends."""
        ray, cfg = self.ray, self.cfg
        # absolute paths: a worker process does not start in this folder
        cfg = dataclasses.replace(cfg, data_dir=os.path.abspath(cfg.data_dir), log_dir=os.path.abspath(cfg.log_dir))
        registry = [ray.put(({name: TARGETS[name] for name in (cfg.source, *cfg.targets)},
                             {name: ARMS[name] for name in cfg.modes}))]  # a list: Ray passes the id, not the value
        task = ray.remote(run_remote).options(num_cpus=self.threads, num_gpus=self.gpus, max_retries=RETRIES,
                                              retry_exceptions=False)
        stored = {id(backbone): ray.put(backbone) for _, backbone in jobs.values() if backbone is not None}  # once each
        self.pending = {task.remote(cfg, registry, stored.get(id(backbone)), run, self.threads): key
                        for key, (run, backbone) in jobs.items()}
        while self.pending:
            StopSignal.check()
            for ref in self.wait():
                key = self.pending.pop(ref)
                run = jobs[key][0]
                try:
                    result, backbone, where = ray.get(ref)
                except ray.exceptions.RayTaskError as err:  # raised inside the run: ExperimentError, a full disk
                    raise (err.cause if isinstance(err.cause, (ExperimentError, OSError)) else err) from None
                except ray.exceptions.LocalRayletDiedError:
                    raise ExperimentFailure(self.died("raylet")) from None
                except ray.exceptions.RayError as err:  # its worker died every time
                    raise ExperimentFailure(f"{describe_run(run)} failed {RETRIES + 1} times: its worker "
                                            f"process died ({type(err).__name__})") from None
                finished(key, result, backbone)
                logger.info(f"[{len(jobs) - len(self.pending)}/{len(jobs)}] {describe_run(run)}: best epoch "
                            f"{result.best_epoch}, test accuracy {result.test_acc:.4f}, {result.seconds:.1f} s on {where}")

    def wait(self) -> list:
        """The tasks that finished within a second (the timeout lets Ctrl-C in). A local instance that lost
        one of its processes ends the sweep: without its GCS it runs on but cannot be shut down cleanly."""
        node = None if self.cfg.cluster else self.ray._private.worker._global_node  # no public API for this
        dead = sorted({kind for kind, _ in node.dead_processes()}) if node else []
        if dead:
            raise ExperimentFailure(self.died(", ".join(dead)))
        return self.ray.wait(list(self.pending), num_returns=1, timeout=1.0)[0]

    def died(self, process: str) -> str:
        return f"the local Ray instance stopped under the script: its {process} process died"


# ---- Reporting: the run table, and the results CSV read back (--report) -------------------
def run_rows(results: list[RunResult]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the run table; with a learning-rate grid, which rate was selected."""
    grid = any(not r.selected for r in results)
    header = ["target", "mode", "n_train", "seed", "lr", "best epoch", "val loss", "test loss", "test acc"]
    rows = [[r.target, r.mode, str(r.n_train), str(r.seed), f"{r.learning_rate:g}", str(r.best_epoch),
             f"{r.val_loss:.4f}", f"{r.test_loss:.4f}", f"{r.test_acc:.4f}"] + (["yes" if r.selected else ""] * grid)
            for r in results]
    return header + ["selected"] * grid, rows


def aligned(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [header, *rows]]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(row) + " |" for row in lines)


def format_table(results: list[RunResult]) -> str:
    """One line per run, aligned, with its wall time (not in the CSV, so not after --report)."""
    header, rows = run_rows(results)
    if all(math.isnan(r.seconds) for r in results):
        return aligned(header, rows)
    return aligned(header + ["time"], [row + [f"{r.seconds:.1f} s"] for row, r in zip(rows, results)])


def read_results(paths: typing.Sequence[str], flag: str = "--report") -> list[RunResult]:
    """The rows of results CSVs, merged. A row repeated across files is kept once; two rows of the same run
    (target, mode, n_train, seed, learning rate) with different numbers are an error. Errors name `flag`."""
    kinds = typing.get_type_hints(RunResult)
    parse = {int: int, float: float, str: str, bool: lambda text: {"true": True, "false": False}[text.lower()]}
    results: dict[tuple, RunResult] = {}
    for path in paths:
        try:
            with open(path, newline="") as f:
                rows = list(csv.DictReader(f))
        except (OSError, UnicodeDecodeError) as err:
            raise ExperimentError(f"{flag} {path} cannot be read ({getattr(err, 'strerror', None) or err})") from None
        missing = [column for column in RESULT_COLUMNS if rows and column not in rows[0]]
        if not rows or missing:
            raise ExperimentError(f"{flag} {path} is not a results CSV of this script "
                                  f"({'no rows' if not rows else 'no column ' + ', '.join(missing)})")
        for line, row in enumerate(rows, start=2):
            try:
                result = RunResult(**{column: parse[kinds[column]](row[column]) for column in RESULT_COLUMNS})
            except (KeyError, ValueError, TypeError):
                raise ExperimentError(f"{flag} {path}, line {line}: not a row of results ({row})") from None
            key = (result.target, result.mode, result.n_train, result.seed, result.learning_rate)
            earlier = results.setdefault(key, result)
            if csv_row(earlier) != csv_row(result):
                raise ExperimentError(
                    f"{flag}: {path}, line {line} and an earlier row are the same run ({result.target} {result.mode} "
                    f"n_train {result.n_train} seed {result.seed} lr {result.learning_rate:g}) with different numbers")
    return list(results.values())


# ---- Summary over seeds and learning curves (optional: delete this section and the figure's below,
# and main() keeps the run table and the CSV; delete with them the lines marked "summary" in main()) ----
# Student's t quantile t(0.975, df) for df = 1..30: the 95% interval of a mean of few seeds
T_975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
         2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
         2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def t_975(df: int) -> float:
    """t(0.975, df): the table above, then the Cornish-Fisher expansion (within 1e-4 beyond df = 30)."""
    if df <= len(T_975):
        return T_975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


@dataclasses.dataclass
class MeanCI:
    """Mean over n values with sample standard deviation and 95% t-interval (nan for n < 2)."""

    n: int
    mean: float
    sd: float
    low: float
    high: float

    @classmethod
    def of(cls, values: list[float], bounds: tuple[float, float] = (-math.inf, math.inf)) -> MeanCI:
        """The interval is cut to `bounds`, the metric's possible range: with few seeds t is large, and an
        accuracy interval of 2 seeds can pass 100%."""
        n = len(values)
        mean = sum(values) / n
        if n < 2:
            return cls(n, mean, math.nan, math.nan, math.nan)
        sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
        half_width = t_975(n - 1) * sd / math.sqrt(n)
        return cls(n, mean, sd, max(bounds[0], mean - half_width), min(bounds[1], mean + half_width))

    def text(self, digits: int = 4) -> tuple[str, str]:
        """("mean ± sd", "[low, high]") for tables; one value has no spread."""
        if self.n < 2:
            return f"{self.mean:.{digits}f}", "n/a"
        return f"{self.mean:.{digits}f} ± {self.sd:.{digits}f}", f"[{self.low:.{digits}f}, {self.high:.{digits}f}]"


ACCURACY_RANGE, LOSS_RANGE = (0.0, 1.0), (0.0, math.inf)  # where a mean's interval can lie


def accuracy_ci(runs: typing.Iterable[RunResult]) -> MeanCI:
    """Mean test accuracy over seeds with its 95% interval: the summary's and the figure's numbers."""
    return MeanCI.of([r.test_acc for r in runs], ACCURACY_RANGE)


def group_by_arm(results: list[RunResult]) -> dict[tuple[str, int, str], dict[int, RunResult]]:
    """Selected target runs by (target, n_train, mode), then by seed; pretraining and unselected rates left out."""
    groups: dict[tuple[str, int, str], dict[int, RunResult]] = {}
    for r in results:
        if r.mode in ARMS and r.selected:
            groups.setdefault((r.target, r.n_train, r.mode), {})[r.seed] = r
    return groups


def baseline_arm() -> str:
    """The arm that is not pretrained: the others are paired with it."""
    return next(name for name, arm in ARMS.items() if not arm.pretrained)


def paired(groups: dict, target: str, n_train: int, mode: str) -> tuple[MeanCI, MeanCI] | None:
    """Test accuracy and loss of a pretrained arm minus the baseline's, paired by seed (same subset, same
    head initialisation); None for the baseline, or without it."""
    by_seed, base = groups[(target, n_train, mode)], groups.get((target, n_train, baseline_arm()))
    if not ARMS[mode].pretrained or base is None:
        return None
    seeds = sorted(by_seed.keys() & base.keys())
    return (MeanCI.of([by_seed[s].test_acc - base[s].test_acc for s in seeds], (-1.0, 1.0)),
            MeanCI.of([by_seed[s].test_loss - base[s].test_loss for s in seeds]))


def summarize(results: list[RunResult]) -> tuple[list[list[str]], list[list[str]]]:
    """Rows of two tables: each (target, n_train, mode) over seeds, and each pretrained arm minus the
    baseline, paired by seed."""
    groups = group_by_arm(results)
    arms, differences = [], []
    for (target, n_train, mode), by_seed in groups.items():
        acc, loss = accuracy_ci(by_seed.values()), MeanCI.of([r.test_loss for r in by_seed.values()], LOSS_RANGE)
        arms.append([target, str(n_train), mode, str(acc.n), *acc.text(), *loss.text()])
        if difference := paired(groups, target, n_train, mode):
            differences.append([target, str(n_train), f"{mode} - {baseline_arm()}", str(acc.n),
                                *difference[0].text(), *difference[1].text()])
    return arms, differences


def points(ci: MeanCI) -> str:
    """A difference of accuracies in percentage points, with its 95% interval: +6.2 [+4.6, +7.9]."""
    return f"{100 * ci.mean:+.1f}" + (f" [{100 * ci.low:+.1f}, {100 * ci.high:+.1f}]" if ci.n > 1 else "")


def difference_text(groups: dict, target: str, n_train: int, mode: str) -> str:
    difference = paired(groups, target, n_train, mode) if (target, n_train, mode) in groups else None
    return points(difference[0]) if difference else "–"


def percent_table(results: list[RunResult], modes: list[str] | None = None) -> tuple[list[str], list[list[str]]]:
    """Per (target, n_train): each arm's mean test accuracy in %, and each pretrained arm minus the baseline
    in points with its 95% interval: the compact table that README.md quotes. Columns: `modes`, or the
    arms that ran."""
    groups = group_by_arm(results)
    modes = modes or [mode for mode in ARMS if any(key[2] == mode for key in groups)]
    pretrained = [mode for mode in modes if ARMS[mode].pretrained and baseline_arm() in modes]
    rows = []
    for target, n_train in dict.fromkeys((key[0], key[1]) for key in sorted(groups, key=lambda k: (k[0], k[1]))):
        rows.append([target, str(n_train)]
                    + [f"{100 * accuracy_ci(groups[(target, n_train, m)].values()).mean:.1f}"
                       if (target, n_train, m) in groups else "–" for m in modes]
                    + [difference_text(groups, target, n_train, m) for m in pretrained])
    return ["target", "n_train", *modes, *[f"{mode} − {baseline_arm()}" for mode in pretrained]], rows


def still_improving(r: RunResult) -> bool:
    """Its best epoch in the last tenth of its budget: more epochs might have helped (under-trained)."""
    return r.best_epoch > 0.9 * r.max_epochs


def rate_choices(results: list[RunResult]) -> dict[tuple[str, str], list[tuple[RunResult, list[float]]]]:
    """Per (target, arm): each selected run with the rates tried for its (target, mode, n_train, seed)."""
    tried: dict[tuple, list[float]] = {}
    for r in results:
        tried.setdefault((r.target, r.mode, r.n_train, r.seed), []).append(r.learning_rate)
    choices: dict[tuple[str, str], list] = {}
    for r in results:
        if r.mode in ARMS and r.selected:
            choices.setdefault((r.target, r.mode), []).append((r, tried[(r.target, r.mode, r.n_train, r.seed)]))
    return choices


def at_an_edge(choices: list[tuple[RunResult, list[float]]]) -> int | None:
    """How many choices sat at the lowest or highest rate of their grid (a sign it is too narrow); None
    under 3 rates, where every choice is at an edge."""
    if min(len(grid) for _, grid in choices) < 3:
        return None
    return sum(r.learning_rate in (min(grid), max(grid)) for r, grid in choices)


def budget_rows(results: list[RunResult]) -> list[list[str]]:
    """Per target and arm, over its selected runs: the rates chosen and how often, how often the choice
    sat at an edge of the grid, and how many runs were still improving at the end of their budget."""
    rows = []
    for (target, mode), choices in rate_choices(results).items():
        chosen = [r for r, _ in choices]
        counts = {rate: sum(r.learning_rate == rate for r in chosen) for rate in sorted({r.learning_rate for r in chosen})}
        rates = [len(grid) for _, grid in choices]
        edge = at_an_edge(choices)
        rows.append([target, mode, str(len(chosen)), ", ".join(f"{rate:g} ×{n}" for rate, n in counts.items()),
                     "no grid" if max(rates) == 1 else f"n/a: a grid of {min(rates)} rates is all edges"
                     if edge is None else f"{edge} of {len(chosen)}",
                     f"{sum(map(still_improving, chosen))} of {len(chosen)}"])
    return rows


def fragile(results: list[RunResult]) -> list[str]:
    """Where the answer is fragile, in words: for the end of the console and the Markdown."""
    weak = [r for r in results if r.mode not in ARMS and still_improving(r)]
    warnings = [f"pretraining (seed{'s' * (len(weak) > 1)} {', '.join(str(r.seed) for r in weak)}) was still "
                f"improving: best validation loss at epoch {'/'.join(sorted({str(r.best_epoch) for r in weak}))} of "
                f"{weak[0].max_epochs}, test accuracy {min(r.test_acc for r in weak):.4f}"
                + (f"-{max(r.test_acc for r in weak):.4f}" if len(weak) > 1 else "")
                + "; a backbone this weak may understate what fine-tuning gains (--pretrain-epochs)"] if weak else []
    choices = [choice for per_arm in rate_choices(results).values() for choice in per_arm]
    late = sum(still_improving(r) for r, _ in choices)
    if late:
        warnings.append(f"{late} of {len(choices)} target runs still improving in the last tenth of their epochs "
                        f"(--train-epochs)")
    if any(len(grid) > 1 for _, grid in choices):
        edge = at_an_edge(choices)
        if edge:
            warnings.append(f"{edge} of {len(choices)} learning-rate choices at an edge of the grid: widen --lr-grid")
        elif edge is None:
            warnings.append("a grid of fewer than 3 rates cannot tell whether the best rate lies outside it")
    elif choices:
        warnings.append("every arm ran at one fixed learning rate, not its best: --protocol fair gives each arm "
                        "its best of a grid, over 5 seeds, on images that pretraining did not see")
    return warnings


ARM_HEADER = ["target", "n_train", "mode", "seeds", "test acc mean ± sd", "95% CI", "test loss mean ± sd", "95% CI"]
DIFF_HEADER = ["target", "n_train", "paired difference", "seeds", "Δ test acc mean ± sd", "95% CI",
               "Δ test loss mean ± sd", "95% CI"]
BUDGET_HEADER = ["target", "mode", "runs", "learning rates chosen", "at an edge of the grid",
                 "best epoch in the last tenth of the budget"]


SELECTIONS = {"seed": "each seed's own validation loss picks its rate (--select seed)",
              "pooled": "one rate per (target, arm, n_train): the lowest mean validation loss over seeds (--select pooled)"}


def write_summary(results: list[RunResult], path: str, select: str = "seed") -> str:
    """Markdown at `path`: the summary over seeds (the run table when every arm ran one seed), then the
    learning rates chosen and the runs still improving at the end of their budget. Returns the summary as
    aligned text for the console: '' for one seed, where the run table says it all."""
    budget = budget_rows(results)
    grid = any(not r.selected for r in results)
    closing = ("## Learning rates and epoch budget\n\n" + (f"Rate selection: {SELECTIONS[select]}.\n\n" if grid else "")
               + f"{markdown(BUDGET_HEADER, budget)}\n")
    if fragile(results):
        closing += "\n## Warnings\n\n" + "".join(f"- {warning}\n" for warning in fragile(results))
    if all(len(by_seed) < 2 for by_seed in group_by_arm(results).values()):
        with open(path, "w") as f:
            f.write(f"# Test results\n\n{markdown(*run_rows(results))}\n\n{closing}")
        return ""
    arms, differences = summarize(results)
    fewest = min(int(row[3]) for row in arms)
    caution = (f"Intervals from {fewest} seeds are wide (t(0.975) is {t_975(fewest - 1):g} with {fewest} seeds, "
               f"{t_975(4):g} with 5); they are cut to what the metric can reach.\n\n" if fewest in (2, 3) else "")
    with open(path, "w") as f:
        f.write(f"# Test results over seeds\n\n{markdown(ARM_HEADER, arms)}\n\n{caution}")
        f.write("Paired by seed: both arms of a seed share the training subset and the head's initial weights.\n\n")
        f.write(f"{markdown(DIFF_HEADER, differences)}\n\n")
        f.write(f"In percent: mean test accuracy, and the paired difference in points with its 95% interval.\n\n"
                f"{markdown(*percent_table(results))}\n\n{closing}")
    return "\n\n".join([aligned(ARM_HEADER, arms)] + [caution.strip()] * bool(caution)
                       + [aligned(*table) for table in ((DIFF_HEADER, differences), (BUDGET_HEADER, budget))])


def log_learning_curves(results: list[RunResult], cfg: Config) -> None:
    """TensorBoard: mean test accuracy and loss over seeds against n_train (the step axis), one run per
    arm under learning_curve/, so each target's chart shows the arms side by side."""
    groups = group_by_arm(results)
    for mode in cfg.modes:
        curve = lightning.pytorch.loggers.TensorBoardLogger(cfg.log_dir, name=f"learning_curve/{mode}",
                                                           version=cfg.version, default_hp_metric=False)
        for (target, n_train, arm_mode), by_seed in sorted(groups.items()):
            if arm_mode == mode:
                runs = by_seed.values()
                curve.log_metrics({f"{target}/test_accuracy": MeanCI.of([r.test_acc for r in runs]).mean,
                                   f"{target}/test_loss": MeanCI.of([r.test_loss for r in runs]).mean},
                                  step=n_train)
        curve.finalize("success")


# ---- Figure (optional, needs matplotlib: delete this section and the lines marked "figure" in main()) ----
def curve_points(results: list[RunResult]) -> dict[str, dict[str, list[tuple[int, MeanCI]]]]:
    """The figure's numbers: per target and arm, test accuracy over seeds at each n_train, from the
    same selected runs and MeanCI as the summary."""
    points: dict[str, dict[str, list[tuple[int, MeanCI]]]] = {}
    for (target, n_train, mode), by_seed in sorted(group_by_arm(results).items(),
                                                   key=lambda item: (item[0][1], list(ARMS).index(item[0][2]))):
        points.setdefault(target, {}).setdefault(mode, []).append(
            (n_train, accuracy_ci(by_seed.values())))
    return points


def draw_figure(results: list[RunResult]):
    """Test accuracy against n_train, one panel per target: each arm's mean over seeds with its 95%
    interval as a band; with one n_train, the arms side by side with error bars. One seed has no
    interval: points only."""
    from matplotlib.figure import Figure  # not pyplot: no global state, no window; PNG through Agg

    points = curve_points(results)
    figure = Figure(figsize=(4.8 * len(points), 4), layout="constrained")
    for ax, (target, arms) in zip(figure.subplots(1, len(points), squeeze=False)[0], points.items()):
        sizes = sorted({n for curve in arms.values() for n, _ in curve})
        for position, (mode, curve) in enumerate(arms.items()):
            x = [n for n, _ in curve] if len(sizes) > 1 else [position]
            mean, low, high = ([100 * getattr(ci, field) for _, ci in curve] for field in ("mean", "low", "high"))
            (line,) = ax.plot(x, mean, marker="o", linestyle="-" if len(sizes) > 1 else "none", label=mode)
            if all(ci.n > 1 for _, ci in curve) and len(sizes) > 1:
                ax.fill_between(x, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
            elif all(ci.n > 1 for _, ci in curve):
                ax.errorbar(x, mean, yerr=[[mean[0] - low[0]], [high[0] - mean[0]]], fmt="none",
                            ecolor=line.get_color(), capsize=4)
        if len(sizes) > 1:
            ax.set_xscale("log")
            ax.set_xticks(sizes, [str(n) for n in sizes])
            ax.minorticks_off()
            ax.set_xlabel("labelled training images")
            ax.legend()
        else:
            ax.set_xticks(range(len(arms)), list(arms))
            ax.set_xlim(-0.5, len(arms) - 0.5)  # the arms side by side, none on the frame
            ax.set_xlabel(f"{sizes[0]} labelled training images")
        ax.grid(alpha=0.3)
        ax.set(title=target, ylabel="test accuracy (%)")
    seeds = max(ci.n for arms in points.values() for curve in arms.values() for _, ci in curve)
    figure.suptitle("1 seed, no interval" if seeds == 1 else f"Mean over {seeds} seeds, 95% interval")
    return figure


def log_figure(figure, cfg: Config) -> None:
    """The figure in TensorBoard's IMAGES tab, as the run figure/<version>."""
    tb_logger = lightning.pytorch.loggers.TensorBoardLogger(cfg.log_dir, name="figure", version=cfg.version,
                                                           default_hp_metric=False)
    tb_logger.experiment.add_figure("test_accuracy", figure, close=False)
    tb_logger.finalize("success")


# ---- Comparing sweeps (optional: delete this section and the LABEL= branch of report()) ----
def comparison_table(sweeps: dict[str, list[RunResult]]) -> tuple[list[str], list[list[str]]]:
    """Each pretrained arm minus the baseline per target and n_train, in points with its 95% interval,
    side by side for several sweeps (--report LABEL=CSV ...)."""
    groups = {label: group_by_arm(results) for label, results in sweeps.items()}
    keys = sorted({key for by_arm in groups.values() for key in by_arm if ARMS[key[2]].pretrained},
                  key=lambda key: (key[0], key[1], list(ARMS).index(key[2])))
    rows = [[target, str(n_train), f"{mode} − {baseline_arm()}",
             *[difference_text(by_arm, target, n_train, mode) for by_arm in groups.values()]]
            for target, n_train, mode in keys]
    return ["target", "n_train", "difference", *sweeps], rows


def draw_comparison(sweeps: dict[str, list[RunResult]]):
    """comparison_table() as a figure: one panel per target and n_train, the pretrained arms along x, each
    sweep's paired difference with the baseline as a point with its 95% interval."""
    from matplotlib.figure import Figure

    groups = {label: group_by_arm(results) for label, results in sweeps.items()}
    targets, sizes = (sorted({key[i] for by_arm in groups.values() for key in by_arm}) for i in (0, 1))
    modes = [mode for mode in ARMS if ARMS[mode].pretrained and any(key[2] == mode for g in groups.values() for key in g)]
    figure = Figure(figsize=(max(6.4, 4.8 * len(targets)), 4 * len(sizes)), layout="constrained")
    axes = figure.subplots(len(sizes), len(targets), squeeze=False)
    for ax, (n_train, target) in zip(axes.flat, [(n, t) for n in sizes for t in targets]):  # a row per n_train
        for i, (label, by_arm) in enumerate(groups.items()):
            found = [(x, d[0]) for x, mode in enumerate(modes) if (target, n_train, mode) in by_arm
                     and (d := paired(by_arm, target, n_train, mode))]
            if not found:
                continue
            x = [x + 0.12 * (i - (len(groups) - 1) / 2) for x, _ in found]  # the sweeps side by side
            mean = [100 * ci.mean for _, ci in found]
            spread = [[100 * (ci.mean - ci.low) if ci.n > 1 else 0 for _, ci in found],
                      [100 * (ci.high - ci.mean) if ci.n > 1 else 0 for _, ci in found]]
            ax.errorbar(x, mean, yerr=spread, fmt="o", capsize=3, label=label, color=f"C{i}")  # a colour per sweep
        ax.axhline(0, color="grey", linewidth=0.8)
        ax.set_xticks(range(len(modes)), modes)
        ax.set_xlim(-0.5, len(modes) - 0.5)
        ax.grid(alpha=0.3)
        ax.set(title=f"{target}, {n_train} labelled images", ylabel=f"test accuracy − {baseline_arm()} (points)")
        ax.legend()
    figure.suptitle(f"Paired difference with {baseline_arm()}: mean over seeds, 95% interval")
    return figure


# ---- Command line and start-up checks -----------------------------------------------------
def make_parser(show_defaults: bool = True) -> argparse.ArgumentParser:
    """The command line, built from Config: one flag per field with a help text. Without defaults, parsing
    gives only the flags that were given (what --resume compares with the saved settings)."""
    parser = argparse.ArgumentParser(
        description="Pretrain a truncated LeNet-5 on MNIST, then compare the arms (fine-tuned, from scratch, "
        "frozen) on small training sets of each target. Every run is tested with its best-validation weights "
        "and logged to TensorBoard. Arms' default learning rates: "
        + ", ".join(f"{name} {arm.learning_rate:g}" for name, arm in ARMS.items()) + ".",
        argument_default=None if show_defaults else argparse.SUPPRESS,
    )
    defaults, hints = Config(), typing.get_type_hints(Config)
    for field in dataclasses.fields(Config):
        if "help" not in field.metadata:
            continue
        options, default, kind = dict(field.metadata), getattr(defaults, field.name), hints[field.name]
        if kind is bool:  # what --protocol fair turns on can be turned off: --no-disjoint
            options["action"] = argparse.BooleanOptionalAction if field.name in FAIR else "store_true"
        else:
            origin, args = typing.get_origin(kind), typing.get_args(kind)
            if origin in (tuple, dict):
                options["nargs"] = "+"
            options.setdefault("type", args[0] if origin in (tuple, types.UnionType) else kind)
        if default is not None and default is not False and default != ():
            shown = (" ".join(f"{k}={v:g}" for k, v in default.items()) if isinstance(default, dict)
                     else " ".join(map(str, default)) if isinstance(default, tuple) else default)
            options["help"] += f" (default: {shown})"
        options["help"] = options["help"].replace("%", "%%")
        if show_defaults:
            options["default"] = default
        parser.add_argument(f"--{field.name.replace('_', '-')}", **options)
    return parser


def parse_args(argv: list[str] | None = None) -> Config:
    return Config(**vars(make_parser().parse_args(argv)))


def given_flags(argv: list[str] | None = None) -> set[str]:
    """The Config fields that the command line sets explicitly."""
    return set(vars(make_parser(show_defaults=False).parse_args(argv)))


def resolve_protocol(cfg: Config, given: set[str]) -> None:
    """--protocol fair: FAIR's value for every setting that the command line does not give."""
    if cfg.protocol == "fair":
        for name, value in FAIR.items():
            if name not in given:
                setattr(cfg, name, value)


def check_devices(cfg: Config) -> str:
    """The experiment runs on one device; say so before any training if --accelerator/--devices disagree.
    Returns the accelerator that Lightning resolves --accelerator to (cpu, cuda, mps, ...)."""
    try:
        trainer = lightning.Trainer(accelerator=cfg.accelerator, devices=cfg.devices, logger=False,
                                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    except Exception as err:  # Lightning raises several kinds for an unknown or unavailable accelerator
        raise ExperimentError(f"--accelerator {cfg.accelerator} --devices {cfg.devices}: "
                              f"{str(err).strip().splitlines()[0]}") from None
    if trainer.world_size > 1:
        raise ExperimentError("this experiment runs on one device; pass --devices 1")
    return type(trainer.accelerator).__name__.removesuffix("Accelerator").lower()


def make_dirs(path: Path, created: list[Path]) -> None:
    """mkdir -p that remembers the topmost folder it made, so that a failed start can remove it."""
    missing = [p for p in (path, *path.parents) if not p.exists()]
    path.mkdir(parents=True, exist_ok=True)
    if missing:
        created.append(missing[-1])


def run_names() -> set[str]:
    """Top-level entries that this script writes into the log folder (besides results_*)."""
    return {"pretrain", "learning_curve", "figure", *TARGETS}


def clear_log_dir(log_dir: Path) -> None:
    """--overwrite: delete the log folder, unless it holds files this script did not write."""
    foreign = sorted(p.name for p in log_dir.iterdir() if p.name not in run_names() and not p.name.startswith("results_"))
    if foreign:
        raise ExperimentError(f"--overwrite would delete {log_dir}, which holds files this script did not write "
                              f"({', '.join(foreign[:3])}); choose another --log-dir")
    logger.info(f"--overwrite: removing {log_dir}")
    shutil.rmtree(log_dir)


def prepare_outputs(cfg: Config, created: list[Path]) -> ResultsCsv:
    """Create the log folder and the results CSV now, so that a path that cannot be written fails before
    any training; set the version that this invocation's runs share.
    A resumed sweep appends to its CSV, and keeps its version where it keeps its log folder."""
    log_dir = Path(cfg.log_dir)
    if log_dir.exists() and not log_dir.is_dir():
        raise ExperimentError(f"--log-dir {log_dir} is a file, not a folder")
    if cfg.overwrite and log_dir.is_dir() and not cfg.dry_run:
        clear_log_dir(log_dir)
    try:
        make_dirs(log_dir, created)
        with tempfile.TemporaryFile(dir=log_dir):
            pass
    except OSError as err:
        raise ExperimentError(f"--log-dir {log_dir} cannot be created or written ({err.strerror or err})") from None
    if not (cfg.resume and cfg.version):
        taken = [int(p.name.removeprefix("version_")) for p in log_dir.glob("**/version_*")
                 if p.name.removeprefix("version_").isdigit()]
        cfg.version = f"version_{max(taken, default=-1) + 1}"
    csv_path = Path(cfg.results_csv or log_dir / f"results_{cfg.version}.csv")
    if csv_path.is_dir():
        raise ExperimentError(f"--results-csv {csv_path} is a folder, not a file")
    try:
        make_dirs(csv_path.parent, created)
        if not csv_path.exists():
            created.append(csv_path)
        return ResultsCsv(str(csv_path), append=bool(cfg.resume))
    except OSError as err:
        raise ExperimentError(f"--results-csv {csv_path} cannot be written ({err.strerror or err})") from None


def check_inputs(cfg: Config, created: list[Path]) -> str:
    """Everything that can be checked before training: targets, devices, the data, its labels and sizes.
    Data folders that a failed download leaves are added to `created`. Returns the resolved accelerator."""
    resolve_targets(cfg)
    if cfg.backbone_per_seed and cfg.pretrain_seed is not None:
        raise ExperimentError("--backbone-per-seed pretrains each seed's backbone with that seed; drop --pretrain-seed")
    accelerator = check_devices(cfg)
    for name in (cfg.source, *cfg.targets):
        if TARGETS[name].folder is None:
            raw = Path(cfg.data_dir, TARGETS[name].dataset.__name__, "raw")
            missing = [p for p in (raw, *raw.parents) if not p.exists()]
            if missing and missing[-1] not in created:
                created.append(missing[-1])
    check_data(cfg)
    for name in dict.fromkeys((cfg.source, *cfg.targets)):
        target = TARGETS[name]
        logger.info(f"{name}: {target.folder or target.dataset.__name__}, {len(target.label_names)} classes "
                    f"({', '.join(target.label_names)})")
    for line in describe_subsets(cfg):
        logger.info(line)
    return accelerator


def quiet_libraries() -> None:
    """Lightning repeats its device and tip banners for every run: keep its warnings only. And
    LIBRARY_WARNINGS are not for the user (the tests filter the same list)."""
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    for message in LIBRARY_WARNINGS:
        warnings.filterwarnings("ignore", message=message)


def remove(paths: list[Path]) -> None:
    for path in reversed(paths):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def one_line(err: BaseException) -> str:
    if isinstance(err, OSError) and err.strerror:
        return f"{err.strerror}: {err.filename}" if err.filename else err.strerror
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def show(results: list[RunResult], summary: str) -> None:
    """The run table, the summary over seeds when there is one, and where the answer is fragile."""
    print(f"\n{format_table(results)}\n")
    if summary:
        print(f"{summary}\n")
    for warning in fragile(results):
        print(f"Warning: {warning}")


def report_output(cfg: Config, given: set[str]) -> Path:
    """Where --report writes: --results-csv, else beside the first CSV. It never replaces a sweep's own
    Markdown and figure with other numbers: a merge, or another selection than the sweep's, is written
    under a name that says so (X.merged.md, X.pooled.md)."""
    if cfg.results_csv:
        return Path(cfg.results_csv)
    first = Path(cfg.report[0])
    own_select = saved_config(first).get("select", "seed")
    parts = ["merged"] * (len(cfg.report) > 1) + [cfg.select] * ("select" in given and cfg.select != own_select)
    return first.with_name(".".join([first.stem, *parts, "csv"])) if parts else first


def saved_config(csv_path: Path) -> dict:
    """The settings saved beside a results CSV, or {} where there are none (a CSV from elsewhere)."""
    try:
        return json.loads(settings_path(csv_path).read_text())["config"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def load_sweep(paths: list[str], cfg: Config, given: set[str]) -> tuple[list[RunResult], str]:
    """The rows of results CSVs, merged, their rates selected as --select says, else as the first sweep did."""
    select = cfg.select if "select" in given else saved_config(Path(paths[0])).get("select", cfg.select)
    grid = {rate for path in paths for rate in saved_config(Path(path)).get("lr_grid", ())}
    return settle(read_results(paths), select, grid), select


def report(cfg: Config, given: set[str]) -> int:
    """--report: the run table, the summary, its Markdown and the figure, rebuilt from results CSVs; with
    LABEL=CSV arguments, the sweeps compared side by side, and each one's summary and figure."""
    labelled = ["=" in arg for arg in cfg.report]
    try:
        if any(labelled) and not all(labelled):
            raise ExperimentError("--report takes CSVs, or LABEL=CSV for each to compare sweeps; not both")
        if all(labelled):  # comparing sweeps
            return compare(cfg, given)
        results, cfg.select = load_sweep(list(cfg.report), cfg, given)
        out = report_output(cfg, given)
        if cfg.results_csv:
            try:
                out.parent.mkdir(parents=True, exist_ok=True)
                ResultsCsv(cfg.results_csv).rewrite(results)
            except OSError as err:
                raise ExperimentError(f"--results-csv {out} cannot be written ({err.strerror or err})") from None
        summary = write_summary(results, str(out.with_suffix(".md")), cfg.select)  # summary
        draw_figure(results).savefig(out.with_suffix(".png"))  # figure
    except ExperimentError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 1
    show(results, summary)
    print(f"Rebuilt from {', '.join(cfg.report)}: {out.with_suffix('.md')} and {out.with_suffix('.png')}")
    return 0


def compare(cfg: Config, given: set[str]) -> int:
    """--report LABEL=CSV ...: the paired differences of each sweep side by side, as Markdown and a figure at
    --results-csv (.md, .png; default: comparison beside the first CSV), and each sweep's own summary and
    figure beside them (<name>.<label>.md). The same label on several CSVs merges them."""
    paths: dict[str, list[str]] = {}
    for arg in cfg.report:
        label, _, path = arg.partition("=")
        paths.setdefault(label, []).append(path)
    out = Path(cfg.results_csv or Path(next(iter(paths.values()))[0]).with_name("comparison.csv"))
    out.parent.mkdir(parents=True, exist_ok=True)
    sweeps = {}
    for label, csvs in paths.items():
        sweeps[label], select = load_sweep(csvs, cfg, given)
        name = out.with_name(f"{out.stem}.{''.join(c if c.isalnum() or c in '-_' else '_' for c in label)}.md")
        write_summary(sweeps[label], str(name), select)
        draw_figure(sweeps[label]).savefig(name.with_suffix(".png"))
    table = comparison_table(sweeps)
    modes = [mode for mode in ARMS if any(r.mode == mode for results in sweeps.values() for r in results)]
    header = ["sweep", *percent_table([], modes)[0]]
    means = [[label, *row] for label, results in sweeps.items() for row in percent_table(results, modes)[1]]
    out.with_suffix(".md").write_text(
        f"# Sweeps compared\n\nMean test accuracy in %, and each pretrained arm minus {baseline_arm()} in points "
        f"with its 95% interval:\n\n{markdown(header, means)}\n\nThe paired differences side by side:\n\n"
        f"{markdown(*table)}\n\nSweeps: " + "; ".join(f"{label}: {', '.join(c)}" for label, c in paths.items())
        + ".\n")
    draw_comparison(sweeps).savefig(out.with_suffix(".png"))
    print(f"\n{aligned(*table)}\n\nCompared: {out.with_suffix('.md')} and {out.with_suffix('.png')}, and each "
          f"sweep's summary beside them")
    return 0


def resume_command(csv_path: str) -> str:
    script = os.path.relpath(__file__)
    return f"python {script if not script.startswith('..') else __file__} --resume {csv_path}"


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    quiet_libraries()
    given = given_flags(argv)
    if cfg.report:
        return report(cfg, given)
    resumed, csv_out = None, None
    with contextlib.ExitStack() as stack:
        if cfg.dry_run:  # a smoke test leaves no runs behind in the real log folder
            cfg.log_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="transfer_mnist_dry_run_"))
        handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
        stack.callback(lambda: [signal.signal(signum, handler) for signum, handler in handlers.items()])
        StopSignal.received = None
        StopSignal.install()
        created: list[Path] = []  # files and folders this start made: removed if it fails
        try:
            if cfg.resume:  # resume
                if cfg.dry_run:
                    raise ExperimentError("--resume continues a real sweep; it does not go with --dry-run")
                cfg, resumed = resume_settings(cfg, given)
            else:
                resolve_protocol(cfg, given)
            as_given = dataclasses.replace(cfg)  # before image folders become target names
            accelerator = check_inputs(cfg, created)
            made = made_by(run_threads(cfg) or torch.get_num_threads(), accelerator)
            if resumed:  # resume
                check_made_by(resumed, made, cfg.resume)
            csv_out = prepare_outputs(cfg, created)
            if not cfg.resume:  # resume: the settings beside the CSV
                created.append(settings_path(csv_out.path))
                save_settings(dataclasses.replace(as_given, version=cfg.version), csv_out.path,
                              {run[2]: pretrain_checkpoint(cfg, run[2]) for run in pretraining_runs(cfg)}, made)
        except OSError as err:
            remove(created)
            print(f"error: cannot write {err.filename or 'the results'} ({one_line(err)})", file=sys.stderr)
            return 2
        except ExperimentError as err:
            remove(created)
            print(f"error: {err}", file=sys.stderr)
            return 2
        logger.info(f"Settings: {', '.join(f'{key}={value}' for key, value in dataclasses.asdict(cfg).items())}")
        summary_path, figure_path = (Path(csv_out.path).with_suffix(suffix) for suffix in (".md", ".png"))
        try:
            results = run_experiment(cfg, csv_out, resumed,
                                     on_pretrained=functools.partial(record_backbone, csv_out.path))  # resume
            summary = write_summary(results, str(summary_path), cfg.select)  # summary
            log_learning_curves(results, cfg)  # summary
            figure = draw_figure(results)  # figure
            figure.savefig(figure_path)  # figure
            log_figure(figure, cfg)  # figure
        except ExperimentError as err:
            if not csv_out.rows:  # a failed start (workers that cannot receive the targets) leaves nothing
                remove(created)
            print(f"error: {err}", file=sys.stderr)
            return 2
        except (OSError, ExperimentFailure) as err:  # a full disk, a killed worker: the finished rows stay
            print(f"error: {one_line(err)}; the finished runs are in {csv_out.path}; to go on: "
                  f"{resume_command(csv_out.path)}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print(f"\nInterrupted: every finished run is in {csv_out.path} (logs: {cfg.log_dir}, {cfg.version}). "
                  f"To go on: {resume_command(csv_out.path)}", file=sys.stderr)
            return 128 + (StopSignal.received or signal.SIGINT)
    show(results, summary)
    if cfg.dry_run:
        print("Dry run: every stage ran; its logs were in a temporary folder, now removed.")
    else:
        print(f"Results: {csv_out.path}, {summary_path} and {figure_path}. "
              f"TensorBoard: tensorboard --logdir {cfg.log_dir}")
    return 0


if __name__ == "__main__":
    # Run as the module that Ray's workers import by name (py_modules), not as __main__: the functions and
    # classes that travel between them are then the same on both sides
    sys.exit(importlib.import_module(Path(__file__).stem).main())
