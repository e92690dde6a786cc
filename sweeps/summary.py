"""Reporting: the summary of a sweep from one DataFrame of its rows.

Every table is a grouping or pivot of that DataFrame, rendered aligned
for the console and as Markdown: the runs, the means over seeds with 95%
intervals, the seed-paired differences (paired t with Holm's adjustment,
or results/PROTOCOL.md's tests), the percent table, the collapsed runs,
the rates run and chosen, the sensitivity to the baseline's rate and the
change of a lead between sweeps; then the warnings and the learning
curves in TensorBoard. Imported by figures and cli only; it imports
files, runs, settings, stats and the template.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
import statistics
import typing
from pathlib import Path

import lightning
import pandas as pd

import transfer_mnist as tm
from sweeps.files import replace_text
from sweeps.runs import NEAR_CHANCE, RunResult, chance_loss, still_improving
from sweeps.settings import (EQUIVALENCE_MARGIN, LR_BOUNDS, PRIMARY_ARM,
                             PRIMARY_N_TRAIN)
from sweeps.stats import MeanCI, detectable, holm, t_975, tost_p, wilcoxon_p

ARMS = tm.ARMS
KEY = ["target", "n_train", "mode"]  # an arm at a size: a row of the summary
PAIR = ["target", "n_train", "seed"]  # the runs a seed pairs
# where a mean's interval can lie: an accuracy, a loss, a difference in points
ACCURACY_RANGE, LOSS_RANGE = (0.0, 1.0), (0.0, math.inf)
POINTS_RANGE = (-100.0, 100.0)
MARGIN = f"±{EQUIVALENCE_MARGIN:g} points"


def baseline_arm() -> str:
    """The arm that is not pretrained: the others are paired with it."""
    return next(name for name, arm in ARMS.items() if not arm.pretrained)


def pretrained_arms() -> list[str]:
    return [name for name, arm in ARMS.items() if arm.pretrained]


def arm_order(key: tuple) -> tuple:
    """(target, n_train, mode) in ARMS's order of the modes."""
    return key[0], key[1], list(ARMS).index(key[2])


def near_chance(r: RunResult) -> bool:
    """Collapsed: a best validation loss within NEAR_CHANCE of guessing's."""
    chance = chance_loss(r.target)
    return chance is not None and r.val_loss >= NEAR_CHANCE * chance


def head_stage(r: RunResult) -> bool:
    """An LP-FT run tested on its head stage: its best epoch lies within it,
    so fine-tuning never improved on the head of the frozen backbone."""
    share = ARMS[r.mode].head_fraction if r.mode in ARMS else 0
    stage = max(1, round(share * r.max_epochs))
    return bool(share) and r.best_epoch <= stage


def frame(results: list[RunResult]) -> pd.DataFrame:
    """The rows in one DataFrame, in their order, with what runs.py and
    the arms say of each."""
    fields = dataclasses.fields(RunResult)
    rows = pd.DataFrame(map(dataclasses.astuple, results),
                        columns=[f.name for f in fields])
    rows = rows.astype({f.name: f.type for f in fields})
    verdicts = {"late": still_improving, "collapsed": near_chance,
                "head_stage": head_stage}
    for name, verdict in verdicts.items():
        rows[name] = pd.Series(map(verdict, results), dtype=bool)
    rows["arm"] = rows["mode"].isin(list(ARMS))
    return rows


def arm_runs(results: list[RunResult]) -> pd.DataFrame:
    """The runs the summary reads: the selected one of each target,
    n_train, arm and seed (not pretraining, nor the rates not chosen)."""
    rows = frame(results)
    chosen = rows[rows.arm & rows.selected]
    return chosen.drop_duplicates([*KEY, "seed"], keep="last")


def paired_runs(arms: pd.DataFrame) -> pd.DataFrame:
    """Each pretrained arm's runs beside the baseline's of their seed,
    with the differences in test accuracy (acc) and loss: arm by arm in
    the order they ran, seed by seed."""
    base = arms[arms["mode"] == baseline_arm()]
    pretrained = arms[arms["mode"].isin(pretrained_arms())]
    pairs = pretrained.merge(base[[*PAIR, "test_acc", "test_loss"]],
                             on=PAIR, suffixes=("", "_base"))
    pairs["acc"] = pairs.test_acc - pairs.test_acc_base
    pairs["loss"] = pairs.test_loss - pairs.test_loss_base
    pairs["order"] = pairs.groupby(KEY, sort=False).ngroup()
    return pairs.sort_values(["order", "seed"])


def lead_points(arms: pd.DataFrame) -> pd.Series:
    """Each pretrained arm minus the baseline, paired by seed, in points
    with its 95% interval, by (target, n_train, mode)."""
    pairs = paired_runs(arms).groupby(KEY, sort=False)
    return pairs.acc.apply(lambda acc: points(difference(acc)))


