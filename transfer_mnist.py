"""Fine-tuning a pretrained network against training from scratch, on few labels: the blog post
"Fine tuning example for transfer learning" done right. A LeNet-5 is pretrained on 10,000 MNIST
digits; each arm (finetuned, from_scratch, frozen, lp_ft) learns a target from 200 labels.

    python transfer_mnist.py             # the post's runs; --dry-run: each stage on two batches
    tensorboard --logdir pretraining_logs

Adapt TARGETS, ARMS or decapitated_lenet(). python -m sweeps uses the registries, ExperimentError,
logger, read_split, draw_subset, load_data, make_data, TensorLoader, TargetData, LitModule, fit,
pretrain, train, read_backbone, RunResult, RESULT_COLUMNS and make_parser.
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
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path

import lightning
import torch
import torchvision
from torch import nn

logger = logging.getLogger(__name__)


# ---- Registries: add targets and arms
@dataclasses.dataclass(frozen=True)
class Target:
    dataset: Callable  # as torchvision's: .data, uint8 (N, H, W) or (N, H, W, C); .targets
    label_names: tuple
    relabel: Callable | None = None  # labels -> class indices
    keep: Callable | None = None  # labels -> mask of the samples kept
    mean: tuple = (0.1307,)  # per channel, of pixels in [0, 1]: MNIST's, as in the post
    std: tuple = (0.3081,)


MNIST, FASHION = torchvision.datasets.MNIST, torchvision.datasets.FashionMNIST
TARGETS = {
    "mnist": Target(MNIST, tuple(MNIST.classes)),
    "even-odd": Target(MNIST, ("even", "odd"), relabel=lambda digits: digits % 2),
    "fashion-mnist": Target(FASHION, tuple(FASHION.classes)),
    "digits-0-4": Target(MNIST, tuple("01234"), keep=lambda digits: digits < 5),
    "digits-5-9": Target(MNIST, tuple("56789"), relabel=lambda d: d - 5, keep=lambda d: d > 4),
}


@dataclasses.dataclass(frozen=True)
class Arm:
    learning_rate: float
    pretrained: bool
    train_backbone: bool = True
    head_fraction: float = 0.0  # LP-FT: the share of epochs for the head alone, first
    head_lr: float = 0.0


HEAD_LR = 1e-3  # the best of 1e-4..3e-3 on seed 0's validation
ARMS = {  # the post's rates: "transfer learning needs smaller learning rates than from scratch"
    "finetuned": Arm(learning_rate=5e-5, pretrained=True),
    "from_scratch": Arm(learning_rate=1e-4, pretrained=False),
    "frozen": Arm(learning_rate=HEAD_LR, pretrained=True, train_backbone=False),
    "lp_ft": Arm(learning_rate=5e-5, pretrained=True, head_fraction=0.2, head_lr=HEAD_LR),
}

TRAIN_BATCH_SIZE = 128  # the post's: 200 target images make 2 steps an epoch
EVAL_BATCH_SIZE = 500  # larger is faster
VAL_SHARE = 0.2  # the post's
LIBRARY_WARNINGS = [r"`isinstance\(treespec, LeafSpec\)` is deprecated",  # Lightning's
                    r"Found \d+ module\(s\) in eval mode"]  # a frozen backbone, on purpose


class ExperimentError(Exception):  # main() prints it in one line, exits 2
    pass


# ---- Data
@functools.cache  # a target registered anew needs read_split.cache_clear()
def read_split(target, data_dir, train):  # uint8 images (N, H, W, C), class indices
    spec = TARGETS[target]
    try:
        data = spec.dataset(root=data_dir, train=train, download=True)
    except Exception as err:
        raise ExperimentError(f"cannot read {target} in {data_dir}: {err}") from None
    images, labels = torch.as_tensor(data.data), torch.as_tensor(data.targets)
    images = images.unsqueeze(-1) if images.dim() == 3 else images
    mask = spec.keep(labels) if spec.keep else torch.ones(len(labels), dtype=torch.bool)
    if getattr(mask, "dtype", None) != torch.bool or mask.shape != labels.shape:
        raise ExperimentError(f"target {target}: keep must give a bool per label; fix TARGETS")
    images, labels = images[mask], labels[mask]
    labels, n = spec.relabel(labels) if spec.relabel else labels, len(spec.label_names)
    integers = getattr(labels, "dtype", None) in (torch.int64, torch.int32, torch.uint8)
    if not (integers and len(labels) == len(images) > 0 and 0 <= labels.min() <= labels.max() < n):
        got = getattr(labels, "dtype", type(labels).__name__)
        raise ExperimentError(f"target {target}: relabel gave {got}, not 0 to {n - 1}; fix TARGETS")
    return images, labels.long()


def draw_subset(target, n_train, n_images, seed):
    # n_train and a quarter as many to validate, as the post
    n_val = int(n_train * VAL_SHARE / (1 - VAL_SHARE))
    if n_val < 1 or n_train + n_val > n_images:
        raise ExperimentError(f"{target}: {n_train} images (+25% to validate) do not fit its "
                              f"{n_images}; use 4 to {n_images * 4 // 5}")
    seed = zlib.crc32(f"{target}/{seed}".encode())  # even-odd's draw is no slice of mnist's
    order = torch.randperm(n_images, generator=torch.Generator().manual_seed(seed))
    return order[:n_train], order[n_train : n_train + n_val]


class TensorLoader:
    """Batches sliced from tensors in memory, in the post's fixed order."""
    def __init__(self, images, labels, batch_size):
        self.images, self.labels, self.batch_size = images, labels, batch_size

    def __len__(self):
        return math.ceil(len(self.labels) / self.batch_size)

    def __iter__(self):
        return zip(self.images.split(self.batch_size), self.labels.split(self.batch_size))


