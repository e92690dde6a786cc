"""Reporting: the run table, the summary over seeds (means with 95% intervals, seed-paired differences, the
percent table), the learning rates chosen and the runs still improving, the warnings, and the learning
curves in TensorBoard. Imported by figures and cli only; it imports runs and the template.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import typing

import lightning

import transfer_mnist as tm
from sweeps.files import replace_text
from sweeps.runs import RunResult

ARMS = tm.ARMS


def run_rows(results: list[RunResult]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the run table; with a learning-rate grid, which rate was selected."""
    grid = any(not r.selected for r in results)
    header = ["target", "mode", "n_train", "seed", "lr", "best epoch", "val loss", "test loss", "test acc"]
    rows = [[r.target, r.mode, str(r.n_train), str(r.seed), f"{r.learning_rate:g}", str(r.best_epoch),
             f"{r.val_loss:.4f}", f"{r.test_loss:.4f}", f"{r.test_acc:.4f}"] + (["yes" if r.selected else ""] * grid)
            for r in results]
    return header + ["selected"] * grid, rows


def aligned(header: list[str], rows: list[list[str]]) -> str:
    """A console table: columns padded to their widest cell, a rule under the header."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [header, *rows]]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(row) + " |" for row in lines)


def format_table(results: list[RunResult]) -> str:
    """One line per run, aligned, with its wall time (not in the CSV, so not after --report, nor for the rows
    of an earlier invocation of a resumed sweep, marked "earlier")."""
    header, rows = run_rows(results)
    if all(math.isnan(r.seconds) for r in results):
        return aligned(header, rows)
    return aligned(header + ["time"], [row + ["earlier" if math.isnan(r.seconds) else f"{r.seconds:.1f} s"]
                                       for row, r in zip(rows, results)])


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
        counts = {rate: sum(r.learning_rate == rate for r in chosen)
                  for rate in sorted({r.learning_rate for r in chosen})}
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
              "pooled": "one rate per (target, arm, n_train): the lowest mean validation loss over seeds "
                        "(--select pooled)"}


def write_summary(results: list[RunResult], path: str, select: str = "seed", warnings: typing.Sequence[str] = ()) -> str:
    """Markdown at `path`: the summary over seeds (the run table when every arm ran one seed), then the
    learning rates chosen and the runs still improving at the end of their budget, and the warnings (these
    `warnings` first: a report's incomplete groups, say). Returns the summary as
    aligned text for the console: '' for one seed, where the run table says it all."""
    budget = budget_rows(results)
    grid = any(not r.selected for r in results)
    closing = ("## Learning rates and epoch budget\n\n" + (f"Rate selection: {SELECTIONS[select]}.\n\n" if grid else "")
               + f"{markdown(BUDGET_HEADER, budget)}\n")
    if [*warnings, *fragile(results)]:
        closing += "\n## Warnings\n\n" + "".join(f"- {warning}\n" for warning in [*warnings, *fragile(results)])
    if all(len(by_seed) < 2 for by_seed in group_by_arm(results).values()):
        replace_text(path, f"# Test results\n\n{markdown(*run_rows(results))}\n\n{closing}")
        return ""
    arms, differences = summarize(results)
    fewest = min(int(row[3]) for row in arms)
    caution = (f"Intervals from {fewest} seeds are wide (t(0.975) is {t_975(fewest - 1):g} with {fewest} seeds, "
               f"{t_975(4):g} with 5); they are cut to what the metric can reach.\n\n" if fewest in (2, 3) else "")
    replace_text(path, f"# Test results over seeds\n\n{markdown(ARM_HEADER, arms)}\n\n{caution}"
                       "Paired by seed: both arms of a seed share the training subset and the head's initial weights."
                       f"\n\n{markdown(DIFF_HEADER, differences)}\n\n"
                       "In percent: mean test accuracy, and the paired difference in points with its 95% interval."
                       f"\n\n{markdown(*percent_table(results))}\n\n{closing}")
    return "\n\n".join([aligned(ARM_HEADER, arms)] + [caution.strip()] * bool(caution)
                       + [aligned(*table) for table in ((DIFF_HEADER, differences), (BUDGET_HEADER, budget))])


def log_learning_curves(results: list[RunResult], cfg: argparse.Namespace) -> None:
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


