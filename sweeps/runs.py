"""A sweep's runs: the Run record, the plan (every pretraining and target run, in the results' order), one
run executed with the template's pretrain() and train(), the choice of a learning rate in each grid, and
the results CSV written and read back. Imported by the engines, resume, start and the reporting modules;
it imports settings, stop, augment and the template, never a reporting module."""

import argparse
import csv
import dataclasses
import io
import math
import os
import typing

import torch

import transfer_mnist as tm
from sweeps.augment import Augment
from sweeps.settings import backbone_seed, seeds
from sweeps.stop import StopSignal

RunResult = tm.RunResult


@dataclasses.dataclass(frozen=True)
class Run:
    """What one run trains: an arm (or "pretrain") on a target at a size, seed and rate. A row's key."""

    target: str
    mode: str
    seed: int
    n_train: int
    learning_rate: float

    def __str__(self) -> str:
        return f"{self.target}/{self.mode} n_train {self.n_train} seed {self.seed} lr {self.learning_rate:g}"


def run_key(r: RunResult) -> Run:
    """The run a row holds."""
    return Run(r.target, r.mode, r.seed, r.n_train, r.learning_rate)


def sweep_runs(cfg: argparse.Namespace) -> list[Run]:
    """Every target run of a sweep, in the results' order."""
    return [Run(target, mode, seed, n_train, learning_rate)
            for target in cfg.targets
            for n_train in cfg.n_train
            for seed in seeds(cfg)
            for mode in cfg.modes
            for learning_rate in cfg.lr_grid or (cfg.lr[mode],)]


def pretraining_runs(cfg: argparse.Namespace) -> list[Run]:
    """The pretraining runs: one for the invocation, or one per seed."""
    return [Run(cfg.source, "pretrain", seed, cfg.n_pretrain, cfg.pretrain_lr)
            for seed in dict.fromkeys(backbone_seed(cfg, seed) for seed in seeds(cfg))]


def pretrain_checkpoint(cfg: argparse.Namespace, seed: int) -> str:
    """Where tm.pretrain() writes the backbone that the target runs (of this seed) start from."""
    per_seed = [f"seed{seed}"] if cfg.backbone_per_seed else []
    return os.path.join(cfg.log_dir, "pretrain", cfg.version, *per_seed, "checkpoints", "best.ckpt")


def execute(cfg: argparse.Namespace, run: Run, backbone: dict | None) -> tuple[RunResult, dict | None]:
    """One run, here: a pretraining returns the backbone it made too; a target run starts from `backbone`."""
    try:
        if run.mode == "pretrain":
            checkpoint_path, result = tm.pretrain(cfg, run.seed, f"seed{run.seed}" if cfg.backbone_per_seed else None)
            return result, tm.read_backbone(checkpoint_path)
        sub_dir = f"n{run.n_train}_seed{run.seed}" + (f"_lr{run.learning_rate:g}" if cfg.lr_grid else "")
        return tm.train(backbone, run.target, run.mode, cfg, run.seed, run.n_train, run.learning_rate,
                        pretrain_seed=backbone_seed(cfg, run.seed), sub_dir=sub_dir,
                        augment=Augment(run.seed) if cfg.augment else None), None  # the same transforms for every arm
    except SystemExit:  # Lightning ends a fit that a signal interrupted with sys.exit(1): stop the sweep instead
        if StopSignal.received is not None:
            raise KeyboardInterrupt from None
        raise


# ---- Choosing a learning rate in each grid --------------------------------------------
def not_nan(loss: float) -> float:
    """A loss to compare: NaN (a diverged run) counts as the worst."""
    return math.inf if math.isnan(loss) else loss


def selection_group(run: Run | RunResult, select: str) -> tuple:
    """The runs among which one learning rate is selected: a (target, mode, n_train, seed), or with pooled
    selection every seed of a (target, mode, n_train)."""
    return (run.target, run.mode, run.n_train) + ((run.seed,) if select == "seed" else ())


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
        seen, rates = grids.setdefault((r.target, r.mode, r.n_train),
                                       (set(), set(grid) if r.mode in tm.ARMS else set()))
        seen.add(r.seed)
        rates.add(r.learning_rate)
        groups.setdefault(selection_group(r, select), []).append(r)
    for group in groups.values():
        seen, rates = grids[(group[0].target, group[0].mode, group[0].n_train)]
        seen = seen if select == "pooled" else {group[0].seed}
        if {(r.seed, r.learning_rate) for r in group} >= {(s, rate) for s in seen for rate in rates}:
            select_rates(group, select)
        else:
            for r in group:
                r.selected = False
    return results


# ---- The results CSV --------------------------------------------------------------------
class ResultsCsv:
    """Appends each finished run's row at once, so an interrupted sweep keeps what it finished."""

    def __init__(self, path: str, append: bool = False):
        self.path, self.rows = path, 0
        if not append:
            tm.write_results(path, [])

    def rewrite(self, results: list[RunResult]) -> None:
        """Replace the file by these rows in this order, in one step (the old file stays if writing fails)."""
        partial = f"{self.path}.partial"
        tm.write_results(partial, results)
        os.replace(partial, self.path)
        self.rows = len(results)

    def append(self, result: RunResult) -> None:
        line = io.StringIO()
        csv.writer(line).writerow(tm.csv_row(result))
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


def read_results(paths: typing.Sequence[str], flag: str = "--report") -> list[RunResult]:
    """The rows of results CSVs, merged. A row repeated across files is kept once; two rows of the same run
    with different numbers are an error. Errors name `flag`."""
    kinds = typing.get_type_hints(RunResult)
    parse = {int: int, float: float, str: str, bool: lambda text: {"true": True, "false": False}[text.lower()]}
    results: dict[Run, RunResult] = {}
    for path in paths:
        try:
            with open(path, newline="") as f:
                rows = list(csv.DictReader(f))
        except (OSError, UnicodeDecodeError) as err:
            reason = getattr(err, "strerror", None) or err
            raise tm.ExperimentError(f"{flag} {path} cannot be read ({reason})") from None
        missing = [column for column in tm.RESULT_COLUMNS if rows and column not in rows[0]]
        if not rows or missing:
            raise tm.ExperimentError(f"{flag} {path} is not a results CSV of this script "
                                     f"({'no rows' if not rows else 'no column ' + ', '.join(missing)})")
        for line, row in enumerate(rows, start=2):
            try:
                result = RunResult(**{column: parse[kinds[column]](row[column]) for column in tm.RESULT_COLUMNS})
            except (KeyError, ValueError, TypeError):
                raise tm.ExperimentError(f"{flag} {path}, line {line}: not a row of results ({row})") from None
            earlier = results.setdefault(run_key(result), result)
            if tm.csv_row(earlier) != tm.csv_row(result):
                raise tm.ExperimentError(
                    f"{flag}: {path}, line {line} and an earlier row are the same run ({result.target} {result.mode} "
                    f"n_train {result.n_train} seed {result.seed} lr {result.learning_rate:g}) with different numbers")
    return list(results.values())


def save_backbone(backbone: dict[str, torch.Tensor], checkpoint_path: str) -> None:
    """A backbone as a checkpoint that tm.read_backbone() reads (one pretrained on another node, for --resume)."""
    os.makedirs(os.path.dirname(checkpoint_path), exist_ok=True)
    torch.save({"state_dict": {f"convnet.{key}": value for key, value in backbone.items()}}, checkpoint_path)