@dataclasses.dataclass
class TargetData:
    target: str
    train: TensorLoader
    val: TensorLoader
    test: TensorLoader


def make_data(target, data_dir, train_idx, val_idx):
    spec = TARGETS[target]
    mean, std = torch.tensor(spec.mean).view(-1, 1, 1), torch.tensor(spec.std).view(-1, 1, 1)

    def loader(images, labels, size=EVAL_BATCH_SIZE):  # normalised once, channels-last
        images = (images.permute(0, 3, 1, 2).float() / 255 - mean) / std
        return TensorLoader(images.contiguous(memory_format=torch.channels_last), labels, size)
    (images, labels), test = read_split(target, data_dir, True), read_split(target, data_dir, False)
    return TargetData(target, loader(images[train_idx], labels[train_idx], TRAIN_BATCH_SIZE),
                      loader(images[val_idx], labels[val_idx]), loader(*test))


def load_data(target, n_train, data_dir, seed):
    n_images = len(read_split(target, data_dir, True)[1])
    return make_data(target, data_dir, *draw_subset(target, n_train, n_images, seed))


# ---- Model: swap the backbone here
def decapitated_lenet(channels):
    return nn.Sequential(
        nn.Conv2d(channels, 6, kernel_size=5, padding=2), nn.ReLU(), nn.MaxPool2d(kernel_size=2),
        nn.Conv2d(6, 16, kernel_size=5), nn.ReLU(), nn.MaxPool2d(kernel_size=2),
        nn.Conv2d(16, 120, kernel_size=5), nn.ReLU(),
        nn.Flatten(),
    )


def classification_head(features, n_classes):  # what decapitated_lenet() cut off
    return nn.Sequential(nn.Linear(features, 84), nn.ReLU(), nn.Linear(84, n_classes))