def difference(acc: pd.Series) -> MeanCI:
    return MeanCI.of(acc.tolist(), (-1.0, 1.0))


def points(ci: MeanCI) -> str:
    """A difference of accuracies in points, with its 95% interval:
    +6.2 [+4.6, +7.9]."""
    text = f"{100 * ci.mean:+.1f}"
    if ci.n < 2:
        return text
    return f"{text} [{100 * ci.low:+.1f}, {100 * ci.high:+.1f}]"


def p_text(p: float) -> str:
    if math.isnan(p):
        return "n/a"
    return f"{p:.2g}" if p < 0.001 else f"{p:.3f}"


def aligned(table: pd.DataFrame) -> str:
    """A console table: columns padded to their widest cell, a rule
    under the header."""
    cells = [list(table.columns), *table.values.tolist()]
    widths = [max(map(len, column)) for column in zip(*cells)]
    lines = ["  ".join(cell.ljust(width)
                       for cell, width in zip(row, widths)).rstrip()
             for row in cells]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def markdown(table: pd.DataFrame) -> str:
    rule = ["---"] * table.shape[1]
    cells = [list(table.columns), rule, *table.values.tolist()]
    return "\n".join("| " + " | ".join(row) + " |" for row in cells)


RUN_CELLS = {
    "target": "{0.target}",
    "mode": "{0.mode}",
    "n_train": "{0.n_train}",
    "seed": "{0.seed}",
    "lr": "{0.learning_rate:g}",
    "best epoch": "{0.best_epoch}",
    "val loss": "{0.val_loss:.4f}",
    "test loss": "{0.test_loss:.4f}",
    "test acc": "{0.test_acc:.4f}",
}


def run_table(rows: pd.DataFrame) -> pd.DataFrame:
    """One line per run; with a grid of rates, which one was selected."""
    table = pd.DataFrame(
        {name: [cell.format(r) for r in rows.itertuples()]
         for name, cell in RUN_CELLS.items()}, columns=list(RUN_CELLS))
    if not rows.selected.all():
        table["selected"] = rows.selected.map({True: "yes", False: ""})
    return table


def format_table(results: list[RunResult]) -> str:
    """The run table for the console, with each run's wall time: not in
    the CSV, so not after --report, nor for an earlier invocation's rows
    of a resumed sweep ("earlier")."""
    rows = frame(results)
    table = run_table(rows)
    if rows.seconds.notna().any():
        table["time"] = ["earlier" if math.isnan(s) else f"{s:.1f} s"
                         for s in rows.seconds]
    return aligned(table)


def accuracy_ci(runs: typing.Iterable[RunResult]) -> MeanCI:
    """Mean test accuracy over seeds with its 95% interval, for the figure."""
    return MeanCI.of([r.test_acc for r in runs], ACCURACY_RANGE)


def group_by_arm(results: list[RunResult]) -> dict[tuple, dict]:
    """For the figure: the selected runs of each (target, n_train, mode),
    by seed."""
    groups: dict[tuple, dict[int, RunResult]] = {}
    for r in results:
        if r.mode in ARMS and r.selected:
            key = (r.target, r.n_train, r.mode)
            groups.setdefault(key, {})[r.seed] = r
    return groups


def paired(groups: dict, target: str, n_train: int,
           mode: str) -> tuple[MeanCI, MeanCI] | None:
    """For the figure: test accuracy and loss of a pretrained arm of
    group_by_arm() minus the baseline's, paired by seed; None for the
    baseline, or without it, or without a seed of both."""
    runs = groups[(target, n_train, mode)].values()
    base = groups.get((target, n_train, baseline_arm()), {})
    rows = frame([*runs, *base.values()])
    pairs = paired_runs(rows)
    if pairs.empty:
        return None
    return difference(pairs.acc), MeanCI.of(pairs.loss.tolist())


def primary_sizes(sizes: dict[str, set[int]],
                  augmented: bool = False) -> dict[str, int]:
    """The n_train at which each target's primary comparison is made in a
    sweep of results/PROTOCOL.md, from the sizes it ran: PRIMARY_N_TRAIN,
    or the largest size below it (a smaller run of the same question);
    with --augment or with larger sizes only, none: all exploratory."""
    if augmented:
        return {}
    below = {target: [n for n in ns if n <= PRIMARY_N_TRAIN]
             for target, ns in sizes.items()}
    return {target: max(ns) for target, ns in below.items() if ns}


