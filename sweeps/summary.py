"""Reporting: a sweep's summary from one DataFrame of its rows.

Every table is a grouping or pivot of it, printed aligned and written as
Markdown: the runs, the means over seeds, each pretrained arm minus the
baseline paired by seed, the percent table, the collapsed runs, the rates
run and chosen, the sensitivity to the baseline's rate, the change of a
lead between sweeps; then the warnings. Imported by figures and cli only;
it imports files, runs, settings, stats and the template.
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
from sweeps.settings import EQUIVALENCE_MARGIN, LR_BOUNDS, PRIMARY_ARM, PRIMARY_N_TRAIN
from sweeps.stats import MeanCI, detectable, holm, t_975, tost_p, wilcoxon_p

ARMS = tm.ARMS
KEY = ["target", "n_train", "mode"]  # an arm at a size: a summary's row
PAIR = ["target", "n_train", "seed"]  # the runs a seed pairs
GRID = ["target", "mode", "n_train", "seed"]  # the rates a run chose from
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
    return key[0], key[1], list(ARMS).index(key[2])


def frame(results: list[RunResult]) -> pd.DataFrame:
    """The rows in their order, with what runs.py says of each run."""
    fields = dataclasses.fields(RunResult)
    rows = pd.DataFrame(map(dataclasses.astuple, results), columns=[f.name for f in fields])
    rows = rows.astype({f.name: f.type for f in fields})
    rows["arm"] = rows["mode"].isin(list(ARMS))
    rows["late"] = pd.Series(map(still_improving, results), dtype=bool)
    chance = rows.target.map(chance_loss).astype(float)
    rows["collapsed"] = rows.val_loss >= NEAR_CHANCE * chance
    # LP-FT runs whose best epoch lies within the head stage: tested as a
    # frozen run would be, fine-tuning never improved on the head
    share = rows["mode"].map(lambda mode: ARMS[mode].head_fraction if mode in ARMS else 0.0)
    stage = (share * rows.max_epochs).round().clip(lower=1)
    rows["head_stage"] = (share > 0) & (rows.best_epoch <= stage)
    return rows


def arm_runs(results: list[RunResult]) -> pd.DataFrame:
    """The selected run of each target, n_train, arm and seed."""
    rows = frame(results)
    chosen = rows[rows.arm & rows.selected]
    return chosen.drop_duplicates([*KEY, "seed"], keep="last")


def paired_runs(arms: pd.DataFrame) -> pd.DataFrame:
    """Each pretrained arm's runs beside the baseline's of their seed, and
    the differences (acc, loss): arm by arm as they ran, seed by seed."""
    base = arms[arms["mode"] == baseline_arm()][[*PAIR, "test_acc", "test_loss"]]
    pairs = arms[arms["mode"].isin(pretrained_arms())]
    pairs = pairs.merge(base, on=PAIR, suffixes=("", "_base"))
    pairs["acc"] = pairs.test_acc - pairs.test_acc_base
    pairs["loss"] = pairs.test_loss - pairs.test_loss_base
    pairs["order"] = pairs.groupby(KEY, sort=False).ngroup()
    return pairs.sort_values(["order", "seed"])


def comparisons(arms: pd.DataFrame, primaries: dict[str, int] | None = None) -> pd.DataFrame:
    """Per pretrained arm: MeanCIs of its differences with the baseline in
    test accuracy and loss, the first in points, and whether it is a
    primary (PRIMARY_ARM at the target's size in `primaries`)."""
    rows = []
    for (target, n_train, mode), pair in paired_runs(arms).groupby(KEY, sort=False):
        acc, loss = pair.acc.tolist(), pair.loss.tolist()
        # rounded so that equal differences tie, as Wilcoxon's ranks need
        diffs = [round(100 * d, 6) for d in acc]
        primary = mode == PRIMARY_ARM and n_train == (primaries or {}).get(target)
        rows.append([target, n_train, mode, MeanCI.of(acc, (-1.0, 1.0)), MeanCI.of(loss), diffs,
                     primary])
    return pd.DataFrame(rows, columns=[*KEY, "acc", "loss", "diffs", "primary"])


def points(ci: MeanCI) -> str:
    """A difference of accuracies in points, with its 95% interval."""
    text = f"{100 * ci.mean:+.1f}"
    if ci.n < 2:
        return text
    return f"{text} [{100 * ci.low:+.1f}, {100 * ci.high:+.1f}]"


def p_text(p: float) -> str:
    if math.isnan(p):
        return "n/a"
    return f"{p:.2g}" if p < 0.001 else f"{p:.3f}"


def aligned(table: pd.DataFrame) -> str:
    """Columns padded to their widest cell, a rule under the header."""
    cells = [list(table.columns), *table.values.tolist()]
    widths = [max(map(len, column)) for column in zip(*cells)]
    lines = ["  ".join(map(str.ljust, row, widths)).rstrip() for row in cells]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def markdown(table: pd.DataFrame) -> str:
    cells = [list(table.columns), ["---"] * table.shape[1], *table.values.tolist()]
    return "\n".join(f"| {' | '.join(row)} |" for row in cells)


RUN_CELLS = {
    "target": "{0.target}", "mode": "{0.mode}", "n_train": "{0.n_train}",
    "seed": "{0.seed}", "lr": "{0.learning_rate:g}", "best epoch": "{0.best_epoch}",
    "val loss": "{0.val_loss:.4f}", "test loss": "{0.test_loss:.4f}",
    "test acc": "{0.test_acc:.4f}"}


def run_table(rows: pd.DataFrame) -> pd.DataFrame:
    """A line per run; with a grid of rates, which was selected."""
    cells = {name: [cell.format(r) for r in rows.itertuples()]
             for name, cell in RUN_CELLS.items()}
    table = pd.DataFrame(cells, columns=list(RUN_CELLS))
    if not rows.selected.all():
        table["selected"] = rows.selected.map({True: "yes", False: ""})
    return table


def format_table(results: list[RunResult]) -> str:
    """The run table with each run's wall time: none after --report, and
    "earlier" for an earlier invocation's rows of a resumed sweep."""
    rows = frame(results)
    table = run_table(rows)
    if rows.seconds.notna().any():
        table["time"] = ["earlier" if math.isnan(s) else f"{s:.1f} s" for s in rows.seconds]
    return aligned(table)


def primary_sizes(sizes: dict[str, set[int]], augmented: bool = False) -> dict[str, int]:
    """Each target's primary size in a sweep of results/PROTOCOL.md: PRIMARY_N_TRAIN or
    the largest below; none with --augment, or with larger sizes only."""
    below = {target: [n for n in ns if n <= PRIMARY_N_TRAIN] for target, ns in sizes.items()}
    return {} if augmented else {target: max(ns) for target, ns in below.items() if ns}


def no_primaries(sizes: dict[str, set[int]], augmented: bool = False) -> str:
    """Why a sweep of results/PROTOCOL.md has no primary, or ''."""
    if primary_sizes(sizes, augmented):
        return ""
    return "A sweep with --augment" if augmented else \
        f"A sweep of more than {PRIMARY_N_TRAIN} labels only"


def sizes_run(arms: pd.DataFrame) -> dict[str, set[int]]:
    return {target: set(sizes) for target, sizes in arms.groupby("target").n_train}


def protocol_comparisons(arms: pd.DataFrame, augmented: bool, protocol: bool) -> pd.DataFrame:
    """comparisons() with the primaries of a sweep of results/PROTOCOL.md."""
    return comparisons(arms, primary_sizes(sizes_run(arms), augmented) if protocol else None)


ARM_HEADER = ["target", "n_train", "mode", "seeds", "test acc mean ± sd", "95% CI",
              "test loss mean ± sd", "95% CI"]
DIFF_HEADER = ["target", "n_train", "paired difference", "seeds", "Δ test acc mean ± sd",
               "95% CI", "p (paired t)", "Holm p", "Δ test loss mean ± sd", "95% CI"]


def summarize(results: list[RunResult], augmented: bool = False,
              protocol: bool = False) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Each arm's means over seeds; each pretrained arm minus the baseline,
    paired by seed, with its paired-t p and Holm's adjustment over the
    table, the primaries marked in a sweep of results/PROTOCOL.md."""
    arms = arm_runs(results)
    means = []
    for (target, n_train, mode), runs in arms.groupby(KEY, sort=False):
        acc = MeanCI.of(runs.test_acc.tolist(), ACCURACY_RANGE)
        loss = MeanCI.of(runs.test_loss.tolist(), LOSS_RANGE)
        if head := runs.head_stage.sum():
            mode += f" ({head} of {len(runs)} tested on the head stage)"
        means.append([target, str(n_train), mode, str(acc.n), *acc.text(), *loss.text()])
    seeds, compared = arms.groupby(KEY).size(), protocol_comparisons(arms, augmented, protocol)
    rows = []
    adjusted = holm([acc.p for acc in compared.acc])
    for (target, n_train, mode, acc, loss, _, primary), p in zip(compared.values, adjusted):
        primary = " (primary)" * primary
        rows.append([target, str(n_train), f"{mode} - {baseline_arm()}{primary}",
                     str(seeds[target, n_train, mode]), *acc.text(), p_text(acc.p),
                     p_text(p), *loss.text()])
    return pd.DataFrame(means, columns=ARM_HEADER), pd.DataFrame(rows, columns=DIFF_HEADER)


PREREGISTERED_HEADER = [
    "target", "n_train", "comparison", "seeds", "mean (points)", "median", "95% t interval",
    "seeds for / against / tied", "Wilcoxon p", "Holm p (primaries)",
    f"equivalence p (±{EQUIVALENCE_MARGIN:g})", "reading"]


def preregistered(results: list[RunResult], augmented: bool = False,
                  protocol: bool = True) -> tuple[pd.DataFrame, str]:
    """The comparisons as results/PROTOCOL.md tests them, in points, and
    the smallest difference the seeds detect. Holm runs over a protocol
    sweep's primaries, and only they are read; elsewhere over all."""
    arms = arm_runs(results)
    rows, tests, sds = [], [], []
    compared = protocol_comparisons(arms, augmented, protocol)
    for target, n_train, mode, _, _, diffs, primary in compared.values:
        ci = MeanCI.of(diffs, POINTS_RANGE)
        sides = [sum(d > 0 for d in diffs), sum(d < 0 for d in diffs),
                 sum(d == 0 for d in diffs)]
        wilcoxon, tost = wilcoxon_p(diffs), tost_p(diffs, EQUIVALENCE_MARGIN)
        rows.append([
            target, str(n_train), f"{mode} − {baseline_arm()}" + " (primary)" * primary,
            str(ci.n), f"{ci.mean:+.1f}", f"{statistics.median(diffs):+.1f}",
            f"[{ci.low:+.1f}, {ci.high:+.1f}]" if ci.n > 1 else "n/a",
            " / ".join(map(str, sides)), p_text(wilcoxon), "", p_text(tost), "exploratory"])
        if primary or not protocol:
            tests.append((rows[-1], wilcoxon, tost, ci.mean))
        if primary or (not protocol and mode == PRIMARY_ARM):
            sds.append((ci.sd, ci.n))
    found = "a finding" if protocol else "a difference"
    for (row, _, tost, mean), p in zip(tests, holm([test[1] for test in tests])):
        row[9] = p_text(p)
        row[11] = (f"{found}: {mean:+.1f} points" if p < 0.05 else
                   f"no difference beyond {MARGIN}" if tost < 0.05 else "not shown either way")
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
    whose = "the primaries'" if protocol else f"{PRIMARY_ARM} − {baseline_arm()}'s"
    # beyond 100 points no accuracy can go: cut there, as the intervals are
    smallest = span([min(100.0, detectable(sd, n)) for sd, n in sds])
    return (f"With {sds[0][1]} seeds and {whose} paired sd of {span([sd for sd, _ in sds])} "
            "points, the smallest difference a paired t-test detects at 5% with 80% power is "
            f"{smallest} points.")


def collapses(results: list[RunResult]) -> pd.DataFrame:
    """Per target, n_train, arm and rate, over every run: how many collapsed
    (near chance) and how many were still improving at their budget."""
    rows = frame(results)
    counts = rows[rows.arm].groupby([*KEY, "learning_rate"]).agg(
        runs=("seed", "size"), collapsed=("collapsed", "sum"), late=("late", "sum"),
        selected=("selected", "sum")).reset_index()
    runs = counts.runs.astype(str)
    return pd.DataFrame({
        "target": counts.target, "n_train": counts.n_train.astype(str), "mode": counts["mode"],
        "learning rate": counts.learning_rate.map("{:g}".format), "runs": runs,
        "collapsed (near chance)": counts.collapsed.astype(str) + " of " + runs,
        "still improving at the budget": counts.late.astype(str) + " of " + runs,
        "selected": counts.selected.astype(str)})


def collapsed_lines(results: list[RunResult]) -> str:
    """The console's collapsed runs: a line per arm and rate, or ''."""
    lines = [f"{mode} on {target} at {n} labels, rate {rate}: {k} collapsed"
             for target, n, mode, rate, _, k, *_ in collapses(results).values
             if not k.startswith("0 of")]
    heading = (f"Collapsed runs (best validation loss within {1 - NEAR_CHANCE:.0%} of "
               "guessing's), over all runs:")
    return "\n  ".join([heading, *lines]) if lines else ""


def sensitivity_table(results: list[RunResult]) -> pd.DataFrame | None:
    """Each pretrained arm minus the baseline at every rate the baseline
    ran, paired by seed, and at its rate of the best mean test accuracy:
    a bound, never a result (the test set picks it). None without a grid."""
    rows, base = frame(results), baseline_arm()
    base_runs = rows[rows["mode"] == base]
    base_runs = base_runs.drop_duplicates([*PAIR, "learning_rate"], keep="last")
    rates = sorted(set(base_runs.learning_rate))
    if len(rates) < 2:
        return None
    by_rate = base_runs.groupby([*KEY[:2], "learning_rate"], sort=False).test_acc
    best = by_rate.agg(lambda acc: sum(acc.tolist()) / len(acc)).groupby(
        KEY[:2], sort=False).idxmax()
    arms = arm_runs(results)
    arms = arms[arms["mode"].isin(pretrained_arms())]
    pairs = arms.merge(base_runs[[*PAIR, "learning_rate", "test_acc"]], on=PAIR,
                       suffixes=("", "_base")).sort_values("seed")
    pairs["acc"] = pairs.test_acc - pairs.test_acc_base
    cells = pairs.groupby([*KEY, "learning_rate_base"]).acc.agg(
        lambda acc: points(MeanCI.of(acc.tolist(), (-1.0, 1.0))))
    table = []
    for key in sorted(arms.groupby(KEY).groups, key=arm_order):
        if key[:2] in best:
            at = best[key[:2]][2]
            row = [cells.get((*key, rate), "–") for rate in [*rates, at]]
            table.append([key[0], str(key[1]), f"{key[2]} − {base}", *row[:-1],
                          f"{row[-1]} (at {at:g})"])
    header = ["target", "n_train", "difference", *[f"{base} at {rate:g}" for rate in rates],
              f"bound: {base} at its best rate on the test set"]
    return pd.DataFrame(table, columns=header)


def percent_table(results: list[RunResult], modes: list[str] | None = None,
                  differences: list[str] | None = None) -> pd.DataFrame:
    """Per (target, n_train): the mean test accuracy in % of `modes` (or of
    the arms that ran), and the leads of `differences` (or of all) in points."""
    arms, base = arm_runs(results), baseline_arm()
    modes = modes or [mode for mode in ARMS if mode in set(arms["mode"])]
    shown = modes if differences is None else differences
    leads = [m for m in modes if ARMS[m].pretrained and base in modes and m in shown]
    header = ["target", "n_train", *modes, *[f"{mode} − {base}" for mode in leads]]
    if arms.empty:
        return pd.DataFrame(columns=header)
    means = arms.groupby(KEY).test_acc.agg(
        lambda acc: f"{100 * MeanCI.of(acc.tolist()).mean:.1f}")
    lead = comparisons(arms).set_index(KEY).acc.map(points).unstack()
    lead = lead.reindex(columns=leads).add_suffix(f" − {base}")
    table = means.unstack().join(lead).reset_index().astype({"n_train": str})
    return table.reindex(columns=header).fillna("–")


def rate_choices(results: list[RunResult]) -> pd.DataFrame:
    """The selected runs, grouped by target and arm, each with the size of
    its grid, whether it chose an edge of it, and whether a bound there."""
    rows = frame(results)
    rates = rows.groupby(GRID).learning_rate
    rows["rates"] = rates.transform("count")
    rows["edge"] = rows.learning_rate.eq(rates.transform("min")) | \
        rows.learning_rate.eq(rates.transform("max"))
    rows["bound"] = rows.edge & rows.learning_rate.isin(LR_BOUNDS)
    chosen = rows[rows.arm & rows.selected]
    order = chosen.groupby(["target", "mode"], sort=False).ngroup()
    return chosen.iloc[order.argsort(kind="stable")]


def at_an_edge(choices: pd.DataFrame) -> int | None:
    """How many chose an edge of their grid (it may be too narrow) but a
    bound, where --widen stops; None under 3 rates: all are edges."""
    if choices.rates.min() < 3:
        return None
    return int(choices.edge.sum() - choices.bound.sum())


BUDGET_HEADER = ["target", "mode", "runs", "learning rates run", "learning rates chosen",
                 "at an edge of the rates run", "best epoch in the last tenth of the budget"]


def budget_table(results: list[RunResult]) -> pd.DataFrame:
    """Per target and arm, over its selected runs: the rates run and chosen,
    how often at an edge, and how many were still improving at the end."""
    ran = frame(results).groupby(["target", "mode"]).learning_rate.unique()
    rows = []
    choices = rate_choices(results).groupby(["target", "mode"], sort=False)
    for (target, mode), chosen in choices:
        n, edge = len(chosen), at_an_edge(chosen)
        counts = chosen.learning_rate.value_counts().sort_index().items()
        rows.append([
            target, mode, str(n), ", ".join(f"{rate:g}" for rate in sorted(ran[target, mode])),
            ", ".join(f"{rate:g} ×{k}" for rate, k in counts),
            "no grid" if chosen.rates.max() == 1 else
            f"n/a: a grid of {chosen.rates.min()} rates is all edges" if edge is None else
            f"{edge} of {n}", f"{chosen.late.sum()} of {n}"])
    return pd.DataFrame(rows, columns=BUDGET_HEADER)


def fragile(results: list[RunResult]) -> list[str]:
    """Where the answer is fragile, in words, each with what it counts
    against and what to do: for the end of the console and the Markdown."""
    rows, choices = frame(results), rate_choices(results)
    warnings = backbone_warnings(rows[~rows.arm & rows.selected])
    for mode in ARMS:
        chosen = choices[choices["mode"] == mode]
        late, head, n = chosen.late.sum(), chosen.head_stage.sum(), len(chosen)
        if late:
            warnings.append(f"{mode}: {late} of {n} selected runs were still improving in the "
                            "last tenth of their epochs; their test accuracy may be understated: "
                            "raise --train-epochs")
        if head:
            warnings.append(f"{mode}: {head} of {n} selected runs were tested on their head "
                            "stage (best epoch within it: fine-tuning never improved on the "
                            "head), as a frozen run with the head's budget would be")
    for r in choices[choices.collapsed].itertuples():
        warnings.append(f"{r.target}/{r.mode} n_train {r.n_train} seed {r.seed} (lr "
                        f"{r.learning_rate:g}), a selected run, is no better than chance on "
                        f"validation (loss {r.val_loss:.4f}; guessing gives "
                        f"{chance_loss(r.target):.4f}): it learned next to nothing at that "
                        "rate, and its test accuracy is in the summary; read its learning "
                        "curves, and the sensitivity table")
    return warnings + grid_warnings(choices)


def backbone_warnings(backbones: pd.DataFrame) -> list[str]:
    """The pretraining grid's picks still improving when it stopped."""
    weak = backbones[backbones.late]
    if weak.empty:
        return []
    seeds = ", ".join(map(str, weak.seed))
    epochs = "/".join(sorted(set(map(str, weak.best_epoch))))
    accuracy = f"{weak.test_acc.min():.4f}"
    if len(weak) > 1:
        accuracy += f"-{weak.test_acc.max():.4f}"
    return [f"{len(weak)} of {len(backbones)} backbones (seed{'s' * (len(weak) > 1)} {seeds}) "
            f"were still improving when pretraining stopped: best validation loss at epoch "
            f"{epochs} of {weak.max_epochs.iloc[0]} (test accuracy {accuracy}); pretraining "
            "longer may change what transfer gains: raise --pretrain-epochs (--protocol fair "
            "stops on --pretrain-patience)"]


def grid_warnings(choices: pd.DataFrame) -> list[str]:
    """Rates chosen at an edge of their grid, or no grid at all."""
    if choices.empty:
        return []
    if choices.rates.max() < 2:
        return ["every arm ran at one fixed learning rate, not its best: --protocol fair gives "
                "each arm its best of a grid, over 5 seeds"]
    n, edge, bound = len(choices), at_an_edge(choices), choices.bound.sum()
    warnings = []
    if edge:
        warnings.append(f"{edge} of {n} selected runs have their rate at an edge of the rates "
                        "run: the best rate may lie beyond; widen --lr-grid (or --widen)")
    elif edge is None:
        warnings.append("a grid of fewer than 3 rates cannot tell whether the best rate lies "
                        "outside it")
    if bound:
        warnings.append(f"{bound} of {n} selected runs have their rate at {LR_BOUNDS[0]:g} or "
                        f"{LR_BOUNDS[1]:g}, where --widen stops: the rates beyond were not tried")
    return warnings


SELECTIONS = {
    "seed": "each seed's own validation loss picks its rate (--select seed)",
    "pooled": "one rate per (target, arm, n_train): the lowest median validation loss over "
              "seeds, which one collapsed seed cannot move (--select pooled)",
    "mean": "one rate per (target, arm, n_train): the lowest mean validation loss over seeds "
            "(--select mean)"}


def network_line(configs: typing.Iterable[dict]) -> str:
    """The backbone trained by sweeps of these settings: a summary's first line."""
    lines = []
    for config in configs:
        start = f"pretrained here on {config.get('source')}"
        if config.get("weights"):
            start = f"from --weights {config['weights']}"
        size = config.get("image_size")
        resized = f", images resized to {size} pixels" if size else ""
        lines.append(f"{config.get('backbone', 'lenet')} {start}{resized}")
    return f"Backbone: {'; '.join(dict.fromkeys(lines))}.\n\n" if lines else ""


def write_summary(results: list[RunResult], path: str, select: str = "seed",
                  warnings: typing.Sequence[str] = (), augmented: bool = False,
                  protocol: bool = False, network: str = "") -> str:
    """Markdown at `path`: the summary over seeds (the run table for one
    seed) with each comparison once, the sensitivity, the rates and the
    warnings. Returns the console's summary ('' for one seed)."""
    rows, budget = frame(results), budget_table(results)
    closing = "## Learning rates and epoch budget\n\n"
    if not rows.selected.all():
        closing += f"Rate selection: {SELECTIONS[select]}.\n\n"
    closing += f"{markdown(budget)}\n"
    if warnings := [*warnings, *fragile(results)]:
        closing += "\n## Warnings\n\n" + "".join(f"- {warning}\n" for warning in warnings)
    if arm_runs(results).groupby(KEY).size().lt(2).all():
        runs = markdown(run_table(rows))
        replace_text(path, f"# Test results\n\n{network}{runs}\n\n{closing}")
        return ""
    arms, differences = summarize(results, augmented, protocol)
    fewest, caution = arms.seeds.astype(int).min(), ""
    if fewest in (2, 3):
        caution = (f"Intervals from {fewest} seeds are wide (t(0.975) is {t_975(fewest - 1):.3f} "
                   f"with {fewest} seeds, {t_975(4):.3f} with 5); they are cut to what the metric "
                   "can reach.\n\n")
    if select == "seed":  # each comparison once: in points
        tables, console = seed_comparisons(results, augmented, protocol)
    else:
        tables, console = t_tests(results, differences)
    replace_text(path, f"# Test results over seeds\n\n{network}{markdown(arms)}\n\n{caution}"
                       f"{tables}\n\n{sensitivity_text(results)}{closing}")
    parts = [aligned(arms), caution.strip(), *console, aligned(budget)]
    return "\n\n".join(filter(None, parts))


def sensitivity_text(results: list[RunResult]) -> str:
    table = sensitivity_table(results)
    return "" if table is None else (
        "## Sensitivity to the baseline's rate\n\nEach pretrained arm minus the baseline run at "
        "each of its rates instead of the one validation chose, paired by seed; the last column "
        "picks the baseline's rate on the test set, so it is a bound on how much a luckier "
        f"choice could take away, not a result.\n\n{markdown(table)}\n\n")


def t_tests(results: list[RunResult], differences: pd.DataFrame) -> tuple[str, list[str]]:
    """The comparisons of rates chosen over seeds, by paired t-tests with
    Holm's adjustment: as Markdown, and the console's."""
    text = ("Paired by seed: both arms of a seed share the training subset and the head's "
            "initial weights. p: the paired t-test of no difference in test accuracy; Holm p: "
            f"adjusted by Holm's method over the {len(differences)} comparisons of this table, "
            f"the ones to state as findings where below 0.05.\n\n{markdown(differences)}\n\n"
            "In percent: mean test accuracy, and the paired difference in points with its 95% "
            f"interval.\n\n{markdown(percent_table(results))}")
    return text, [aligned(differences)]


def seed_comparisons(results: list[RunResult], augmented: bool,
                     protocol: bool) -> tuple[str, list[str]]:
    """The comparisons of a seed-selected sweep by results/PROTOCOL.md's
    tests, as Markdown and the console's: pre-registered in its own
    sweeps, its rules applied elsewhere."""
    table, power = preregistered(results, augmented, protocol)
    title = "The pre-registered comparisons (results/PROTOCOL.md)"
    tost = f"a difference within {MARGIN} shown by two one-sided tests at 5%"
    rules = (f"The primaries: Wilcoxon's signed-rank test, Holm's adjustment over the "
             f"primaries alone, and {tost}. The other rows are exploratory: intervals, no claims.")
    if not protocol:
        title = "The comparisons, each seed at its own rate"
        rules = ("No comparison was named before these runs, so none is primary: Wilcoxon's "
                 f"signed-rank test with Holm's adjustment over all {len(table)} comparisons, "
                 f"and {tost}.")
    elif none := no_primaries(sizes_run(arm_runs(results)), augmented):
        rules = f"{none} has no primaries: every row is exploratory, intervals and no claims."
    said = " ".join(filter(None, [rules, power]))
    text = (f"## {title}\n\nEach pretrained arm minus {baseline_arm()} in test accuracy points, "
            "paired by seed, each seed at the rate its own validation loss chose. "
            f"{said}\n\n{markdown(table)}\n\n## Collapsed and still-improving runs, at every "
            f"rate\n\n{markdown(collapses(results))}\n\nIn percent: mean test accuracy.\n\n"
            f"{markdown(percent_table(results, differences=()))}")
    return text, [f"{aligned(table)}\n{power}", collapsed_lines(results)]


def log_learning_curves(results: list[RunResult], cfg: argparse.Namespace) -> None:
    """TensorBoard: each arm's mean test accuracy and loss over seeds
    against n_train (the step), a run per arm under learning_curve/."""
    arms = arm_runs(results)
    for mode in cfg.modes:
        curve = lightning.pytorch.loggers.TensorBoardLogger(
            cfg.log_dir, name=f"learning_curve/{mode}", version=cfg.version,
            default_hp_metric=False)
        sizes = arms[arms["mode"] == mode].groupby(["target", "n_train"])
        for (target, n_train), runs in sizes:
            acc = MeanCI.of(runs.test_acc.tolist()).mean
            loss = MeanCI.of(runs.test_loss.tolist()).mean
            curve.log_metrics({f"{target}/test_accuracy": acc, f"{target}/test_loss": loss},
                              step=int(n_train))
        curve.finalize("success")


def comparison_table(sweeps: dict[str, list[RunResult]]) -> pd.DataFrame:
    """Each pretrained arm minus the baseline, in points with its 95%
    interval, side by side for several sweeps (--report LABEL=CSV ...)."""
    arms = {label: arm_runs(results) for label, results in sweeps.items()}
    keys = {key for runs in arms.values() for key in runs.groupby(KEY).groups
            if ARMS[key[2]].pretrained}
    leads = [comparisons(runs).set_index(KEY).acc.map(points) for runs in arms.values()]
    rows = [[target, str(n), f"{mode} − {baseline_arm()}",
             *[lead.get((target, n, mode), "–") for lead in leads]]
            for target, n, mode in sorted(keys, key=arm_order)]
    return pd.DataFrame(rows, columns=["target", "n_train", "difference", *sweeps])


def change_table(sweeps: dict[str, list[RunResult]]) -> pd.DataFrame | None:
    """How each pretrained arm's lead over the baseline changes from one
    sweep to a later one, paired by the seeds they share: in points with
    its 95% interval and paired-t p. None where none shares two seeds."""
    leads = {label: paired_runs(arm_runs(results)).set_index([*KEY, "seed"]).acc
             for label, results in sweeps.items()}
    rows = []
    for earlier, later in itertools.combinations(sweeps, 2):
        change = (leads[later] - leads[earlier]).dropna().groupby(level=KEY)
        for key, seeds in sorted(change, key=lambda group: arm_order(group[0])):
            ci = MeanCI.of(seeds.tolist(), (-2.0, 2.0))
            if ci.n > 1:
                rows.append([key[0], str(key[1]), f"{key[2]} − {baseline_arm()}",
                             f"{later} − {earlier}", str(ci.n), points(ci), p_text(ci.p)])
    header = ["target", "n_train", "difference", "change", "seeds", "change in points",
              "p (paired t)"]
    return pd.DataFrame(rows, columns=header) if rows else None


def write_comparison(sweeps: dict[str, list[RunResult]], sources: dict[str, list[str]],
                     path: Path) -> str:
    """Markdown at `path`: each sweep's mean accuracies with PRIMARY_ARM's
    lead, all leads side by side and how each changes. Returns the side
    by side table for the console."""
    ran = {r.mode for results in sweeps.values() for r in results}
    modes = [mode for mode in ARMS if mode in ran]
    means = pd.concat([percent_table(results, modes, [PRIMARY_ARM]).assign(sweep=label)
                       for label, results in sweeps.items()])
    means = means[["sweep", *means.columns[:-1]]]
    side_by_side, change = comparison_table(sweeps), change_table(sweeps)
    changed = "" if change is None else (
        "How each lead changes from one sweep to a later one, paired by the seeds they share "
        "(what else differs between the two sweeps, their images and rate choices, comes with "
        f"the change):\n\n{markdown(change)}\n\n")
    listed = "; ".join(f"{label}: {', '.join(csvs)}" for label, csvs in sources.items())
    replace_text(path, f"# Sweeps compared\n\nMean test accuracy in %, and {PRIMARY_ARM} minus "
                       f"{baseline_arm()} in points with its 95% interval:\n\n{markdown(means)}"
                       "\n\nThe paired differences side by side:\n\n"
                       f"{markdown(side_by_side)}\n\n{changed}Sweeps: {listed}.\n")
    return aligned(side_by_side)