# ---- LightningModule
class LitModule(lightning.LightningModule):
    def __init__(self, label_names, learning_rate, image_shape=(1, 28, 28), train_backbone=True):
        super().__init__()
        label_names, image_shape = list(label_names), list(image_shape)  # yaml.safe_load reads them
        self.save_hyperparameters()  # as they are now
        self.convnet = decapitated_lenet(image_shape[0])
        with torch.no_grad():  # a blank image in eval mode: no RNG drawn
            features = self.convnet.eval()(torch.zeros(1, *image_shape)).shape[1]
        self.classification_head = classification_head(features, len(label_names))
        self.convnet.to(memory_format=torch.channels_last)  # as the batches: faster
        self.epochs_before = 0  # LP-FT's head stage
        self.sums, self.counts = {}, {}  # per stage, this epoch
        self.best_loss, self.best_epoch, self.best_state = math.inf, 0, None
        self.set_stage(learning_rate, train_backbone)

    def set_stage(self, learning_rate, train_backbone):
        self.hparams.learning_rate, self.hparams.train_backbone = learning_rate, train_backbone
        self.convnet.requires_grad_(train_backbone)
        self.convnet.train(train_backbone)  # frozen: no Dropout, fixed BatchNorm statistics

    def forward(self, x):
        return self.classification_head(self.convnet(x))

    def step(self, batch, stage):
        images, labels = batch
        logits = self(images)
        loss = nn.functional.cross_entropy(logits, labels)
        # summed here, logged once an epoch: faster than self.log() at every step
        hits = (logits.argmax(1) == labels).sum().float()
        sums = torch.stack([loss.detach() * len(labels), hits])
        self.sums[stage] = self.sums.get(stage, 0) + sums
        self.counts[stage] = self.counts.get(stage, 0) + len(labels)
        return loss

    def log_epoch(self, stage):
        loss, accuracy = self.sums.pop(stage) / self.counts.pop(stage)
        metrics = {f"ce_loss/{stage}": loss, f"accuracy/{stage}": accuracy}
        self.log_dict(metrics, logger=False)
        epoch = self.epochs_before + self.current_epoch + 1  # from 1, on across LP-FT's stages
        worse = math.isnan(loss) or loss >= self.best_loss  # NaN, a diverged run, is the worst
        if stage == "val" and (self.best_state is None or not worse):
            self.best_loss, self.best_epoch = loss.item(), epoch
            self.best_state = {k: v.detach().clone() for k, v in self.state_dict().items()}
        if self.logger is not None and stage != "test":  # fit() logs test at the best epoch
            self.logger.log_metrics({k: v.item() for k, v in metrics.items()}, step=epoch)

    def training_step(self, batch, batch_idx): return self.step(batch, "train")
    def validation_step(self, batch, batch_idx): return self.step(batch, "val")
    def test_step(self, batch, batch_idx): return self.step(batch, "test")
    def on_train_epoch_end(self): self.log_epoch("train")
    def on_validation_epoch_end(self): self.log_epoch("val")
    def on_test_epoch_end(self): self.log_epoch("test")

    def configure_optimizers(self):
        trainable = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.Adam(trainable, lr=self.hparams.learning_rate, fused=True)


# ---- Training
@dataclasses.dataclass
class RunResult:
    target: str
    mode: str  # an arm, or "pretrain"
    seed: int
    n_train: int
    best_epoch: int
    test_loss: float
    test_acc: float
    learning_rate: float
    val_loss: float
    selected: bool  # the harness's grids mark their picks; here every run is one
    max_epochs: int


RESULT_COLUMNS = [field.name for field in dataclasses.fields(RunResult)]


def write_results(path, results):
    rows = [dataclasses.astuple(r) for r in results]
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([RESULT_COLUMNS] + [[f"{v:.6g}" if type(v) is float else
                                                      str(v).lower() if type(v) is bool else v
                                                      for v in row] for row in rows])