def no_primaries(sizes: dict[str, set[int]], augmented: bool = False) -> str:
    """Why a sweep of results/PROTOCOL.md of these sizes has no primary
    comparison ('' where it has one): for its summary and start line."""
    if primary_sizes(sizes, augmented):
        return ""
    if augmented:
        return "A sweep with --augment"
    return f"A sweep of more than {PRIMARY_N_TRAIN} labels only"


def sizes_run(arms: pd.DataFrame) -> dict[str, set[int]]:
    """Each target's sizes among the summary's runs."""
    return {target: set(sizes)
            for target, sizes in arms.groupby("target").n_train}


ARM_HEADER = ["target", "n_train", "mode", "seeds", "test acc mean ± sd",
              "95% CI", "test loss mean ± sd", "95% CI"]
DIFF_HEADER = ["target", "n_train", "paired difference", "seeds",
               "Δ test acc mean ± sd", "95% CI", "p (paired t)", "Holm p",
               "Δ test loss mean ± sd", "95% CI"]


def summarize(results: list[RunResult], augmented: bool = False,
              protocol: bool = False) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Two tables: each (target, n_train, mode) over seeds; each pretrained
    arm minus the baseline, paired by seed, with its paired-t p-value and
    that value Holm-adjusted over the table. In a sweep of
    results/PROTOCOL.md (`protocol`), the primaries are marked."""
    arms = arm_runs(results)
    at = primary_sizes(sizes_run(arms), augmented) if protocol else {}
    means = []
    for (target, n_train, mode), runs in arms.groupby(KEY, sort=False):
        acc = MeanCI.of(runs.test_acc.tolist(), ACCURACY_RANGE)
        loss = MeanCI.of(runs.test_loss.tolist(), LOSS_RANGE)
        head = runs.head_stage.sum()
        if head:
            mode += f" ({head} of {len(runs)} tested on the head stage)"
        means.append([target, str(n_train), mode, str(acc.n),
                      *acc.text(), *loss.text()])
    seeds = arms.groupby(KEY).size()
    rows, p_values = [], []
    pairs = paired_runs(arms).groupby(KEY, sort=False)
    for (target, n_train, mode), pair in pairs:
        acc, loss = difference(pair.acc), MeanCI.of(pair.loss.tolist())
        primary = mode == PRIMARY_ARM and n_train == at.get(target)
        name = f"{mode} - {baseline_arm()}" + " (primary)" * primary
        rows.append([target, str(n_train), name,
                     str(seeds[target, n_train, mode]), *acc.text(),
                     p_text(acc.p), "", *loss.text()])
        p_values.append(acc.p)
    for row, adjusted in zip(rows, holm(p_values)):
        row[7] = p_text(adjusted)
    return (pd.DataFrame(means, columns=ARM_HEADER),
            pd.DataFrame(rows, columns=DIFF_HEADER))


PREREGISTERED_HEADER = [
    "target", "n_train", "comparison", "seeds", "mean (points)", "median",
    "95% t interval", "seeds for / against / tied", "Wilcoxon p",
    "Holm p (primaries)", f"equivalence p (±{EQUIVALENCE_MARGIN:g})",
    "reading"]


def preregistered(results: list[RunResult], augmented: bool = False,
                  protocol: bool = True) -> tuple[pd.DataFrame, str]:
    """The comparisons as results/PROTOCOL.md tests them, in points,
    paired by seed: mean, median, 95% t interval, the seeds on each side,
    Wilcoxon's p, Holm's adjustment, the equivalence test and what they
    allow one to say; and a line on the smallest difference detected.
    In a sweep of results/PROTOCOL.md (`protocol`), Holm runs over its
    primaries alone and only they are read; elsewhere over every one."""
    arms = arm_runs(results)
    at = primary_sizes(sizes_run(arms), augmented) if protocol else None
    rows, tests, sds = [], [], []
    pairs = paired_runs(arms).groupby(KEY, sort=False)
    for (target, n_train, mode), pair in pairs:
        # in points, rounded so that equal differences tie,
        # as Wilcoxon's ranks need (not 1.12 and 1.1199...)
        diffs = [round(100 * d, 6) for d in pair.acc.tolist()]
        ci = MeanCI.of(diffs, POINTS_RANGE)
        is_primary = mode == PRIMARY_ARM
        primary = at is not None and is_primary and n_train == at.get(target)
        name = f"{mode} − {baseline_arm()}" + " (primary)" * primary
        sides = [sum(d > 0 for d in diffs), sum(d < 0 for d in diffs),
                 sum(d == 0 for d in diffs)]
        interval = f"[{ci.low:+.1f}, {ci.high:+.1f}]"
        wilcoxon, tost = wilcoxon_p(diffs), tost_p(diffs, EQUIVALENCE_MARGIN)
        rows.append([target, str(n_train), name, str(ci.n),
                     f"{ci.mean:+.1f}", f"{statistics.median(diffs):+.1f}",
                     interval if ci.n > 1 else "n/a",
                     " / ".join(map(str, sides)), p_text(wilcoxon), "",
                     p_text(tost), "exploratory"])
        if primary or at is None:
            tests.append((rows[-1], wilcoxon, tost, ci.mean))
        if primary or (at is None and is_primary):
            sds.append((ci.sd, ci.n))
    adjusted = holm([wilcoxon for _, wilcoxon, _, _ in tests])
    found = "a finding" if protocol else "a difference"
    for (row, _, tost, mean), p in zip(tests, adjusted):
        row[9] = p_text(p)
        row[11] = (f"{found}: {mean:+.1f} points" if p < 0.05 else
                   f"no difference beyond {MARGIN}" if tost < 0.05 else
                   "not shown either way")
    header = list(PREREGISTERED_HEADER)
    if not protocol:
        header[9] = f"Holm p (all {len(rows)})"
    return pd.DataFrame(rows, columns=header), power_line(sds, protocol)


def power_line(sds: list[tuple[float, int]], protocol: bool) -> str:
    """The smallest difference the seeds of the read comparisons detect."""
    sds = [(sd, n) for sd, n in sds if n > 1 and not math.isnan(sd)]
    if not sds:
        return ""

    def span(values: list[float]) -> str:
        low, high = f"{min(values):.1f}", f"{max(values):.1f}"
        return low if low == high else f"{low} to {high}"
    whose = "the primaries'" if protocol else \
        f"{PRIMARY_ARM} − {baseline_arm()}'s"
    # beyond 100 points no accuracy can go: cut there, as the intervals are
    smallest = [min(100.0, detectable(sd, n)) for sd, n in sds]
    return (f"With {sds[0][1]} seeds and {whose} paired sd of "
            f"{span([sd for sd, _ in sds])} points, the smallest "
            "difference a paired t-test detects at 5% with 80% power is "
            f"{span(smallest)} points.")


def collapses(results: list[RunResult]) -> pd.DataFrame:
    """Per target, n_train, arm and rate, over every run (not only the
    selected): how many collapsed (near_chance) and how many were still
    improving at their budget."""
    rows = frame(results)
    counts = rows[rows.arm].groupby([*KEY, "learning_rate"]).agg(
        runs=("seed", "size"), collapsed=("collapsed", "sum"),
        late=("late", "sum"), selected=("selected", "sum")).reset_index()
    runs = counts.runs.astype(str)
    return pd.DataFrame({
        "target": counts.target,
        "n_train": counts.n_train.astype(str),
        "mode": counts["mode"],
        "learning rate": counts.learning_rate.map("{:g}".format),
        "runs": runs,
        "collapsed (near chance)": counts.collapsed.astype(str) + " of " + runs,
        "still improving at the budget": counts.late.astype(str) + " of " + runs,
        "selected": counts.selected.astype(str),
    })


def collapsed_lines(results: list[RunResult]) -> str:
    """The console's count of collapsed runs: a line per arm and rate
    where any run collapsed, or ''."""
    table = collapses(results)
    lines = [f"{mode} on {target} at {n_train} labels, rate {rate}: "
             f"{collapsed} collapsed"
             for target, n_train, mode, rate, _, collapsed, *_
             in table.values.tolist() if not collapsed.startswith("0 of")]
    if not lines:
        return ""
    share = f"{1 - NEAR_CHANCE:.0%}"
    heading = (f"Collapsed runs (best validation loss within {share} of "
               "guessing's), over all runs:")
    return "\n  ".join([heading, *lines])


def sensitivity_table(results: list[RunResult]) -> pd.DataFrame | None:
    """Each pretrained arm (at its selected rate) minus the baseline at
    every rate the baseline ran, paired by seed, and at the rate of its
    best mean test accuracy: a bound on what a luckier choice of the
    baseline's rate could take away, never a result (the test set picks
    it). None without a grid."""
    rows, base = frame(results), baseline_arm()
    base_runs = rows[rows["mode"] == base].drop_duplicates(
        [*PAIR, "learning_rate"], keep="last")
    rates = sorted(set(base_runs.learning_rate))
    if len(rates) < 2:
        return None
    by_rate = base_runs.groupby(["target", "n_train", "learning_rate"],
                                sort=False).test_acc
    means = by_rate.apply(lambda acc: sum(acc.tolist()) / len(acc))
    best = means.groupby(["target", "n_train"], sort=False).idxmax()
    arms = arm_runs(results)
    pretrained = arms[arms["mode"].isin(pretrained_arms())]
    against = pretrained.merge(base_runs[[*PAIR, "learning_rate", "test_acc"]],
                               on=PAIR, suffixes=("", "_base"))
    against["acc"] = against.test_acc - against.test_acc_base
    against = against.sort_values("seed", kind="stable")
    cells = against.groupby([*KEY, "learning_rate_base"]).acc.apply(
        lambda acc: points(difference(acc)))
    table = []
    for key in sorted(pretrained.groupby(KEY).groups, key=arm_order):
        if key[:2] not in best:
            continue
        best_rate = best[key[:2]][2]
        row = [cells.get((*key, rate), "–") for rate in rates]
        table.append([key[0], str(key[1]), f"{key[2]} − {base}", *row,
                      f"{cells.get((*key, best_rate), '–')} "
                      f"(at {best_rate:g})"])
    header = ["target", "n_train", "difference",
              *[f"{base} at {rate:g}" for rate in rates],
              f"bound: {base} at its best rate on the test set"]
    return pd.DataFrame(table, columns=header)


def percent_table(results: list[RunResult], modes: list[str] | None = None,
                  differences: list[str] | None = None) -> pd.DataFrame:
    """Per (target, n_train): each arm's mean test accuracy in %, and each
    pretrained arm minus the baseline in points with its 95% interval.
    Columns: `modes`, or the arms that ran; the differences of
    `differences` among them, or of every pretrained one."""
    arms, base = arm_runs(results), baseline_arm()
    modes = modes or [mode for mode in ARMS if mode in set(arms["mode"])]
    shown = modes if differences is None else differences
    leads = [mode for mode in modes if ARMS[mode].pretrained
             and base in modes and mode in shown]
    header = ["target", "n_train", *modes, *[f"{m} − {base}" for m in leads]]
    if arms.empty:
        return pd.DataFrame(columns=header)
    means = arms.groupby(KEY).test_acc.apply(
        lambda acc: f"{100 * MeanCI.of(acc.tolist()).mean:.1f}")
    table = means.unstack("mode").reindex(columns=modes)
    lead = lead_points(arms).unstack("mode")
    lead = lead.reindex(columns=leads).add_suffix(f" − {base}")
    table = table.join(lead).fillna("–").reset_index()
    return table.astype({"n_train": str})[header]


def rate_choices(results: list[RunResult]) -> pd.DataFrame:
    """The selected runs by target and arm, each with its grid's size (the
    rates tried for its target, arm, n_train and seed), whether its rate
    sat at an edge of that grid, and whether at one of LR_BOUNDS there."""
    rows = frame(results)
    rates = rows.groupby(["target", "mode", "n_train", "seed"]).learning_rate
    edge = rows.learning_rate.eq(rates.transform("min")) | \
        rows.learning_rate.eq(rates.transform("max"))
    rows["rates"] = rates.transform("count")
    rows["edge"] = edge
    rows["bound"] = edge & rows.learning_rate.isin(LR_BOUNDS)
    chosen = rows[rows.arm & rows.selected]
    order = chosen.groupby(["target", "mode"], sort=False).ngroup()
    return chosen.iloc[order.argsort(kind="stable")]


def at_an_edge(choices: pd.DataFrame) -> int | None:
    """How many choices sat at the lowest or highest rate of their grid (a
    sign it is too narrow), but at LR_BOUNDS, where --widen stops; None
    under 3 rates, where every choice is at an edge."""
    if choices.rates.min() < 3:
        return None
    return int(choices.edge.sum() - choices.bound.sum())


BUDGET_HEADER = ["target", "mode", "runs", "learning rates run",
                 "learning rates chosen", "at an edge of the rates run",
                 "best epoch in the last tenth of the budget"]


def budget_table(results: list[RunResult]) -> pd.DataFrame:
    """Per target and arm, over its selected runs: the rates run and those
    chosen and how often, how often the choice sat at an edge of the rates
    run, and how many runs were still improving at the end of their
    budget."""
    ran = frame(results).groupby(["target", "mode"]).learning_rate
    rows = []
    choices = rate_choices(results).groupby(["target", "mode"], sort=False)
    for (target, mode), chosen in choices:
        n = len(chosen)
        counts = chosen.learning_rate.value_counts().sort_index()
        edge = at_an_edge(chosen)
        rows.append([
            target, mode, str(n),
            ", ".join(f"{rate:g}" for rate in sorted(set(ran.get_group(
                (target, mode))))),
            ", ".join(f"{rate:g} ×{k}" for rate, k in counts.items()),
            "no grid" if chosen.rates.max() == 1 else
            f"n/a: a grid of {chosen.rates.min()} rates is all edges"
            if edge is None else f"{edge} of {n}",
            f"{chosen.late.sum()} of {n}"])
    return pd.DataFrame(rows, columns=BUDGET_HEADER)


def fragile(results: list[RunResult]) -> list[str]:
    """Where the answer is fragile, in words, each with what it counts
    against and what to do: for the end of the console and the Markdown."""
    rows = frame(results)
    backbones = rows[~rows.arm & rows.selected]  # a pretraining grid's picks
    choices = rate_choices(results)
    warnings = backbone_warnings(backbones)
    for mode in ARMS:
        chosen = choices[choices["mode"] == mode]
        late, head = chosen.late.sum(), chosen.head_stage.sum()
        if late:
            warnings.append(
                f"{mode}: {late} of {len(chosen)} selected runs were still "
                "improving in the last tenth of their epochs; their test "
                "accuracy may be understated: raise --train-epochs")
        if head:
            warnings.append(
                f"{mode}: {head} of {len(chosen)} selected runs were tested "
                "on their head stage (best epoch within it: fine-tuning never "
                "improved on the head), as a frozen run with the head's "
                "budget would be")
    for r in choices[choices.collapsed].itertuples():
        warnings.append(
            f"{r.target}/{r.mode} n_train {r.n_train} seed {r.seed} (lr "
            f"{r.learning_rate:g}), a selected run, is no better than chance "
            f"on validation (loss {r.val_loss:.4f}; guessing gives "
            f"{chance_loss(r.target):.4f}): it learned next to nothing at "
            "that rate, and its test accuracy is in the summary; read its "
            "learning curves, and the sensitivity table")
    return warnings + grid_warnings(choices)


def backbone_warnings(backbones: pd.DataFrame) -> list[str]:
    """The backbones still improving when pretraining stopped."""
    weak = backbones[backbones.late]
    if weak.empty:
        return []
    seeds = ", ".join(map(str, weak.seed))
    epochs = "/".join(sorted(set(map(str, weak.best_epoch))))
    accuracy = f"{weak.test_acc.min():.4f}"
    if len(weak) > 1:
        accuracy += f"-{weak.test_acc.max():.4f}"
    return [f"{len(weak)} of {len(backbones)} backbones "
            f"(seed{'s' * (len(weak) > 1)} {seeds}) were still improving "
            "when pretraining stopped: best validation loss at epoch "
            f"{epochs} of {weak.max_epochs.iloc[0]} (test accuracy "
            f"{accuracy}); pretraining longer may change what transfer "
            "gains: raise --pretrain-epochs (--protocol fair stops on "
            "--pretrain-patience)"]


def grid_warnings(choices: pd.DataFrame) -> list[str]:
    """Rates chosen at an edge of the grid, or no grid at all."""
    if choices.empty:
        return []
    if choices.rates.max() < 2:
        return ["every arm ran at one fixed learning rate, not its best: "
                "--protocol fair gives each arm its best of a grid, over 5 "
                "seeds"]
    n, warnings = len(choices), []
    edge, bound = at_an_edge(choices), choices.bound.sum()
    if edge:
        warnings.append(
            f"{edge} of {n} selected runs have their rate at an edge of the "
            "rates run: the best rate may lie beyond; widen --lr-grid (or "
            "--widen)")
    elif edge is None:
        warnings.append("a grid of fewer than 3 rates cannot tell whether "
                        "the best rate lies outside it")
    if bound:
        warnings.append(
            f"{bound} of {n} selected runs have their rate at "
            f"{LR_BOUNDS[0]:g} or {LR_BOUNDS[1]:g}, where --widen stops: "
            "the rates beyond were not tried")
    return warnings


SELECTIONS = {
    "seed": "each seed's own validation loss picks its rate (--select seed)",
    "pooled": "one rate per (target, arm, n_train): the lowest median "
              "validation loss over seeds, which one collapsed seed cannot "
              "move (--select pooled)",
    "mean": "one rate per (target, arm, n_train): the lowest mean "
            "validation loss over seeds (--select mean)",
}


def network_line(configs: typing.Iterable[dict]) -> str:
    """The backbone the runs of sweeps with these saved settings trained,
    for their summary's first line."""
    lines = []
    for config in configs:
        start = f"pretrained here on {config.get('source')}"
        if config.get("weights"):
            start = f"from --weights {config['weights']}"
        size = config.get("image_size")
        resized = f", images resized to {size} pixels" if size else ""
        lines.append(f"{config.get('backbone', 'lenet')} {start}{resized}")
    if not lines:
        return ""
    return f"Backbone: {'; '.join(dict.fromkeys(lines))}.\n\n"


