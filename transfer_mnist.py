"""Transfer learning with PyTorch Lightning: does fine-tuning a pretrained network beat training from
scratch when labels are scarce? The blog post "Fine tuning example for transfer learning", done right.

A truncated LeNet-5 is pretrained on 10,000 labelled MNIST digits; its backbone is reused under a fresh head
on targets with 200 labelled images (even/odd digits, FashionMNIST) by each arm: fine-tuned, from scratch,
frozen, or LP-FT (the head first). Every run is logged to TensorBoard and tested with its best epoch's weights.

    python transfer_mnist.py                       # the post's four runs (about a minute on 2 cores)
    python transfer_mnist.py --dry-run             # every stage on two batches: a smoke test in seconds
    tensorboard --logdir pretraining_logs
    python -m sweeps --protocol fair --workers 2   # the honest answer: seeds, every arm at its best rate

Headline (results/redo_*, new_classes.csv: --protocol fair, 10 seeds from 100, Xeon; Holm per family): the pretrained
arms used 12,500 extra labelled digits. Even/odd, a function of the digit: every arm beats from scratch at 50 labels
(fine-tuned +7.6 points, +4.3 to +10.8); at 200 +10.4 fails Holm; augmented, +1.9 (+0.7 to +3.2). Digits 0-4 -> 5-9:
fine-tuned +2.0 at 200 (+1.0 to +3.0); augmented, +0.1. FashionMNIST: frozen -2.8 at 200; augmented, no difference.
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

logger = logging.getLogger(__name__)


# ---- Registries: a target or an arm is one entry; add yours here ------------------------
@dataclasses.dataclass(frozen=True)
class Target:
    """One task; its head gets one output per label name."""

    dataset: type  # torchvision's MNIST or alike: dataset(root=data_dir, train=..., download=True) has .data, .targets
    label_names: tuple[str, ...]
    relabel: Callable[[torch.Tensor], torch.Tensor] | None = None  # dataset labels -> this task's class indices
    keep: Callable[[torch.Tensor], torch.Tensor] | None = None  # dataset labels -> mask of the samples to keep


TARGETS: dict[str, Target] = {
    "mnist": Target(torchvision.datasets.MNIST, tuple(torchvision.datasets.MNIST.classes)),
    "even-odd": Target(torchvision.datasets.MNIST, ("even", "odd"), relabel=lambda digits: digits % 2),
    "fashion-mnist": Target(torchvision.datasets.FashionMNIST, tuple(torchvision.datasets.FashionMNIST.classes)),
    "digits-0-4": Target(torchvision.datasets.MNIST, tuple("01234"), keep=lambda digits: digits < 5),
    "digits-5-9": Target(torchvision.datasets.MNIST, tuple("56789"), relabel=lambda d: d - 5, keep=lambda d: d > 4),
}


@dataclasses.dataclass(frozen=True)
class Arm:
    """One way to train a target: where its backbone starts, whether it learns, and Adam's rate."""

    learning_rate: float  # --lr ARM=RATE overrides it
    pretrained: bool  # start from the pretrained backbone; the arm without it is the baseline
    train_backbone: bool = True  # False: the backbone is a fixed feature extractor, only the head learns
    head_fraction: float = 0.0  # LP-FT: this share of the epochs trains the head alone first, at head_lr
    head_lr: float = 0.0


HEAD_LR = 1e-3  # a fresh head on a frozen backbone: the best of 1e-4..3e-3 on seed 0's validation loss
ARMS: dict[str, Arm] = {
    # The post's rates: "transfer learning needs smaller learning rates than training from scratch"
    "finetuned": Arm(learning_rate=5e-5, pretrained=True),
    "from_scratch": Arm(learning_rate=1e-4, pretrained=False),
    "frozen": Arm(learning_rate=HEAD_LR, pretrained=True, train_backbone=False),
    # LP-FT (Kumar et al. 2022): a head trained first sends no random gradients into the features; by epoch 100
    # of 500 it was within 0.05 of its best validation loss on the frozen backbone
    "lp_ft": Arm(learning_rate=5e-5, pretrained=True, head_fraction=0.2, head_lr=HEAD_LR),
}

