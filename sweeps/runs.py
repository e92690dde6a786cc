"""A sweep's runs: the Run record, the plan (every pretraining and target run, in the results'
order), one run executed with the template's pretrain() and train(), and the results CSV
written and read back (selection.py chooses a rate in each grid). Imported by the engines, resume,
start and the reporting modules; it imports settings, stop, files, data and the template, never
a reporting module."""

import argparse
import csv
import dataclasses
import functools
import io
import math
import os
import time
import typing

import lightning
import torch

import transfer_mnist as tm
from sweeps.data import pretraining_data, target_data
from sweeps.files import replace
from sweeps.settings import backbone_seed, seeds
from sweeps.stop import StopSignal


@dataclasses.dataclass
class RunResult(tm.RunResult):
    """A row of a sweep: the template's record of a run, and its wall time (not in the CSV)."""

    seconds: float = dataclasses.field(default=math.nan, compare=False)


@dataclasses.dataclass(frozen=True)
class Run:
    """What one run trains: an arm (or "pretrain") on a target at a size, seed and rate. A row's
    key."""

    target: str
    mode: str
    seed: int
    n_train: int
    learning_rate: float

    def __str__(self):
        return (f"{self.target}/{self.mode} n_train {self.n_train} seed {self.seed} "
                f"lr {self.learning_rate:g}")


def run_key(r):
    """The run a row holds."""
    return Run(r.target, r.mode, r.seed, r.n_train, r.learning_rate)


def sweep_runs(cfg):
    """Every target run of a sweep, in the results' order."""
    return [Run(target, mode, seed, n_train, rate)
            for target in cfg.targets for n_train in cfg.n_train for seed in seeds(cfg)
            for mode in cfg.modes for rate in cfg.lr_grid or (cfg.lr[mode],)]


def widened_runs(cfg, widened):
    """The runs of the rates that --widen added: each (target, mode, n_train, rate) for every seed
    (pooled or mean selection), each (target, mode, n_train, rate, seed) for its seed alone
    (--select seed)."""
    return [Run(target, mode, seed, n_train, rate) for target, mode, n_train, rate, *seed in widened
            for seed in (seed or seeds(cfg))]


def pretraining_rates(cfg):
    """The rates each backbone is pretrained at, to keep the one of the lowest validation loss:
    --pretrain-lr-grid, else --pretrain-lr alone."""
    return tuple(cfg.pretrain_lr_grid) or (cfg.pretrain_lr,)


def pretraining_runs(cfg):
    """The pretraining runs: for the invocation, or per seed; each at every pretraining rate. None
    with --weights: every pretrained arm starts from them."""
    backbone_seeds = dict.fromkeys(backbone_seed(cfg, seed) for seed in seeds(cfg))
    return [Run(cfg.source, "pretrain", seed, cfg.n_pretrain, rate)
            for seed in backbone_seeds for rate in pretraining_rates(cfg) if not cfg.weights]


def backbone_version(cfg, seed, rate):
    """A backbone's TensorBoard version: the sweep's, with a folder per seed and rate inside it
    where the sweep pretrains several."""
    parts = [f"seed{seed}"] if cfg.backbone_per_seed else []
    if cfg.pretrain_lr_grid:
        parts.append(f"lr{rate:g}")
    return os.path.join(cfg.version, "_".join(parts)) if parts else cfg.version


def run_folder(cfg, run):
    """Where the run writes its TensorBoard logs (and a pretraining its checkpoint); a target run's
    as the template's fit() names it."""
    if run.mode == "pretrain":
        version = backbone_version(cfg, run.seed, run.learning_rate)
        return os.path.join(cfg.log_dir, "pretrain", version)
    folder = f"n{run.n_train}_seed{run.seed}_lr{run.learning_rate:g}"
    return os.path.join(cfg.log_dir, f"{run.target}/{run.mode}", cfg.version, folder)


def pretrain_checkpoint(cfg, seed, rate=None):
    """Where tm.pretrain() writes the backbone of this seed (and rate: the first of the grid, for
    None)."""
    rate = pretraining_rates(cfg)[0] if rate is None else rate
    run = Run(cfg.source, "pretrain", seed, cfg.n_pretrain, rate)
    return os.path.join(run_folder(cfg, run), "checkpoints", "best.ckpt")


def recorded(r, started):
    """A run's row, its numbers as its CSV row holds them (6 significant digits: a sweep selects on
    the numbers that --report and --resume read back), and its wall time since `started`."""
    six = {name: float(f"{getattr(r, name):.6g}") for name in ("test_loss", "test_acc", "val_loss")}
    return RunResult(**{**dataclasses.asdict(r), **six}, seconds=time.perf_counter() - started)


def shuffled_pretrain(settings, seed):
    """tm.pretrain()'s steps, on training batches in a new order every epoch (--shuffle)."""
    data = pretraining_data(settings, seed)
    lightning.seed_everything(seed, verbose=False)
    names = tm.TARGETS[settings.source].label_names
    module = tm.LitModule(names, settings.pretrain_lr, data.shape, backbone=settings.backbone)
    trainer, result = tm.fit(module, data, "pretrain", seed, settings.pretrain_epochs, settings)
    path = os.path.join(trainer.logger.log_dir, "checkpoints", "best.ckpt")
    trainer.save_checkpoint(path, weights_only=True)
    return path, result