def write_summary(results: list[RunResult], path: str, select: str = "seed",
                  warnings: typing.Sequence[str] = (),
                  augmented: bool = False, protocol: bool = False,
                  network: str = "") -> str:
    """Markdown at `path`: the summary over seeds (the run table when every
    arm ran one seed), each comparison once, the sensitivity to the
    baseline's rate, the rates run and chosen, and the warnings (these
    `warnings` first). `network` (network_line()) opens it. Returns the
    summary for the console: '' for one seed, where the run table says
    it all."""
    rows = frame(results)
    budget = budget_table(results)
    closing = "## Learning rates and epoch budget\n\n"
    if not rows.selected.all():
        closing += f"Rate selection: {SELECTIONS[select]}.\n\n"
    closing += f"{markdown(budget)}\n"
    if warnings := [*warnings, *fragile(results)]:
        listed = "".join(f"- {warning}\n" for warning in warnings)
        closing += f"\n## Warnings\n\n{listed}"
    if arm_runs(results).groupby(KEY).size().lt(2).all():
        runs = markdown(run_table(rows))
        replace_text(path, f"# Test results\n\n{network}{runs}\n\n{closing}")
        return ""
    arms, differences = summarize(results, augmented, protocol)
    fewest = arms.seeds.astype(int).min()
    caution = ""
    if fewest in (2, 3):
        caution = (f"Intervals from {fewest} seeds are wide (t(0.975) is "
                   f"{t_975(fewest - 1):.3f} with {fewest} seeds, "
                   f"{t_975(4):.3f} with 5); they are cut to what the "
                   "metric can reach.\n\n")
    if select == "seed":  # each comparison once: in points
        tables, console = seed_comparisons(results, augmented, protocol)
    else:
        tables, console = t_tests(results, differences)
    replace_text(path, f"# Test results over seeds\n\n{network}"
                       f"{markdown(arms)}\n\n{caution}{tables}\n\n"
                       f"{sensitivity_text(results)}{closing}")
    parts = [aligned(arms), caution.strip(), *console, aligned(budget)]
    return "\n\n".join(filter(None, parts))