TRAIN_BATCH_SIZE = 128  # the post's; 200 target images make 2 steps an epoch
EVAL_BATCH_SIZE = 500  # evaluation only: the same numbers at any size; pretraining is 29% slower at 32
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081  # the post normalises every dataset with MNIST's statistics
VAL_FRACTION = 0.2  # the post draws n_train / 0.8 images and holds 20% of them out for validation
MONITOR = "ce_loss/val"  # best epoch = lowest validation cross-entropy, as in the post
LIBRARY_WARNINGS = [r"`isinstance\(treespec, LeafSpec\)` is deprecated"]  # Lightning 2.6 on torch 2.14: not yours


class ExperimentError(Exception):
    """Input the experiment cannot run on: main() prints it in one line and exits with status 2."""


class LabelError(ExperimentError):
    """A target's keep or relabel gave no mask, or no class indices in its label names."""


# ---- Data ---------------------------------------------------------------------------------
@functools.cache
def read_split(target: Target, data_dir: str, train: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """uint8 images (N, 28, 28), class indices, and positions in the files (--disjoint), once per process."""
    try:  # torchvision downloads the raw files that are missing
        data = target.dataset(root=data_dir, train=train, download=True)
    except ExperimentError:
        raise
    except Exception as err:  # a failed download, or a file torchvision cannot parse
        name, files = target.dataset.__name__, [Path(file).stem for file, _ in target.dataset.resources]
        raw, split = Path(data_dir, name, "raw"), [file for file in files if file.startswith(("t10k", "train")[train])]
        if all((raw / file).is_file() for file in files):
            raise ExperimentError(f"{' or '.join(split)} in {raw} is damaged (truncated or corrupt); delete it to "
                                  f"download it again") from None
        raise ExperimentError(f"{name} is not in {raw} and could not be downloaded ({str(err).strip().splitlines()[-1]}"
                              f"); put {', '.join(files)} there, or pass --data-dir with a folder that holds "
                              f"{name}/raw/") from None
    images, labels, positions = data.data, data.targets, torch.arange(len(data.targets))
    if target.keep is not None:
        mask = target.keep(labels)
        if getattr(mask, "dtype", None) != torch.bool or mask.shape != labels.shape:
            raise LabelError(f"keep returned {getattr(mask, 'dtype', type(mask))}, not a bool mask, one per label")
        images, labels, positions = images[mask], labels[mask], positions[mask]
    if target.relabel is not None:
        labels = target.relabel(labels)
        if getattr(labels, "dtype", None) not in (torch.int64, torch.int32, torch.uint8) or labels.dim() != 1:
            raise LabelError(f"relabel returned {getattr(labels, 'dtype', type(labels))}, not integer class indices")
    if len(wrong := labels[(labels < 0) | (labels >= len(target.label_names))]):
        raise LabelError(f"label {wrong[0].item()} is outside its {len(target.label_names)} label names")
    return images, labels.long(), positions


def draw_subset(target: str, n_train: int, available: torch.Tensor, seed: int, where: str = "the dataset",
                flag: str = "--n-train") -> tuple[torch.Tensor, torch.Tensor]:
    """Training and validation indices of a (target, seed), the same for each arm (even-odd's no slice of mnist's)."""
    n_val = int(n_train * VAL_FRACTION / (1 - VAL_FRACTION))  # the post draws n_train / 0.8 in all
    if n_val < 1:
        raise ExperimentError(f"{flag} {n_train} is too small to split off a validation set; use at least "
                              f"{math.ceil((1 - VAL_FRACTION) / VAL_FRACTION)}")
    if n_train + n_val > len(available):
        raise ExperimentError(f"{flag} {n_train} needs {n_train + n_val} training images with validation, but "
                              f"{where} has {len(available)}; use at most {int(len(available) * (1 - VAL_FRACTION))}")
    generator = torch.Generator().manual_seed(zlib.crc32(f"{target}/{seed}".encode()))
    order = available[torch.randperm(len(available), generator=generator)]
    return order[:n_train], order[n_train : n_train + n_val]


def pretraining_images(args, pretrain_seed: int) -> torch.Tensor:
    """Positions (read_split) of the images that pretraining with this seed trained and validated on."""
    _, labels, positions = read_split(TARGETS[args.source], args.data_dir, True)
    return positions[torch.cat(draw_subset(args.source, args.n_pretrain, torch.arange(len(labels)), pretrain_seed))]


def available_images(args, target: str, pretrain_seed: int) -> tuple[torch.Tensor, str]:
    """The target's training images a run may draw from (with --disjoint: none its backbone saw), and what they are."""
    _, labels, positions = read_split(TARGETS[target], args.data_dir, True)
    if not (args.disjoint and TARGETS[args.source].dataset == TARGETS[target].dataset):  # the same files?
        return torch.arange(len(labels)), target
    seen = torch.isin(positions, pretraining_images(args, pretrain_seed))
    return torch.arange(len(labels))[~seen], f"{target} without the {int(seen.sum())} images that pretraining used"


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 28, 28) -> float (N, 1, 28, 28), normalised once for the whole set, channels-last."""
    return ((images.float() / 255 - MNIST_MEAN) / MNIST_STD).unsqueeze(1).contiguous(memory_format=torch.channels_last)


class TensorLoader:
    """Batches sliced from tensors in a fixed order (the post's); a DataLoader made target runs 21% slower."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int):
        self.images, self.labels, self.batch_size = images, labels, batch_size

    def __len__(self) -> int: return math.ceil(len(self.labels) / self.batch_size)  # noqa: E704

    def __iter__(self):
        return zip(self.images.split(self.batch_size), self.labels.split(self.batch_size))


def load_data(target: str, n_train: int, data_dir: str, seed: int, available: torch.Tensor | None = None,
              where: str = "the dataset", flag: str = "--n-train", draw: Callable = draw_subset):
    """Train, validation (n_train + 25%, from `available`, as `draw` picks them) and test batches, label names."""
    spec = TARGETS[target]
    try:
        (images, labels, _), (test_images, test_labels, _) = (read_split(spec, data_dir, s) for s in (True, False))
    except LabelError as err:
        raise ExperimentError(f"target {target}: {err}; fix its entry in TARGETS") from None
    train_idx, val_idx = draw(target, n_train, torch.arange(len(labels)) if available is None else available,
                              seed, where, flag)
    return (TensorLoader(normalize(images[train_idx]), labels[train_idx], TRAIN_BATCH_SIZE),
            TensorLoader(normalize(images[val_idx]), labels[val_idx], EVAL_BATCH_SIZE),
            TensorLoader(normalize(test_images), test_labels, EVAL_BATCH_SIZE), spec.label_names)


# ---- Model: swap the backbone here (its output width is the head's input) ----------------
BACKBONE_FEATURES = 120


def decapitated_lenet() -> nn.Sequential:
    """LeNet-5's three convolution blocks without its classifier: (N, 1, 28, 28) -> (N, 120)."""
    return nn.Sequential(
        nn.Conv2d(1, 6, kernel_size=5, padding=2), nn.ReLU(), nn.MaxPool2d(kernel_size=2, stride=2),
        nn.Conv2d(6, 16, kernel_size=5), nn.ReLU(), nn.MaxPool2d(kernel_size=2, stride=2),
        nn.Conv2d(16, BACKBONE_FEATURES, kernel_size=5), nn.ReLU(),
        nn.Flatten(),
    )


def classification_head(n_classes: int) -> nn.Sequential:
    """The part of LeNet-5 that decapitated_lenet() cut off: 120 -> 84 -> n_classes."""
    return nn.Sequential(nn.Linear(BACKBONE_FEATURES, 84), nn.ReLU(), nn.Linear(84, n_classes))


# ---- LightningModule ----------------------------------------------------------------------
class LitModule(lightning.LightningModule):
    """Backbone plus a swappable classification head, trained with cross-entropy and Adam."""

    def __init__(self, label_names, learning_rate: float, train_backbone: bool = True,
                 augment: Callable[[torch.Tensor], torch.Tensor] | None = None):
        super().__init__()
        self.save_hyperparameters(ignore=["augment"])  # into every checkpoint and hparams.yaml
        self.convnet = decapitated_lenet()
        self.classification_head = classification_head(len(label_names))
        self.set_stage(learning_rate, train_backbone)
        self.convnet.to(memory_format=torch.channels_last)  # NCHW: target runs 12%, pretraining 42% slower here
        self.augment = augment  # a transform of training batches (python -m sweeps --augment)
        self.epochs_before = 0  # epochs of an earlier stage (LP-FT): this stage's epochs count on from there
        self._sums, self._counts = {}, {}  # per stage, this epoch: summed loss and hits, samples

    def set_stage(self, learning_rate: float, train_backbone: bool) -> None:
        """What trains, and how fast, from the next fit on: a frozen backbone gets no gradients."""
        self.hparams.learning_rate, self.hparams.train_backbone = learning_rate, train_backbone
        self.convnet.requires_grad_(train_backbone)

    def epoch(self) -> int:
        """The epoch being run, counted from 1 and on across stages, as in every log and file."""
        return self.epochs_before + self.current_epoch + 1

    def forward(self, x: torch.Tensor) -> torch.Tensor: return self.classification_head(self.convnet(x))  # noqa: E704

    def _shared_step(self, batch, stage: str) -> torch.Tensor:
        images, labels = batch
        logits = self(images)
        loss = nn.functional.cross_entropy(logits, labels)
        # summed here, logged once an epoch: self.log() per step made target runs 6% slower
        sums = torch.stack([loss.detach() * len(labels), (logits.argmax(dim=1) == labels).sum().float()])
        self._sums[stage] = self._sums.get(stage, 0) + sums
        self._counts[stage] = self._counts.get(stage, 0) + len(labels)
        return loss

    def _log_epoch(self, stage: str) -> None:
        """The epoch's mean loss and accuracy as <metric>/<stage> at step = epoch (test: in fit_and_test)."""
        mean_loss, accuracy = self._sums.pop(stage) / self._counts.pop(stage)
        metrics = {f"ce_loss/{stage}": mean_loss, f"accuracy/{stage}": accuracy}
        self.log_dict(metrics, logger=False)  # for EarlyStopping, KeepBestWeights and trainer.test()
        if self.logger is not None and stage != "test":
            self.logger.log_metrics({key: value.item() for key, value in metrics.items()}, step=self.epoch())

    def training_step(self, batch, batch_idx):
        images, labels = batch
        if self.augment is not None:  # training batches only: validation and test images stay as they are
            images = self.augment(images)
        return self._shared_step((images, labels), "train")

    def validation_step(self, batch, batch_idx): return self._shared_step(batch, "val")  # noqa: E704
    def test_step(self, batch, batch_idx): return self._shared_step(batch, "test")  # noqa: E704
    def on_train_epoch_end(self): self._log_epoch("train")  # noqa: E704
    def on_validation_epoch_end(self): self._log_epoch("val")  # noqa: E704
    def on_test_epoch_end(self): self._log_epoch("test")  # noqa: E704

    def configure_optimizers(self):
        trainable = [p for p in self.parameters() if p.requires_grad]  # fused: one kernel, pretraining 14% faster
        return torch.optim.Adam(trainable, lr=self.hparams.learning_rate, fused=True)

    def parameter_counts(self) -> dict[str, int]:  # logged with every run: a frozen backbone shows
        return {"trainable_params": sum(p.numel() for p in self.parameters() if p.requires_grad),
                "total_params": sum(p.numel() for p in self.parameters())}


def read_backbone(checkpoint_path: str) -> dict[str, torch.Tensor]:
    """A pretrain() checkpoint's backbone (weights_only: no code runs), strictly: each tensor, nothing else."""
    try:
        state_dict = torch.load(checkpoint_path, map_location="cpu", weights_only=True)["state_dict"]
    except Exception as err:  # missing file, not a checkpoint, not loadable with weights_only
        raise ExperimentError(f"cannot read a Lightning checkpoint from {checkpoint_path}: {err}") from None
    backbone = {key.removeprefix("convnet."): value for key, value in state_dict.items() if key.startswith("convnet.")}
    try:
        with torch.device("meta"):  # no weights made, no random numbers drawn
            decapitated_lenet().load_state_dict(backbone, strict=True, assign=True)
    except RuntimeError as err:
        raise ExperimentError(f"{checkpoint_path} does not hold this script's backbone: "
                              f"{str(err).splitlines()[-1].strip()}") from None
    logger.info(f"Pretrained backbone: {len(backbone)} tensors from {checkpoint_path}")
    return backbone


# ---- Training: the best epoch's weights, tested ----------------------------------------
@dataclasses.dataclass
class RunResult:
    """One run, a row of the results CSV; metrics to the CSV's 6 digits, so that it reads back the same."""

    target: str
    mode: str  # the arm, or "pretrain"
    seed: int
    n_train: int
    best_epoch: int  # counted from 1
    test_loss: float
    test_acc: float
    learning_rate: float  # Adam's; for LP-FT, the fine-tuning stage's
    val_loss: float  # the best validation loss: it picks the best epoch (and a sweep's rate)
    selected: bool  # the rate a sweep's grid chose; every run without a grid
    max_epochs: int  # the budget: a best epoch near it means the run was still improving
    seconds: float = dataclasses.field(default=math.nan, compare=False)  # wall time, not in the CSV


RESULT_COLUMNS = tuple(field.name for field in dataclasses.fields(RunResult))[:-1]


def csv_text(value) -> str:
    """A CSV cell: floats to 6 significant digits (float32 noise cut), booleans lower-case."""
    return f"{value:.6g}" if isinstance(value, float) else str(value).lower() if isinstance(value, bool) else str(value)


def csv_row(r: RunResult) -> list[str]:
    """A run's cells; its learning rate exactly as given (repr), so that every rate is told apart."""
    return [repr(r.learning_rate) if column == "learning_rate" else csv_text(getattr(r, column))
            for column in RESULT_COLUMNS]


def write_results(path: str, results: list[RunResult]) -> None:
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([RESULT_COLUMNS, *map(csv_row, results)])


class KeepBestWeights(lightning.Callback):
    """The best validation epoch's weights (the post's checkpoint 'best'; in memory: a file was 17% slower),
    and five progress lines a run (a progress bar, redrawn every step, made target runs 14% slower)."""

    def __init__(self, run_name: str):
        self.run_name, self.best_loss, self.best_epoch, self.best_state = run_name, math.inf, 0, None

    def on_validation_end(self, trainer, pl_module) -> None:
        loss, epoch, last = trainer.callback_metrics[MONITOR].item(), pl_module.epoch(), trainer.max_epochs
        last += pl_module.epochs_before
        worst = lambda value: math.inf if math.isnan(value) else value  # noqa: E731  (a diverged run: the worst)
        if self.best_state is None or worst(loss) < worst(self.best_loss):
            self.best_loss, self.best_epoch = loss, epoch
            self.best_state = {key: value.detach().clone() for key, value in pl_module.state_dict().items()}
        if epoch % max(1, last // 5) == 0 or epoch == last:
            logger.info(f"{self.run_name}: epoch {epoch}/{last}, val loss {loss:.4f}, best {self.best_loss:.4f} at "
                        f"epoch {self.best_epoch}")


def fit_best(module: LitModule, loaders, run_name: str, max_epochs: int, args, sub_dir: str | None = None,
             keep_best: KeepBestWeights | None = None) -> tuple[lightning.Trainer, KeepBestWeights]:
    """Train, then restore the best-validation weights (an earlier stage's, if its `keep_best` has better)."""
    tb_logger = lightning.pytorch.loggers.TensorBoardLogger(args.log_dir, name=run_name, version=args.version,
                                                           sub_dir=sub_dir, default_hp_metric=False)
    keep_best = keep_best or KeepBestWeights(run_name)
    stopping = lightning.pytorch.callbacks.EarlyStopping(MONITOR, min_delta=args.min_delta, patience=args.patience)
    trainer = lightning.Trainer(
        max_epochs=1 if args.dry_run else max_epochs, accelerator=args.accelerator, devices=args.devices,
        logger=tb_logger, callbacks=[keep_best, stopping] if args.patience else [keep_best],  # --patience 0: never
        deterministic="warn",  # same seed, same numbers; "warn" where CUDA lacks a deterministic kernel
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,  # see above
        num_sanity_val_steps=0, log_every_n_steps=1,  # epoch 1 validates anyway; no warning on 2-step epochs
        **dict.fromkeys(["limit_train_batches", "limit_val_batches", "limit_test_batches"], 2 if args.dry_run else 1.0))
    trainer.fit(module, *loaders)
    module.load_state_dict(keep_best.best_state)
    return trainer, keep_best


def fit_and_test(module: LitModule, loaders, run_name: str, max_epochs: int, args, hparams: dict,
                 sub_dir: str | None = None, keep_best: KeepBestWeights | None = None, started: float = math.nan):
    """fit_best(), then test the best weights: the run's result, also in the HPARAMS tab with its settings."""
    trainer, keep_best = fit_best(module, loaders[:2], run_name, max_epochs, args, sub_dir, keep_best)
    trainer.test(module, loaders[2], verbose=False)
    metrics = {key: trainer.callback_metrics[key].item() for key in ("ce_loss/test", "accuracy/test")}
    trainer.logger.log_hyperparams({**hparams, "best_epoch": keep_best.best_epoch}, metrics=metrics,
                                   step=keep_best.best_epoch)
    trainer.logger.finalize("success")  # flush now: trainer.test() already closed the file once
    six = lambda value: float(csv_text(value))  # noqa: E731  (what the CSV holds)
    return trainer, RunResult(hparams["target"], hparams["mode"], hparams["seed"], hparams["n_train"],
                              keep_best.best_epoch, six(metrics["ce_loss/test"]), six(metrics["accuracy/test"]),
                              hparams["learning_rate"], six(keep_best.best_loss), True, hparams["max_epochs"],
                              time.perf_counter() - started)


# ---- Pretrain and train -------------------------------------------------------------------
def pretrain(args, seed: int, sub_dir: str | None = None) -> tuple[str, RunResult]:
    """Train a model on the source's classes (MNIST's 10 digits); return its best checkpoint and result."""
    started = time.perf_counter()
    logger.info(f"Pretraining on {args.n_pretrain} {args.source} images")
    *loaders, label_names = load_data(args.source, args.n_pretrain, args.data_dir, seed, flag="--n-pretrain")
    lightning.seed_everything(seed, verbose=False)
    module = LitModule(label_names, learning_rate=args.pretrain_lr)
    hparams = {"target": args.source, "mode": "pretrain", "seed": seed, "n_train": args.n_pretrain,
               "learning_rate": args.pretrain_lr, "max_epochs": args.pretrain_epochs, **module.parameter_counts()}
    trainer, result = fit_and_test(module, loaders, "pretrain", args.pretrain_epochs, args, hparams, sub_dir,
                                   started=started)
    path = os.path.join(args.log_dir, "pretrain", args.version, *filter(None, [sub_dir]), "checkpoints", "best.ckpt")
    try:  # the module holds the best-validation weights now: that is the checkpoint to transfer
        trainer.save_checkpoint(path, weights_only=True)
    except RuntimeError as err:  # torch reports a full disk as a RuntimeError of its zip writer
        raise OSError(f"cannot write {path} ({err})") from None
    return path, result


def train(backbone: dict[str, torch.Tensor], target: str, mode: str, args, seed: int, n_train: int,
          learning_rate: float | None = None, pretrain_seed: int | None = None, sub_dir: str | None = None,
          augment: Callable | None = None, draw: Callable = draw_subset) -> RunResult:
    """Train an arm on a target at `learning_rate` (default: the arm's, as --lr sets it), from the backbone
    (pretrained with pretrain_seed, default `seed`) or from scratch, as the arm says, on images `draw` picks."""
    started = time.perf_counter()
    arm, learning_rate = ARMS[mode], learning_rate or args.lr[mode]
    logger.info(f"{target}/{mode}: {n_train} training images, seed {seed}, learning rate {learning_rate:g}")
    available, where = available_images(args, target, seed if pretrain_seed is None else pretrain_seed)
    *loaders, label_names = load_data(target, n_train, args.data_dir, seed, available, where, draw=draw)
    lightning.seed_everything(seed, verbose=False)  # every arm of a seed: the same fresh head
    module = LitModule(label_names, learning_rate, arm.train_backbone, augment)
    if arm.pretrained:  # the pretrained backbone under a fresh head
        module.convnet.load_state_dict(backbone, strict=True)
    hparams = {"target": target, "mode": mode, "seed": seed, "n_train": n_train, "learning_rate": learning_rate,
               "max_epochs": args.train_epochs, **module.parameter_counts()}
    run_name, sub_dir, keep_best = f"{target}/{mode}", sub_dir or f"n{n_train}_seed{seed}", None
    if arm.head_fraction:
        # Two fits, a fresh Adam each (BackboneFinetuning's mid-fit param group breaks fused Adam); best of either
        module.set_stage(arm.head_lr, train_backbone=False)
        head_epochs = max(1, round(arm.head_fraction * args.train_epochs))
        trainer, keep_best = fit_best(module, loaders[:2], run_name, head_epochs, args, sub_dir)
        module.epochs_before = trainer.current_epoch
        module.set_stage(learning_rate, train_backbone=True)
    return fit_and_test(module, loaders, run_name, max(1, args.train_epochs - module.epochs_before), args, hparams,
                        sub_dir, keep_best, started)[1]


# ---- Command line and main() --------------------------------------------------------------
def positive(kind: type) -> Callable[[str], float]:
    """An argparse type: a positive int or float. Its ValueError is argparse's "invalid positive int value"."""
    def parse(text: str):
        return value if 0 < (value := kind(text)) < math.inf else kind("not positive")
    parse.__name__ = f"positive {kind.__name__}"
    return parse


def arm_rate(text: str) -> tuple[str, float]:  # ARM=RATE, e.g. finetuned=1e-3
    arm, _, rate = text.partition("=")
    if arm not in ARMS:
        raise argparse.ArgumentTypeError(f"unknown arm {arm!r} in {text!r}; choose from {', '.join(ARMS)}")
    return arm, positive(float)(rate)


def make_parser() -> argparse.ArgumentParser:
    """One comparison's flags; the defaults are the post's protocol."""
    parser = argparse.ArgumentParser(description="Fine-tuning against training from scratch, on few labels.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = parser.add_argument
    add("--data-dir", default="data", help="folder with MNIST/raw and FashionMNIST/raw; missing files are downloaded")
    add("--log-dir", default="pretraining_logs", help="TensorBoard folder; each invocation adds a version to it")
    add("--results-csv", metavar="PATH", help="a row per run; None: <log-dir>/results_<version>.csv")
    add("--seed", type=int, default=0, help="draws the training subsets and initial weights")
    add("--source", choices=TARGETS, default="mnist", help="target to pretrain the backbone on")
    add("--n-pretrain", type=positive(int), default=10_000, help="pretraining images, +25%% to validate")
    add("--pretrain-epochs", type=positive(int), default=50, help="epochs of pretraining")
    add("--pretrain-lr", type=positive(float), default=1e-4, help="Adam's rate of pretraining")
    add("--targets", nargs="+", choices=TARGETS, default=["even-odd", "fashion-mnist"], help="targets to transfer to")
    add("--modes", nargs="+", choices=ARMS, default=["finetuned", "from_scratch"], help="arms to run on every target")
    add("--lr", nargs="+", type=arm_rate, default=[], metavar="ARM=RATE", help="Adam's rate of an arm; [] keeps "
        "theirs: " + ", ".join(f"{name}={arm.learning_rate:g}" for name, arm in ARMS.items()))
    add("--n-train", type=positive(int), default=200, help="images a target run trains on, +25%% to validate")
    add("--train-epochs", type=positive(int), default=500, help="epochs of a target run")
    add("--patience", type=int, default=100, help="stop this many epochs after the best one, 0 never")
    add("--min-delta", type=float, default=0.0, help="a smaller fall of validation loss is no improvement (--patience)")
    add("--disjoint", action="store_true", help="draw target images only from those that pretraining did not use")
    add("--threads", type=positive(int), help="torch threads; None: torch's own")
    add("--accelerator", default="auto", help="Lightning accelerator: auto, cpu, gpu, mps...")
    add("--devices", default="auto", help="Lightning devices; the experiment runs on one")
    add("--dry-run", action="store_true", help="smoke test: an epoch of two batches a stage, logs in a temporary dir")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = make_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        parser.exit(2, f"error: transfer_mnist.py runs one comparison, without {unknown[0]}; seeds, grids, protocols, "
                    f"Ray, resume and reports are the harness's: python -m sweeps {' '.join(argv or sys.argv[1:])}\n")
    args.lr = {**{name: arm.learning_rate for name, arm in ARMS.items()}, **dict(args.lr)}
    return args


def quiet_libraries() -> None:
    """Lightning's device banner and tips for every run: its warnings only. LIBRARY_WARNINGS: not for users."""
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    for message in LIBRARY_WARNINGS:
        warnings.filterwarnings("ignore", message=message)


def warn_if_busy(threads: int, flags: str = "--threads") -> None:
    """Beside one busy process, torch's default threads made runs 16 to 35 times slower: say so at the start."""
    loadavg = Path("/proc/loadavg")  # Linux's 4th field: the tasks running now, this one too (not the last minute's)
    busy = int(loadavg.read_text().split()[3].split("/")[0]) - 1 if loadavg.exists() else round(os.getloadavg()[0])
    if (cores := os.cpu_count() or 1) - busy < threads:
        logger.warning(f"Warning: other running processes ({busy}) leave {max(cores - busy, 0)} of {cores} cores free "
                       f"for {threads} torch threads: runs may be many times slower; lower {flags}")


def main(argv: list[str] | None = None) -> int:
    """The post's runs: pretrain once, then every arm on every target, a CSV row as each run ends."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    quiet_libraries()
    torch.set_num_threads(args.threads or torch.get_num_threads())
    warn_if_busy(torch.get_num_threads())
    if args.dry_run:  # a smoke test leaves nothing in the real log folder
        args.log_dir = tempfile.mkdtemp(prefix="transfer_mnist_dry_run_")
    try:  # what can fail before training fails now: the data, a label, a size, the output paths
        for target in args.targets:
            load_data(target, args.n_train, args.data_dir, args.seed, *available_images(args, target, args.seed))
        load_data(args.source, args.n_pretrain, args.data_dir, args.seed, flag="--n-pretrain")
        taken = [int(p.name[8:]) for p in Path(args.log_dir).glob("**/version_*") if p.name[8:].isdigit()]
        args.version = f"version_{max(taken, default=-1) + 1}"  # every run's; above all there: nothing overwritten
        csv_path = args.results_csv or os.path.join(args.log_dir, f"results_{args.version}.csv")
        os.makedirs(os.path.dirname(os.path.abspath(csv_path)), exist_ok=True)
        write_results(csv_path, [])
    except (ExperimentError, OSError) as err:
        print(f"error: {err if isinstance(err, ExperimentError) else f'cannot write {err.filename} ({err.strerror})'}",
              file=sys.stderr)
        return 2
    try:
        checkpoint_path, result = pretrain(args, args.seed)
        backbone, results = read_backbone(checkpoint_path), [result]
        for target in args.targets:
            for mode in args.modes:
                write_results(csv_path, results)  # every finished run, before the next one starts
                results.append(train(backbone, target, mode, args, args.seed, args.n_train))
        write_results(csv_path, results)
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C between runs, or in one (Lightning ends it by SystemExit)
        print(f"\nInterrupted: the finished runs are in {csv_path}", file=sys.stderr)
        return 130
    print("\ntarget         mode          best epoch  val loss  test loss  test acc  time")
    for r in results:
        print(f"{r.target:14} {r.mode:13} {r.best_epoch:10}  {r.val_loss:8.4f}  {r.test_loss:9.4f}  {r.test_acc:8.4f}  "
              f"{r.seconds:.1f} s")
    print("Dry run: every stage ran; its logs went to a temporary folder." if args.dry_run else
          f"Results: {csv_path}. TensorBoard: tensorboard --logdir {args.log_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
