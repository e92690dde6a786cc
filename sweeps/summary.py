"""A sweep's report: sweeps.tables' tables printed aligned and written as
Markdown, each comparison once; the warnings; several sweeps compared.
Imported by cli only; it imports files, selection, settings, stats and
tables.
"""

import math

import lightning
import pandas as pd

from sweeps.files import replace_text
from sweeps.selection import NEAR_CHANCE, chance_loss
from sweeps.settings import LR_BOUNDS, PRIMARY_ARM
from sweeps.stats import MeanCI, t_975
from sweeps.tables import (
    ARMS, KEY, MARGIN, arm_runs, baseline_arm, change_table, collapses, comparison_table, frame,
    no_primaries, percent_table, preregistered, sensitivity_table, sizes_run, summarize)


def aligned(table):
    """Columns padded to their widest cell, a rule under the header."""
    cells = [list(table.columns), *table.values.tolist()]
    widths = [max(map(len, column)) for column in zip(*cells)]
    lines = ["  ".join(map(str.ljust, row, widths)).rstrip() for row in cells]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def markdown(table):
    cells = [list(table.columns), ["---"] * table.shape[1], *table.values.tolist()]
    return "\n".join(f"| {' | '.join(row)} |" for row in cells)


RUN_CELLS = {
    "target": "{0.target}", "mode": "{0.mode}", "n_train": "{0.n_train}", "seed": "{0.seed}",
    "lr": "{0.learning_rate:g}", "best epoch": "{0.best_epoch}", "val loss": "{0.val_loss:.4f}",
    "test loss": "{0.test_loss:.4f}", "test acc": "{0.test_acc:.4f}"}


def run_table(rows):
    """A line per run; with a grid of rates, which was selected."""
    table = pd.DataFrame([[cell.format(r) for cell in RUN_CELLS.values()]
                          for r in rows.itertuples()], columns=list(RUN_CELLS))
    if not rows.selected.all():
        table["selected"] = rows.selected.map({True: "yes", False: ""})
    return table


def format_table(results):
    """The run table with each run's wall time ("earlier": a resumed one's)."""
    rows = frame(results)
    table = run_table(rows)
    if rows.seconds.notna().any():
        table["time"] = ["earlier" if math.isnan(s) else f"{s:.1f} s" for s in rows.seconds]
    return aligned(table)


def collapsed_lines(results):
    """The console's collapsed runs: a line per arm and rate, or ''."""
    lines = [f"{mode} on {target} at {n} labels, rate {rate}: {k} collapsed"
             for target, n, mode, rate, _, k, *_ in collapses(results).values
             if not k.startswith("0 of")]
    heading = (f"Collapsed runs (best validation loss within {1 - NEAR_CHANCE:.0%} of "
               "guessing's), over all runs:")
    return "\n  ".join([heading, *lines]) if lines else ""


def at_an_edge(choices):
    """How many chose an edge of their grid but a bound; None under 3 rates."""
    return None if choices.rates.min() < 3 else int(choices.edge.sum() - choices.bound.sum())


BUDGET_HEADER = ["target", "mode", "runs", "learning rates run", "learning rates chosen",
                 "at an edge of the rates run", "best epoch in the last tenth of the budget"]


def budget_table(results):
    """Per target and arm: the rates run and chosen, at an edge, late."""
    rows = frame(results)
    ran = rows.groupby(["target", "mode"]).learning_rate.unique()
    choices = rows[rows.arm & rows.selected].groupby(["target", "mode"], sort=False)
    table = []
    for (target, mode), chosen in choices:
        n, edge = len(chosen), at_an_edge(chosen)
        counts = chosen.learning_rate.value_counts().sort_index().items()
        table.append([
            target, mode, str(n), ", ".join(f"{rate:g}" for rate in sorted(ran[target, mode])),
            ", ".join(f"{rate:g} ×{k}" for rate, k in counts),
            "no grid" if chosen.rates.max() == 1 else
            f"n/a: a grid of {chosen.rates.min()} rates is all edges" if edge is None else
            f"{edge} of {n}", f"{chosen.late.sum()} of {n}"])
    return pd.DataFrame(table, columns=BUDGET_HEADER)


def fragile(results):
    """Where the answer is fragile, each with what to do about it."""
    rows = frame(results)
    warnings = backbone_warnings(rows[~rows.arm & rows.selected])
    choices = rows[rows.arm & rows.selected]
    group = choices.groupby(["target", "mode"], sort=False).ngroup()
    choices = choices.iloc[group.argsort(kind="stable")]  # grouped by target and arm
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


def backbone_warnings(backbones):
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


def grid_warnings(choices):
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


def network_line(configs):
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


def write_summary(results, path, select="seed", warnings=(), augmented=False, protocol=False,
                  network=""):
    """Markdown at `path`: the summary over seeds (the run table for one
    seed); returns the console's summary ('' for one seed)."""
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


def sensitivity_text(results):
    table = sensitivity_table(results)
    return "" if table is None else (
        "## Sensitivity to the baseline's rate\n\nEach pretrained arm minus the baseline run at "
        "each of its rates instead of the one validation chose, paired by seed; the last column "
        "picks the baseline's rate on the test set, so it is a bound on how much a luckier "
        f"choice could take away, not a result.\n\n{markdown(table)}\n\n")


def t_tests(results, differences):
    """Rates chosen over seeds: paired t-tests, as Markdown and console's."""
    text = ("Paired by seed: both arms of a seed share the training subset and the head's "
            "initial weights. p: the paired t-test of no difference in test accuracy; Holm p: "
            f"adjusted by Holm's method over the {len(differences)} comparisons of this table, "
            f"the ones to state as findings where below 0.05.\n\n{markdown(differences)}\n\n"
            "In percent: mean test accuracy, and the paired difference in points with its 95% "
            f"interval.\n\n{markdown(percent_table(results))}")
    return text, [aligned(differences)]


def seed_comparisons(results, augmented, protocol):
    """A seed-selected sweep by results/PROTOCOL.md's tests: as Markdown,
    and the console's; pre-registered in its own sweeps only."""
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


def log_learning_curves(results, cfg):
    """TensorBoard: each arm's means over seeds, n_train the step."""
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


def write_comparison(sweeps, sources, path):
    """Markdown at `path`: the sweeps' means, leads and changes; returns
    the leads side by side for the console."""
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