def sensitivity_text(results: list[RunResult]) -> str:
    table = sensitivity_table(results)
    if table is None:
        return ""
    return ("## Sensitivity to the baseline's rate\n\nEach pretrained arm "
            "minus the baseline run at each of its rates instead of the one "
            "validation chose, paired by seed; the last column picks the "
            "baseline's rate on the test set, so it is a bound on how much "
            "a luckier choice could take away, not a result.\n\n"
            f"{markdown(table)}\n\n")


def t_tests(results: list[RunResult],
            differences: pd.DataFrame) -> tuple[str, list[str]]:
    """The comparisons of a sweep whose rates were chosen over seeds, by
    paired t-tests with Holm's adjustment: Markdown, and the console's."""
    percent = markdown(percent_table(results))
    text = ("Paired by seed: both arms of a seed share the training subset "
            "and the head's initial weights. p: the paired t-test of no "
            "difference in test accuracy; Holm p: adjusted by Holm's method "
            f"over the {len(differences)} comparisons of this table, the "
            "ones to state as findings where below 0.05.\n\n"
            f"{markdown(differences)}\n\nIn percent: mean test accuracy, "
            "and the paired difference in points with its 95% interval."
            f"\n\n{percent}")
    return text, [aligned(differences)]


def seed_comparisons(results: list[RunResult], augmented: bool,
                     protocol: bool) -> tuple[str, list[str]]:
    """The comparisons of a seed-selected sweep as results/PROTOCOL.md
    tests them (preregistered()), as Markdown and the console's lines:
    pre-registered in its own sweeps, its rules applied elsewhere."""
    table, power = preregistered(results, augmented, protocol)
    tost = (f"a difference within {MARGIN} shown by two one-sided tests "
            "at 5%")
    if protocol:
        title = "The pre-registered comparisons (results/PROTOCOL.md)"
        none = no_primaries(sizes_run(arm_runs(results)), augmented)
        rules = (f"{none} has no primaries: every row is exploratory, "
                 "intervals and no claims.") if none else (
            "The primaries: Wilcoxon's signed-rank test, Holm's adjustment "
            f"over the primaries alone, and {tost}. The other rows are "
            "exploratory: intervals, no claims.")
    else:
        title = "The comparisons, each seed at its own rate"
        rules = ("No comparison was named before these runs, so none is "
                 "primary: Wilcoxon's signed-rank test with Holm's "
                 f"adjustment over all {len(table)} comparisons, and {tost}.")
    said = " ".join(filter(None, [rules, power]))
    percent = markdown(percent_table(results, differences=()))
    text = (f"## {title}\n\nEach pretrained arm minus {baseline_arm()} in "
            "test accuracy points, paired by seed, each seed at the rate its "
            f"own validation loss chose. {said}\n\n{markdown(table)}\n\n"
            "## Collapsed and still-improving runs, at every rate\n\n"
            f"{markdown(collapses(results))}\n\n"
            f"In percent: mean test accuracy.\n\n{percent}")
    return text, [f"{aligned(table)}\n{power}", collapsed_lines(results)]


