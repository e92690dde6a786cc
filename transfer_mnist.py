"""Transfer learning with PyTorch Lightning: does fine-tuning a pretrained network beat
training from scratch when labels are scarce?

A truncated LeNet-5 is pretrained on 10,000 labelled MNIST digits. Its convolutional
backbone is then reused, under a fresh classification head, on two target tasks that
have only 200 labelled training images: even/odd digits (MNIST labels mod 2) and
FashionMNIST. Each target is trained on the very same samples by each arm: fine-tuned from the
pretrained backbone, from scratch, and (--modes frozen) with the backbone frozen. Every run
keeps the weights of its best validation epoch, is tested with them on the full
10,000-image test set, and is logged to TensorBoard. --seeds and several --n-train sizes
repeat the target runs and summarise them with 95% intervals. This is a corrected port of
the blog post "Fine tuning example for transfer learning"; README.md lists the corrections.

Run it:
    pip install -r requirements.txt
    python transfer_mnist.py                             # downloads the data into ./data
    python transfer_mnist.py --data-dir ../shared/data   # raw files already there, offline
    python transfer_mnist.py --dry-run                   # every stage on two batches: seconds
    python transfer_mnist.py --seeds 5 --n-train 50 100 200 500 --modes finetuned from_scratch frozen
    tensorboard --logdir pretraining_logs

Headline, measured on a 2-core AMD EPYC (Zen 4) CPU, no GPU: the default run takes 85-94 s.
Over 5 seeds at 200 labels, fine-tuning beats training from scratch on even/odd by 6.5
points of test accuracy (95% interval +3.8 to +9.1) and makes no difference on FashionMNIST
(-0.1, interval -1.7 to +1.5). README.md "Results" has the tables and commands.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import functools
import gc
import io
import logging
import math
import os
import shutil
import sys
import tempfile
import warnings
import zlib
from pathlib import Path

import lightning
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

logger = logging.getLogger(__name__)

# ---- Defaults: the post's protocol, plus early stopping. The command line mirrors this block. ----
DATA_DIR = "data"  # torchvision layout: <data-dir>/MNIST/raw, <data-dir>/FashionMNIST/raw
LOGDIR = "pretraining_logs"  # the post's TensorBoard folder
SEED = 0  # draws the subsets and initialises the weights: same seed, same numbers
SEEDS = 1  # target runs are repeated for seeds SEED, SEED+1, ...; one is the post's single run
PRETRAIN_EPOCHS = 50  # the post's; pretraining validation loss is still falling at 50
TRAIN_EPOCHS = 500  # the post's; long enough for every target run to overfit, so the best epoch lies inside
N_PRETRAIN = 10_000  # labelled MNIST images to pretrain on (the post's)
N_TRAIN = 200  # labelled target images: the scarce-label regime the post is about
VAL_FRACTION = 0.2  # the post draws n_train / 0.8 images and holds 20% of them out for validation
PRETRAIN_LR = 1e-4  # Adam learning rates tuned in the post:
FINETUNE_LR = 5e-5  # transfer needs a smaller step than training from scratch,
SCRATCH_LR = 1e-4  # or it wrecks the pretrained features
FROZEN_LR = 1e-3  # frozen backbone: only the head learns; best of 1e-4..3e-3 on seed 0's validation loss
TRAIN_BATCH_SIZE = 128  # the post's; 200 target images make 2 steps an epoch
EVAL_BATCH_SIZE = 500  # evaluation only, same numbers at any size; pretraining is 29% slower at 32, 19% at 2500
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081  # the post normalises all three datasets with MNIST's statistics
MONITOR = "ce_loss/val"  # best epoch = lowest validation cross-entropy, as in the post
# Stop a run this many epochs after its best validation loss (0: never, as in the post). Over seeds 0-2
# none of the 12 target runs tested other weights than with all 500 epochs (README "Speed").
PATIENCE = 100
PROGRESS_LINES = 5  # progress lines a run prints (plus its result): visible, and cheap
DRY_RUN_BATCHES = 2  # --dry-run: batches per stage, one epoch each

TARGETS = ("even-odd", "fashion-mnist")
MODES = ("finetuned", "from_scratch", "frozen")
DEFAULT_MODES = ("finetuned", "from_scratch")  # the post's two arms
LEARNING_RATES = {"finetuned": FINETUNE_LR, "from_scratch": SCRATCH_LR, "frozen": FROZEN_LR}
LABEL_NAMES = {
    "mnist": [str(digit) for digit in range(10)],
    "even-odd": ["even", "odd"],
    "fashion-mnist": [
        "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
        "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
    ],
}
RESULT_COLUMNS = ("target", "mode", "seed", "n_train", "best_epoch", "test_loss", "test_acc")


class ExperimentError(Exception):
    """Input the experiment cannot run on. main() prints the message and exits with status 2."""


# ---- Data ---------------------------------------------------------------------------------
def dataset_class(target: str) -> type[torchvision.datasets.MNIST]:
    """torchvision dataset behind a target: even-odd relabels MNIST."""
    if target not in LABEL_NAMES:
        raise ValueError(f"unknown target {target!r}; choose from {sorted(LABEL_NAMES)}")
    return torchvision.datasets.FashionMNIST if target == "fashion-mnist" else torchvision.datasets.MNIST


@functools.cache
def read_split(target: str, data_dir: str, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw uint8 images (N, 28, 28) and int64 labels of one split, read once per process.

    torchvision finds the raw files under data_dir and downloads them only when they are missing.
    """
    cls = dataset_class(target)
    raw_folder = os.path.join(data_dir, cls.__name__, "raw")
    try:
        # torchvision prints every mirror it fails to reach; the error below says it in one line
        with contextlib.redirect_stdout(io.StringIO()):
            dataset = cls(root=data_dir, train=train, download=True)
    except (RuntimeError, OSError) as err:
        files = ", ".join(name.removesuffix(".gz") for name, _ in cls.resources)
        reason = str(err).strip().splitlines()[-1]
        raise ExperimentError(
            f"{cls.__name__} is not in {raw_folder} and could not be downloaded ({reason}); "
            f"put {files} (unzipped) there, or pass --data-dir with a folder that holds {cls.__name__}/raw/"
        ) from None
    labels = dataset.targets % 2 if target == "even-odd" else dataset.targets
    return dataset.data, labels