def pretrain_backbone(cfg, seed):
    """Seed's backbone at every pretraining rate (pretraining_rates()), through the template's
    pretrain(), and the one of the lowest validation loss (the lower rate on a tie; NaN, a
    diverged run, the worst): every rate's row, the pick's selected (the CSV keeps the pick's),
    and the pick's backbone."""
    results, paths = [], {}
    patience = cfg.patience if cfg.pretrain_patience is None else cfg.pretrain_patience
    for rate in pretraining_rates(cfg):
        started = time.perf_counter()
        # --min-delta is the target runs': pretraining's loss on 2,500 images stays far from 0
        settings = argparse.Namespace(**dict(vars(cfg), min_delta=0.0, pretrain_lr=rate,
                                             patience=patience,
                                             version=backbone_version(cfg, seed, rate)))
        paths[rate], result = (shuffled_pretrain if cfg.shuffle else tm.pretrain)(settings, seed)
        results.append(recorded(result, started))
    pick = min(results, key=lambda r: (not_nan(r.val_loss), r.learning_rate))
    for r in results:
        r.selected = r is pick
    return results, tm.read_backbone(paths[pick.learning_rate])


@functools.cache
def read_weights(backbone, weights, channels):
    """--weights' tensors (tm.read_weights), read once per process: the driver checks them before
    any run and hands them to the runs; each Ray worker gets them once, from the object store."""
    return tm.read_weights(argparse.Namespace(backbone=backbone, weights=weights), channels)


def execute(cfg, run, backbone):
    """One run, here, through the template's pretrain() and train(), with the template's settings
    for this run: a pretraining is seed's whole pretraining grid, its rows and the backbone it
    keeps; a target run starts from `backbone`."""
    started = time.perf_counter()
    try:
        if run.mode == "pretrain":
            return pretrain_backbone(cfg, run.seed)
        rates = {**cfg.lr, run.mode: run.learning_rate}
        settings = argparse.Namespace(**dict(vars(cfg), seed=run.seed, lr=rates))
        data = target_data(cfg, run.target, run.n_train, run.seed)
        return recorded(tm.train(backbone, run.mode, data, settings), started), None
    # Lightning ends a fit that a signal interrupted with sys.exit(1): stop the sweep instead
    except SystemExit:
        if StopSignal.received is not None:
            raise KeyboardInterrupt from None
        raise


def save_backbone(backbone, checkpoint_path):
    """A backbone as a checkpoint that tm.read_backbone() reads (one pretrained on another node,
    for --resume)."""
    os.makedirs(os.path.dirname(checkpoint_path), exist_ok=True)
    state = {f"convnet.{key}": value for key, value in backbone.items()}
    torch.save({"state_dict": state}, checkpoint_path)


def not_nan(loss):
    """A loss to compare: NaN (a diverged run) counts as the worst."""
    return math.inf if math.isnan(loss) else loss


# ---- The results CSV --------------------------------------------------------------------
def csv_row(r):
    """A run's cells, as the template writes them, but its learning rate exactly as given (repr),
    so that every rate of a grid is told apart and read back as the same run."""
    return [repr(r.learning_rate) if column == "learning_rate" else tm.csv_value(getattr(r, column))
            for column in tm.RESULT_COLUMNS]


def write_rows(path, results):
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([tm.RESULT_COLUMNS, *map(csv_row, results)])


class ResultsCsv:
    """Appends each finished run's row at once, so an interrupted sweep keeps what it finished."""

    def __init__(self, path, append=False):
        self.path = path
        if not append:
            write_rows(path, [])

    def rewrite(self, results):
        """Replace the file by these rows in this order, in one step (the old file stays if writing
        fails)."""
        replace(self.path, lambda partial: write_rows(partial, results))

    def append(self, result):
        line = io.StringIO()
        csv.writer(line).writerow(csv_row(result))
        data = line.getvalue().encode()
        with open(self.path, "ab", buffering=0) as f:
            end = f.seek(0, os.SEEK_END)
            try:
                while data:
                    data = data[f.write(data):]
            except OSError:  # a full disk: cut the half-written row, the finished ones stay intact
                f.truncate(end)
                raise


def parsed(kind, text):
    """A cell of the results CSV as the column's type."""
    return {"true": True, "false": False}[text.lower()] if kind is bool else kind(text)


def read_results(paths, flag="--report"):
    """The rows of results CSVs, merged. A row repeated across files is kept once; two rows of the
    same run with different numbers are an error. Errors name `flag`."""
    kinds = typing.get_type_hints(RunResult)
    results = {}
    for path in paths:
        try:
            with open(path, newline="") as f:
                rows = list(csv.DictReader(f))
        except (OSError, UnicodeDecodeError) as err:
            reason = getattr(err, "strerror", None) or err
            raise tm.ExperimentError(f"{flag} {path} cannot be read ({reason})") from None
        missing = [column for column in tm.RESULT_COLUMNS if rows and column not in rows[0]]
        if not rows or missing:
            what = f"no column {', '.join(missing)}" if rows else "no rows"
            raise tm.ExperimentError(f"{flag} {path} is not a results CSV of this script ({what})")
        for line, row in enumerate(rows, start=2):
            try:
                result = RunResult(**{column: parsed(kinds[column], row[column])
                                      for column in tm.RESULT_COLUMNS})
            except (KeyError, ValueError, TypeError):
                raise tm.ExperimentError(
                    f"{flag} {path}, line {line}: not a row of results ({row})") from None
            earlier = results.setdefault(run_key(result), result)
            if csv_row(earlier) != csv_row(result):
                raise tm.ExperimentError(
                    f"{flag}: {path}, line {line} and an earlier row are the same run "
                    f"({run_key(result)}) with different numbers")
    return list(results.values())