def log_learning_curves(results: list[RunResult],
                        cfg: argparse.Namespace) -> None:
    """TensorBoard: mean test accuracy and loss over seeds against n_train
    (the step axis), one run per arm under learning_curve/, so each
    target's chart shows the arms side by side."""
    arms = arm_runs(results)
    for mode in cfg.modes:
        curve = lightning.pytorch.loggers.TensorBoardLogger(
            cfg.log_dir, name=f"learning_curve/{mode}", version=cfg.version,
            default_hp_metric=False)
        runs = arms[arms["mode"] == mode].groupby(["target", "n_train"])
        for (target, n_train), group in runs:
            acc = MeanCI.of(group.test_acc.tolist()).mean
            loss = MeanCI.of(group.test_loss.tolist()).mean
            curve.log_metrics({f"{target}/test_accuracy": acc,
                               f"{target}/test_loss": loss},
                              step=int(n_train))
        curve.finalize("success")


def comparison_table(sweeps: dict[str, list[RunResult]]) -> pd.DataFrame:
    """Each pretrained arm minus the baseline per target and n_train, in
    points with its 95% interval, side by side for several sweeps
    (--report LABEL=CSV ...)."""
    arms = {label: arm_runs(results) for label, results in sweeps.items()}
    leads = {label: lead_points(runs) for label, runs in arms.items()}
    keys = {key for runs in arms.values() for key in runs.groupby(KEY).groups
            if ARMS[key[2]].pretrained}
    rows = [[target, str(n_train), f"{mode} − {baseline_arm()}",
             *[lead.get((target, n_train, mode), "–")
               for lead in leads.values()]]
            for target, n_train, mode in sorted(keys, key=arm_order)]
    return pd.DataFrame(rows, columns=["target", "n_train", "difference",
                                       *sweeps])