def validation_size(n_train: int) -> int:
    """Validation images beside n_train training images: the post draws n_train / 0.8 in all."""
    return int(n_train * VAL_FRACTION / (1 - VAL_FRACTION))


def split_sizes(n_train: int, n_available: int, flag: str = "--n-train") -> tuple[int, int]:
    """(train, validation) sizes for n_train training samples, checked against the dataset."""
    n_val = validation_size(n_train)
    if n_train < 1 or n_val < 1:
        smallest = next(n for n in range(1, n_available) if validation_size(n) >= 1)
        raise ExperimentError(f"{flag} {n_train} is too small to split off a validation set; use at least {smallest}")
    if n_train + n_val > n_available:
        largest = int(n_available * (1 - VAL_FRACTION))
        raise ExperimentError(
            f"{flag} {n_train} needs {n_train + n_val} training images with validation, "
            f"but the dataset has {n_available}; use at most {largest}"
        )
    return n_train, n_val


def draw_subset(target: str, n_train: int, n_available: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the training and validation samples of one (target, seed).

    Every arm of a target calls this with the same seed, so they train and validate on the same
    images. The stream depends on the target too, so the even-odd subset is not a slice of the
    pretraining subset that the same seed draws from the same MNIST images.
    """
    n_train, n_val = split_sizes(n_train, n_available)
    generator = torch.Generator().manual_seed(zlib.crc32(f"{target}/{seed}".encode()))
    order = torch.randperm(n_available, generator=generator)
    return order[:n_train], order[n_train : n_train + n_val]


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


def load_data(
    target: str, n_train: int, data_dir: str = DATA_DIR, seed: int = SEED
) -> tuple[TensorLoader, TensorLoader, TensorLoader, list[str]]:
    """Train, validation and test loaders of a target, and its label names.

    n_train training and n_train/4 validation images are drawn from the training split; the test
    loader holds the whole test split.
    """
    images, labels = read_split(target, data_dir, train=True)
    test_images, test_labels = read_split(target, data_dir, train=False)
    train_idx, val_idx = draw_subset(target, n_train, len(labels), seed)
    train_loader = TensorLoader(normalize(images[train_idx]), labels[train_idx], TRAIN_BATCH_SIZE)
    val_loader = TensorLoader(normalize(images[val_idx]), labels[val_idx], EVAL_BATCH_SIZE)
    test_loader = TensorLoader(normalize(test_images), test_labels, EVAL_BATCH_SIZE)
    return train_loader, val_loader, test_loader, LABEL_NAMES[target]


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


# ---- LightningModule ----------------------------------------------------------------------
class LitModule(lightning.LightningModule):
    """Backbone plus a swappable classification head, trained with cross-entropy and Adam."""

    def __init__(self, label_names: list[str], learning_rate: float = SCRATCH_LR, freeze_backbone: bool = False):
        super().__init__()
        self.save_hyperparameters()  # into every checkpoint and hparams.yaml
        self.convnet = decapitated_lenet()
        self.classification_head = classification_head(len(label_names))
        # A frozen backbone is a fixed feature extractor: no gradients, no optimizer state, only the head learns
        self.convnet.requires_grad_(not freeze_backbone)
        # channels-last convolutions and pooling: NCHW makes target runs 12% and pretraining 42% slower here
        self.convnet.to(memory_format=torch.channels_last)
        self._epoch_sums: dict[str, torch.Tensor] = {}  # per stage: summed loss and correct predictions
        self._epoch_counts: dict[str, int] = {}  # per stage: samples seen

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
        """Log the epoch's mean loss and accuracy as <metric>/<stage>: train, val and test read alike."""
        mean_loss, accuracy = self._epoch_sums.pop(stage) / self._epoch_counts.pop(stage)
        self.log_dict({f"ce_loss/{stage}": mean_loss, f"accuracy/{stage}": accuracy})

    def training_step(self, batch, batch_idx):
        return self._shared_step(batch, "train")

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


def transfer_backbone(module: LitModule, checkpoint_path: str) -> None:
    """Copy the pretrained backbone from a pretrain() checkpoint into `module`; its head stays fresh."""
    try:
        state_dict = torch.load(checkpoint_path, map_location="cpu", weights_only=True)["state_dict"]
    except Exception as err:  # missing file, not a checkpoint, not loadable with weights_only
        raise ExperimentError(f"cannot read a Lightning checkpoint from {checkpoint_path}: {err}") from None
    prefix = "convnet."
    backbone = {key.removeprefix(prefix): value for key, value in state_dict.items() if key.startswith(prefix)}
    try:
        # strict: every backbone tensor must be there with the right shape; the head is not touched
        module.convnet.load_state_dict(backbone, strict=True)
    except RuntimeError as err:
        first_line = str(err).splitlines()[1].strip() if "\n" in str(err) else str(err)
        raise ExperimentError(f"{checkpoint_path} does not hold this script's backbone: {first_line}") from None
    logger.info(f"Transferred {len(backbone)} backbone tensors from {checkpoint_path}; fresh head")


# ---- Experiment ---------------------------------------------------------------------------
@dataclasses.dataclass
class Config:
    """One invocation's settings: the command line, with the defaults above."""

    data_dir: str = DATA_DIR
    log_dir: str = LOGDIR
    version: str = "version_0"
    seed: int = SEED
    pretrain_epochs: int = PRETRAIN_EPOCHS
    train_epochs: int = TRAIN_EPOCHS
    n_pretrain: int = N_PRETRAIN
    n_train: tuple[int, ...] = (N_TRAIN,)
    seeds: int = SEEDS
    targets: tuple[str, ...] = TARGETS
    modes: tuple[str, ...] = DEFAULT_MODES
    accelerator: str = "auto"
    devices: str = "auto"
    patience: int = PATIENCE
    dry_run: bool = False


@dataclasses.dataclass
class RunResult:
    """One row of the results table and CSV."""

    target: str
    mode: str
    seed: int
    n_train: int
    best_epoch: int
    test_loss: float
    test_acc: float


class KeepBestWeights(lightning.Callback):
    """Remembers the weights of the epoch with the lowest validation loss.

    This is what the post means by "Lightning model checkpoint 'best'", kept in memory: writing a
    ModelCheckpoint file at every improvement made target runs 17% slower, measured. fit_and_test()
    restores these weights before testing.
    """

    def __init__(self, monitor: str = MONITOR):
        self.monitor = monitor
        self.best_loss = math.inf
        self.best_epoch = -1
        self.best_state: dict[str, torch.Tensor] | None = None

    def on_validation_end(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule) -> None:
        loss = trainer.callback_metrics[self.monitor].item()
        if loss < self.best_loss:
            self.best_loss, self.best_epoch = loss, trainer.current_epoch
            self.best_state = {key: value.detach().clone() for key, value in pl_module.state_dict().items()}


class ProgressLog(lightning.Callback):
    """A few log lines per run. Lightning's progress bar, redrawn at every step, made target runs 14%
    and pretraining 19% slower; these lines cost too little to measure."""

    def __init__(self, run_name: str, keep_best: KeepBestWeights, lines: int = PROGRESS_LINES):
        self.run_name, self.keep_best, self.lines = run_name, keep_best, lines

    def on_validation_end(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule) -> None:
        epoch, every = trainer.current_epoch + 1, max(1, trainer.max_epochs // self.lines)
        if epoch % every == 0 or epoch == trainer.max_epochs:
            loss = trainer.callback_metrics[self.keep_best.monitor].item()
            logger.info(
                f"{self.run_name}: {epoch}/{trainer.max_epochs} epochs, val loss {loss:.4f}, "
                f"best {self.keep_best.best_loss:.4f} at epoch {self.keep_best.best_epoch}"
            )

    def on_train_end(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule) -> None:
        if trainer.current_epoch < trainer.max_epochs:  # EarlyStopping ended the run
            logger.info(f"{self.run_name}: stopped after {trainer.current_epoch}/{trainer.max_epochs} epochs, "
                        f"no better validation loss since epoch {self.keep_best.best_epoch}")


def fit_and_test(
    module: LitModule,
    loaders: tuple[TensorLoader, TensorLoader, TensorLoader],
    run_name: str,
    max_epochs: int,
    cfg: Config,
    hparams: dict,
    sub_dir: str | None = None,
) -> tuple[lightning.Trainer, KeepBestWeights, dict[str, float]]:
    """Train for max_epochs, restore the best-validation weights, test them, log the run to TensorBoard
    under <log_dir>/<run_name>/<version>[/<sub_dir>]."""
    tb_logger = lightning.pytorch.loggers.TensorBoardLogger(
        cfg.log_dir, name=run_name, version=cfg.version, sub_dir=sub_dir,
        default_hp_metric=False,  # no -1 placeholder in the HPARAMS tab
    )
    keep_best = KeepBestWeights()
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
    if trainer.world_size > 1:
        raise ExperimentError("this experiment runs on one device; pass --devices 1")
    device = trainer.strategy.root_device
    train_loader, val_loader, test_loader = (loader.to(device) for loader in loaders)
    try:
        trainer.fit(module, train_loader, val_loader)
    except SystemExit:  # Lightning turns Ctrl-C into sys.exit(1) after shutting the run down
        if trainer.interrupted:
            raise KeyboardInterrupt from None
        raise
    if trainer.interrupted:  # older Lightning returns from fit() instead
        raise KeyboardInterrupt
    module.load_state_dict(keep_best.best_state)
    (metrics,) = trainer.test(module, test_loader, verbose=False)
    # HPARAMS tab: one row per run, compared on the test metrics logged above
    tb_logger.log_hyperparams(
        {**hparams, "best_epoch": keep_best.best_epoch},
        metrics={key: metrics[key] for key in ("ce_loss/test", "accuracy/test")},
        step=trainer.global_step,
    )
    return trainer, keep_best, metrics


def run_result(hparams: dict, keep_best: KeepBestWeights, metrics: dict) -> RunResult:
    result = RunResult(hparams["target"], hparams["mode"], hparams["seed"], hparams["n_train"],
                       keep_best.best_epoch, metrics["ce_loss/test"], metrics["accuracy/test"])
    logger.info(f"{result.target}/{result.mode}: best epoch {result.best_epoch}, "
                f"test loss {result.test_loss:.4f}, test accuracy {result.test_acc:.4f}")
    return result


def pretrain(cfg: Config) -> tuple[str, RunResult]:
    """Train a model on MNIST that classifies all 10 digits; return its best checkpoint and result."""
    logger.info(f"Pretraining on {cfg.n_pretrain} MNIST images, all 10 classes")
    train_loader, val_loader, test_loader, label_names = load_data("mnist", cfg.n_pretrain, cfg.data_dir, cfg.seed)
    lightning.seed_everything(cfg.seed, verbose=False)
    module = LitModule(label_names=label_names, learning_rate=PRETRAIN_LR)
    hparams = {"target": "mnist", "mode": "pretrain", "seed": cfg.seed, "n_train": cfg.n_pretrain,
               "learning_rate": PRETRAIN_LR, "max_epochs": cfg.pretrain_epochs, **module.parameter_counts()}
    trainer, keep_best, metrics = fit_and_test(
        module, (train_loader, val_loader, test_loader), "pretrain", cfg.pretrain_epochs, cfg, hparams
    )
    # the module holds the best-validation weights now: that is the checkpoint to transfer
    checkpoint_path = os.path.join(trainer.logger.log_dir, "checkpoints", "best.ckpt")
    trainer.save_checkpoint(checkpoint_path, weights_only=True)
    logger.info(f"Best pretraining checkpoint: {checkpoint_path}")
    return checkpoint_path, run_result(hparams, keep_best, metrics)


def train(pretrained_checkpoint: str | None, target: str, cfg: Config, seed: int = SEED, n_train: int = N_TRAIN,
          freeze_backbone: bool = False) -> RunResult:
    """Train on a target task: from scratch when pretrained_checkpoint is None, else from its backbone,
    fine-tuned or (freeze_backbone) frozen under a trained head."""
    mode = "from_scratch" if pretrained_checkpoint is None else "frozen" if freeze_backbone else "finetuned"
    learning_rate = LEARNING_RATES[mode]
    logger.info(f"{target}/{mode}: {n_train} training images, seed {seed}")
    train_loader, val_loader, test_loader, label_names = load_data(target, n_train, cfg.data_dir, seed)
    # Same seed for every arm: same subset (above) and the same fresh head
    lightning.seed_everything(seed, verbose=False)
    module = LitModule(label_names=label_names, learning_rate=learning_rate, freeze_backbone=freeze_backbone)
    if pretrained_checkpoint is not None:
        transfer_backbone(module, pretrained_checkpoint)
    hparams = {"target": target, "mode": mode, "seed": seed, "n_train": n_train, "learning_rate": learning_rate,
               "max_epochs": cfg.train_epochs, **module.parameter_counts()}
    logger.info(f"{target}/{mode}: {hparams['trainable_params']} of {hparams['total_params']} parameters train")
    run_name = f"{target}/{mode}"
    _, keep_best, metrics = fit_and_test(
        module, (train_loader, val_loader, test_loader), run_name, cfg.train_epochs, cfg, hparams,
        sub_dir=f"n{n_train}_seed{seed}",
    )
    return run_result(hparams, keep_best, metrics)


# ---- Results: table, CSV, summary over seeds, learning curves ---------------------------
def format_table(results: list[RunResult]) -> str:
    """One line per run, aligned."""
    header = (f"{'target':<14} {'mode':<13} {'n_train':>7} {'seed':>4} "
              f"{'best epoch':>10} {'test loss':>9} {'test acc':>8}")
    lines = [header, "-" * len(header)]
    for r in results:
        lines.append(f"{r.target:<14} {r.mode:<13} {r.n_train:>7} {r.seed:>4} "
                     f"{r.best_epoch:>10} {r.test_loss:>9.4f} {r.test_acc:>8.4f}")
    return "\n".join(lines)


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
    def of(cls, values: list[float]) -> MeanCI:
        n = len(values)
        mean = sum(values) / n
        if n < 2:
            return cls(n, mean, math.nan, math.nan, math.nan)
        sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
        half_width = t_975(n - 1) * sd / math.sqrt(n)
        return cls(n, mean, sd, mean - half_width, mean + half_width)

    def text(self, digits: int = 4) -> tuple[str, str]:
        """("mean ± sd", "[low, high]") for tables; one value has no spread."""
        if self.n < 2:
            return f"{self.mean:.{digits}f}", "n/a"
        return f"{self.mean:.{digits}f} ± {self.sd:.{digits}f}", f"[{self.low:.{digits}f}, {self.high:.{digits}f}]"


def group_by_arm(results: list[RunResult]) -> dict[tuple[str, int, str], dict[int, RunResult]]:
    """Target runs by (target, n_train, mode), then by seed; pretraining left out."""
    groups: dict[tuple[str, int, str], dict[int, RunResult]] = {}
    for r in results:
        if r.mode != "pretrain":
            groups.setdefault((r.target, r.n_train, r.mode), {})[r.seed] = r
    return groups


def summarize(results: list[RunResult]) -> tuple[list[list[str]], list[list[str]]]:
    """Rows of two tables: each (target, n_train, mode) over seeds, and each transfer arm minus
    from_scratch, paired by seed (same subset, same head initialisation)."""
    groups = group_by_arm(results)
    arms, differences = [], []
    for (target, n_train, mode), by_seed in groups.items():
        acc, loss = MeanCI.of([r.test_acc for r in by_seed.values()]), MeanCI.of([r.test_loss for r in by_seed.values()])
        arms.append([target, str(n_train), mode, str(acc.n), *acc.text(), *loss.text()])
        baseline = groups.get((target, n_train, "from_scratch"))
        if mode == "from_scratch" or baseline is None:
            continue
        seeds = sorted(by_seed.keys() & baseline.keys())
        acc = MeanCI.of([by_seed[s].test_acc - baseline[s].test_acc for s in seeds])
        loss = MeanCI.of([by_seed[s].test_loss - baseline[s].test_loss for s in seeds])
        differences.append([target, str(n_train), f"{mode} - from_scratch", str(acc.n), *acc.text(), *loss.text()])
    return arms, differences


ARM_HEADER = ["target", "n_train", "mode", "seeds", "test acc mean ± sd", "95% CI", "test loss mean ± sd", "95% CI"]
DIFF_HEADER = ["target", "n_train", "paired difference", "seeds", "Δ test acc mean ± sd", "95% CI",
               "Δ test loss mean ± sd", "95% CI"]


def aligned(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [header, *rows]]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(row) + " |" for row in lines)


def write_summary(results: list[RunResult], path: str) -> str:
    """The summary over seeds as aligned text (returned) and as Markdown at `path`."""
    arms, differences = summarize(results)
    with open(path, "w") as f:
        f.write(f"# Test results over seeds\n\n{markdown(ARM_HEADER, arms)}\n\n")
        f.write("Paired by seed: both arms of a seed share the training subset and the head's initial weights.\n\n")
        f.write(f"{markdown(DIFF_HEADER, differences)}\n")
    return f"{aligned(ARM_HEADER, arms)}\n\n{aligned(DIFF_HEADER, differences)}"


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


class ResultsCsv:
    """Appends each finished run's row at once, so an interrupted experiment keeps what it finished."""

    def __init__(self, path: str):
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w", newline="") as f:
            csv.writer(f).writerow(RESULT_COLUMNS)

    def append(self, result: RunResult) -> None:
        with open(self.path, "a", newline="") as f:
            csv.writer(f).writerow(dataclasses.astuple(result))


def run_names() -> set[str]:
    """Top-level entries that this script writes into the log folder (besides results_*)."""
    return {"pretrain", "learning_curve", *TARGETS}


def prepare_log_dir(log_dir: str, overwrite: bool) -> str:
    """Clear log_dir if asked to, and return the version name that this invocation's runs share."""
    if overwrite and os.path.isdir(log_dir):
        foreign = sorted(name for name in os.listdir(log_dir)
                         if name not in run_names() and not name.startswith("results_"))
        if foreign:
            raise ExperimentError(
                f"--overwrite would delete {log_dir}, which holds files this script did not write "
                f"({', '.join(foreign[:3])}); choose another --log-dir"
            )
        logger.info(f"--overwrite: removing {log_dir}")
        shutil.rmtree(log_dir)
    taken = [int(path.name.removeprefix("version_")) for path in Path(log_dir).glob("**/version_*")
             if path.name.removeprefix("version_").isdigit()]
    return f"version_{max(taken, default=-1) + 1}"


def check_data(cfg: Config) -> None:
    """Fail before pretraining, not half an hour later, when a dataset or a size is wrong."""
    for target, sizes, flag in [("mnist", [cfg.n_pretrain], "--n-pretrain")] + [
        (target, cfg.n_train, "--n-train") for target in cfg.targets
    ]:
        images, _ = read_split(target, cfg.data_dir, train=True)
        read_split(target, cfg.data_dir, train=False)
        for n_train in sizes:
            split_sizes(n_train, len(images), flag)


def run_experiment(cfg: Config, results_csv: str) -> list[RunResult]:
    """Pretrain once, then run every arm on every target, training-set size and seed.

    Rows go to the CSV as runs finish; the summary and learning curves follow at the end.
    """
    check_data(cfg)
    csv_out = ResultsCsv(results_csv)
    results = []

    def finished(result: RunResult) -> None:
        results.append(result)
        csv_out.append(result)
        # Free the finished run now: Lightning's reference cycles keep its tensors until the cyclic
        # collector happens to run. Measured: without this, resident memory grew from 1.1 to 1.45 GB
        # over 24 runs (2.7 GB over 121); each collection takes 0.16 s.
        gc.collect()

    checkpoint_path, result = pretrain(cfg)
    finished(result)
    for target in cfg.targets:
        for n_train in cfg.n_train:
            for seed in range(cfg.seed, cfg.seed + cfg.seeds):
                for mode in cfg.modes:
                    checkpoint = None if mode == "from_scratch" else checkpoint_path
                    finished(train(checkpoint, target, cfg, seed, n_train, freeze_backbone=mode == "frozen"))
    log_learning_curves(results, cfg)
    return results


# ---- Command line -------------------------------------------------------------------------
def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, not {text}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {text}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Pretrain a truncated LeNet-5 on MNIST, then compare fine-tuning it with training from "
        "scratch (and, optionally, a frozen backbone) on small even/odd and FashionMNIST training sets. "
        "Every run is tested with its best-validation weights and logged to TensorBoard.",
    )
    add = parser.add_argument
    add("--data-dir", default=DATA_DIR,
        help="folder with MNIST/raw and FashionMNIST/raw; missing files are downloaded (default: %(default)s)")
    add("--log-dir", default=LOGDIR,
        help="TensorBoard folder; each invocation adds a new version to it (default: %(default)s)")
    add("--seed", type=int, default=SEED,
        help="first seed: draws the training subsets and initial weights, and seeds pretraining (default: %(default)s)")
    add("--seeds", type=positive_int, default=SEEDS,
        help="repeat every target run for this many seeds, --seed upwards (default: %(default)s)")
    add("--pretrain-epochs", type=positive_int, default=PRETRAIN_EPOCHS,
        help="epochs of MNIST pretraining (default: %(default)s)")
    add("--train-epochs", type=positive_int, default=TRAIN_EPOCHS,
        help="epochs of every target run; its best-validation epoch is tested (default: %(default)s)")
    add("--n-pretrain", type=int, default=N_PRETRAIN,
        help="MNIST training images for pretraining, plus a quarter as many for validation (default: %(default)s)")
    add("--n-train", type=int, nargs="+", default=[N_TRAIN],
        help="training images per target run, plus a quarter as many for validation; several sizes "
        "give a learning curve, e.g. --n-train 50 100 200 500 (default: %(default)s)")
    add("--targets", nargs="+", choices=TARGETS, default=list(TARGETS),
        help="target tasks to transfer to (default: %(default)s)")
    add("--modes", nargs="+", choices=MODES, default=list(DEFAULT_MODES),
        help="arms to run on every target: finetuned, from_scratch, and frozen, the pretrained "
        "backbone as a fixed feature extractor (default: %(default)s)")
    add("--patience", type=non_negative_int, default=PATIENCE,
        help="stop a run this many epochs after its best validation loss; 0 never stops early (default: %(default)s)")
    add("--accelerator", default="auto", help="Lightning accelerator: auto, cpu, gpu, mps, ... (default: %(default)s)")
    add("--devices", default="auto", help="Lightning devices; the experiment runs on one (default: %(default)s)")
    add("--results-csv", metavar="PATH",
        help="results CSV; the summary over seeds goes beside it with a .md suffix "
        "(default: <log-dir>/results_<version>.csv)")
    add("--overwrite", action="store_true",
        help="delete the log folder first, instead of adding a new version beside the earlier ones")
    add("--dry-run", action="store_true",
        help="smoke test: every stage for one epoch of two batches, logs in a temporary folder")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # Lightning repeats its device and tip banners for every run; keep its warnings only
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    # Lightning 2.6 calls a pytree API that torch 2.14 deprecates; nothing for a user to act on
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    cfg = Config(
        data_dir=args.data_dir, log_dir=args.log_dir, seed=args.seed, seeds=args.seeds,
        pretrain_epochs=args.pretrain_epochs, train_epochs=args.train_epochs, n_pretrain=args.n_pretrain,
        n_train=tuple(dict.fromkeys(args.n_train)), targets=tuple(dict.fromkeys(args.targets)),
        modes=tuple(dict.fromkeys(args.modes)), patience=args.patience,
        accelerator=args.accelerator, devices=args.devices, dry_run=args.dry_run,
    )
    with contextlib.ExitStack() as stack:
        if cfg.dry_run:  # a smoke test leaves no runs behind in the real log folder
            cfg.log_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="transfer_mnist_dry_run_"))
        try:
            cfg.version = prepare_log_dir(cfg.log_dir, args.overwrite and not cfg.dry_run)
            results_csv = args.results_csv or os.path.join(cfg.log_dir, f"results_{cfg.version}.csv")
            results = run_experiment(cfg, results_csv)
            summary = write_summary(results, str(Path(results_csv).with_suffix(".md")))
        except ExperimentError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print(f"\nInterrupted: runs that finished are kept in {cfg.log_dir} ({cfg.version}).", file=sys.stderr)
            return 130
    print(f"\n{format_table(results)}\n\n{summary}\n")
    if cfg.dry_run:
        print("Dry run: every stage ran; its logs were in a temporary folder, now removed.")
    else:
        print(f"Results: {results_csv} and {Path(results_csv).with_suffix('.md')}. "
              f"TensorBoard: tensorboard --logdir {cfg.log_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