def fit(module, data, mode, seed, budget, args, test=True):
    """Train for the rest of the budget, keep the best validation epoch's weights, test them."""
    run = f"{data.target}/{mode}" if mode in ARMS else mode
    folder = f"n{len(data.train.labels)}_seed{seed}_lr{args.lr[mode]:g}" if mode in ARMS else None
    limit = 2 if args.dry_run else 1.0
    stop = lightning.pytorch.callbacks.EarlyStopping("ce_loss/val", args.min_delta, args.patience)
    trainer = lightning.Trainer(
        max_epochs=1 if args.dry_run else max(1, budget - module.epochs_before),
        accelerator=args.accelerator, devices=args.devices,
        callbacks=[stop] if args.patience else [],
        logger=lightning.pytorch.loggers.TensorBoardLogger(
            args.log_dir, run, args.version, sub_dir=folder, default_hp_metric=False),
        deterministic="warn",  # same seed, same numbers ("warn": CUDA lacks a few kernels)
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, log_every_n_steps=1,
        limit_train_batches=limit, limit_val_batches=limit, limit_test_batches=limit)
    trainer.fit(module, data.train, data.val)
    module.load_state_dict(module.best_state)
    if not test:
        return trainer, None
    if module.best_epoch == module.epochs_before + trainer.current_epoch and not args.dry_run:
        logger.warning(f"{run}: its best epoch was its last: still improving")
    trainer.test(module, data.test, verbose=False)
    metrics = {m: trainer.callback_metrics[m].item() for m in ("ce_loss/test", "accuracy/test")}
    r = RunResult(data.target, mode, seed, len(data.train.labels), module.best_epoch,
                  *metrics.values(), module.hparams.learning_rate, module.best_loss, True, budget)
    layers = ", ".join(dict.fromkeys(type(m).__name__ for m in module.convnet.children()))
    hparams = {"target": r.target, "mode": mode, "seed": seed, "n_train": r.n_train,
               "learning_rate": r.learning_rate,
               "backbone": f"{type(module.convnet).__name__}({layers})"}
    trainer.logger.log_hyperparams(hparams, metrics, step=r.best_epoch)
    trainer.logger.finalize("success")  # trainer.test() closed it once already
    return trainer, r


# ---- Pretrain and train
def pretrain(args, seed):
    logger.info(f"pretrain: {args.n_pretrain} {args.source} images")
    data = load_data(args.source, args.n_pretrain, args.data_dir, seed)
    lightning.seed_everything(seed, verbose=False)
    names, shape = TARGETS[args.source].label_names, data.test.images.shape[1:]
    module = LitModule(names, args.pretrain_lr, shape)
    trainer, result = fit(module, data, "pretrain", seed, args.pretrain_epochs, args)
    path = os.path.join(trainer.logger.log_dir, "checkpoints", "best.ckpt")
    trainer.save_checkpoint(path, weights_only=True)
    return path, result


def read_backbone(checkpoint_path):
    state = torch.load(checkpoint_path, map_location="cpu", weights_only=True)["state_dict"]
    return {k.removeprefix("convnet."): v for k, v in state.items() if k.startswith("convnet.")}


def train(backbone, mode, data, args):
    arm, rate, names = ARMS[mode], args.lr[mode], TARGETS[data.target].label_names
    logger.info(f"{data.target}/{mode}: seed {args.seed}, rate {rate:g}")
    lightning.seed_everything(args.seed, verbose=False)  # every arm of a seed: the same head
    module = LitModule(names, rate, data.test.images.shape[1:], arm.train_backbone)
    if arm.pretrained:
        module.convnet.load_state_dict(backbone, strict=True)
    if arm.head_fraction:  # LP-FT: two fits, a fresh Adam each, tested with the best of both
        module.set_stage(arm.head_lr, train_backbone=False)
        head_epochs = max(1, round(arm.head_fraction * args.train_epochs))
        trainer = fit(module, data, mode, args.seed, head_epochs, args, test=False)[0]
        module.epochs_before = trainer.current_epoch
        module.set_stage(rate, train_backbone=True)
    return fit(module, data, mode, args.seed, args.train_epochs, args)[1]


# ---- Command line and main()
def positive(kind):
    def parse(text):
        if not 0 < kind(text) < math.inf:
            raise argparse.ArgumentTypeError(f"must be positive, not {text}")
        return kind(text)
    return parse