def change_table(sweeps: dict[str, list[RunResult]]) -> pd.DataFrame | None:
    """How each pretrained arm's lead over the baseline changes from one
    sweep to a later one of --report LABEL=CSV ..., paired by the seeds
    they share: in points with its 95% interval and paired-t p-value.
    None where no two sweeps share two seeds."""
    leads = {label: paired_runs(arm_runs(results)).set_index([*KEY, "seed"])
             for label, results in sweeps.items()}
    rows = []
    for earlier, later in itertools.combinations(sweeps, 2):
        change = (leads[later].acc - leads[earlier].acc).dropna()
        for key, seeds in sorted(change.groupby(level=KEY),
                                 key=lambda group: arm_order(group[0])):
            if len(seeds) < 2:
                continue
            ci = MeanCI.of(seeds.tolist(), (-2.0, 2.0))
            rows.append([key[0], str(key[1]), f"{key[2]} − {baseline_arm()}",
                         f"{later} − {earlier}", str(ci.n), points(ci),
                         p_text(ci.p)])
    header = ["target", "n_train", "difference", "change", "seeds",
              "change in points", "p (paired t)"]
    return pd.DataFrame(rows, columns=header) if rows else None


def write_comparison(sweeps: dict[str, list[RunResult]],
                     sources: dict[str, list[str]], path: Path) -> str:
    """Markdown at `path`: each sweep's mean accuracies with PRIMARY_ARM's
    lead, the leads side by side and how they change. Returns the side by
    side table for the console."""
    ran = {r.mode for results in sweeps.values() for r in results}
    modes = [mode for mode in ARMS if mode in ran]
    means = pd.concat([
        percent_table(results, modes, [PRIMARY_ARM]).assign(sweep=label)
        for label, results in sweeps.items()])
    means = means[["sweep", *means.columns[:-1]]]
    side_by_side, change = comparison_table(sweeps), change_table(sweeps)
    changed = "" if change is None else (
        "How each lead changes from one sweep to a later one, paired by the "
        "seeds they share (what else differs between the two sweeps, their "
        "images and rate choices, comes with the change):\n\n"
        f"{markdown(change)}\n\n")
    listed = "; ".join(f"{label}: {', '.join(csvs)}"
                       for label, csvs in sources.items())
    replace_text(path, "# Sweeps compared\n\nMean test accuracy in %, and "
                       f"{PRIMARY_ARM} minus {baseline_arm()} in points with "
                       f"its 95% interval:\n\n{markdown(means)}\n\nThe paired "
                       "differences side by side:\n\n"
                       f"{markdown(side_by_side)}\n\n{changed}Sweeps: "
                       f"{listed}.\n")
    return aligned(side_by_side)