def make_parser():
    parser = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = parser.add_argument
    add("--data-dir", default="data", help="holds MNIST/raw, FashionMNIST/raw; or gets them")
    add("--log-dir", default="pretraining_logs", help="a version per invocation")
    add("--results-csv", help="None: <log-dir>/results_<version>.csv")
    add("--seed", type=int, default=0, help="draws the subsets and initial weights")
    add("--source", choices=TARGETS, default="mnist", help="the target to pretrain on")
    add("--n-pretrain", type=positive(int), default=10_000, help="+25%% to validate")
    add("--pretrain-epochs", type=positive(int), default=50, help="at most")
    add("--pretrain-lr", type=positive(float), default=1e-4, help="Adam's rate")
    add("--targets", nargs="+", default=["even-odd", "fashion-mnist"], help=", ".join(TARGETS))
    add("--modes", nargs="+", choices=ARMS, default=["finetuned", "from_scratch"], help="arms")
    add("--n-train", type=positive(int), default=200, help="+25%% to validate")
    add("--train-epochs", type=positive(int), default=500, help="at most")
    add("--patience", type=int, default=100, help="epochs after the best; 0: no early stop")
    add("--threads", type=positive(int), help="torch threads; None: torch's own")
    add("--dry-run", action="store_true", help="an epoch of two batches a stage")
    return parser


def parse_args(argv=None):
    parser = make_parser()
    args, unknown = parser.parse_known_args(argv)
    unknown += [target for target in args.targets if target not in TARGETS]
    if unknown:
        given = " ".join(sys.argv[1:] if argv is None else argv)
        parser.exit(2, f"error: {unknown[0]} is no flag or target here; for seeds, grids, image "
                    f"folders: python -m sweeps {given}\n")
    # the harness's flags; here the post's values
    args.lr, args.min_delta = {name: arm.learning_rate for name, arm in ARMS.items()}, 0.0
    args.accelerator, args.devices, args.version = "auto", "auto", None
    return args


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    for message in LIBRARY_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    torch.set_num_threads(args.threads or torch.get_num_threads())
    loadavg = Path("/proc/loadavg")  # 4th field: processes running now, this one too
    busy = int(loadavg.read_text().split()[3].split("/")[0]) - 1 if loadavg.exists() else 0
    if os.cpu_count() - busy < torch.get_num_threads():  # torch's threads would wait
        logger.warning(f"Warning: {busy} other processes are running: runs may be slower")
    args.log_dir = tempfile.mkdtemp() if args.dry_run else args.log_dir
    versions = [p.name[8:] for p in Path(args.log_dir).glob("**/version_*")]
    args.version = f"version_{max(map(int, filter(str.isdigit, versions)), default=-1) + 1}"
    csv_path = args.results_csv or os.path.join(args.log_dir, f"results_{args.version}.csv")
    results = []
    try:  # what can fail before training fails here
        data = {t: load_data(t, args.n_train, args.data_dir, args.seed) for t in args.targets}
        load_data(args.source, args.n_pretrain, args.data_dir, args.seed)
        os.makedirs(os.path.dirname(os.path.abspath(csv_path)), exist_ok=True)
        write_results(csv_path, results)
        checkpoint_path, result = pretrain(args, args.seed)
        backbone, results = read_backbone(checkpoint_path), [result]
        for target in args.targets:
            for mode in args.modes:
                write_results(csv_path, results)
                results.append(train(backbone, mode, data[target], args))
        write_results(csv_path, results)
    except (ExperimentError, OSError) as err:  # OSError: an output path; a full disk
        print(f"error: {str(err).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C
        print(f"\nInterrupted: the finished runs are in {csv_path}", file=sys.stderr)
        return 130
    for r in results:
        print(f"{r.target}/{r.mode}: best epoch {r.best_epoch}, val loss {r.val_loss:.4f}, "
              f"test loss {r.test_loss:.4f}, test accuracy {r.test_acc:.4f}")
    print(f"Results: {csv_path}. TensorBoard: tensorboard --logdir {args.log_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
