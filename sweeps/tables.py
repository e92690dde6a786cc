"""The summary's tables, each a grouping or pivot of one DataFrame of a
sweep's rows, their cells text as printed. Imported by summary, figures
and cli; it imports runs, selection, settings, stats and the template."""

import dataclasses
import itertools
import math
import statistics

import pandas as pd

import transfer_mnist as tm
from sweeps.runs import RunResult
from sweeps.selection import NEAR_CHANCE, chance_loss, still_improving
from sweeps.settings import EQUIVALENCE_MARGIN, LR_BOUNDS, PRIMARY_ARM, PRIMARY_N_TRAIN
from sweeps.stats import MeanCI, detectable, holm, tost_p, wilcoxon_p

ARMS = tm.ARMS
KEY = ["target", "n_train", "mode"]  # an arm at a size: a summary's row
PAIR = ["target", "n_train", "seed"]  # the runs a seed pairs
# where a mean's interval can lie: an accuracy, a loss, a difference in points
ACCURACY_RANGE, LOSS_RANGE = (0.0, 1.0), (0.0, math.inf)
POINTS_RANGE = (-100.0, 100.0)
MARGIN = f"±{EQUIVALENCE_MARGIN:g} points"


def baseline_arm():
    """The arm that is not pretrained: the others are paired with it."""
    return next(name for name, arm in ARMS.items() if not arm.pretrained)


def pretrained_arms():
    return [name for name, arm in ARMS.items() if arm.pretrained]


def arm_order(key):
    return key[0], key[1], list(ARMS).index(key[2])


def frame(results):
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
    # for the rates a run chose from: their number, an edge, a bound
    rates = rows.groupby(["target", "mode", "n_train", "seed"]).learning_rate
    rows["rates"] = rates.transform("count")
    rows["edge"] = rows.learning_rate.eq(rates.transform("min")) | \
        rows.learning_rate.eq(rates.transform("max"))
    rows["bound"] = rows.edge & rows.learning_rate.isin(LR_BOUNDS)
    return rows


def arm_runs(results):
    """The selected run of each target, n_train, arm and seed."""
    rows = frame(results)
    chosen = rows[rows.arm & rows.selected]
    return chosen.drop_duplicates([*KEY, "seed"], keep="last")


def paired_runs(arms, base=None):
    """Pretrained arms' runs beside the baseline's (`base`, or selected) of their seed."""
    base = arms[arms["mode"] == baseline_arm()] if base is None else base
    base = base[[*PAIR, "learning_rate", "test_acc", "test_loss"]]
    pairs = arms[arms["mode"].isin(pretrained_arms())]
    pairs = pairs.merge(base, on=PAIR, suffixes=("", "_base"))
    pairs["acc"] = pairs.test_acc - pairs.test_acc_base
    pairs["loss"] = pairs.test_loss - pairs.test_loss_base
    pairs["order"] = pairs.groupby(KEY, sort=False).ngroup()
    return pairs.sort_values(["order", "seed"])


def comparisons(arms, augmented=False, protocol=False):
    """Per pretrained arm: MeanCIs of its paired differences with the baseline."""
    at = primary_sizes(sizes_run(arms), augmented) if protocol else {}
    rows = []
    for (target, n_train, mode), pair in paired_runs(arms).groupby(KEY, sort=False):
        acc, loss = pair.acc.tolist(), pair.loss.tolist()
        # rounded so that equal differences tie, as Wilcoxon's ranks need
        diffs = [round(100 * d, 6) for d in acc]
        primary = mode == PRIMARY_ARM and n_train == at.get(target)
        rows.append([target, n_train, mode, MeanCI.of(acc, (-1.0, 1.0)), MeanCI.of(loss), diffs,
                     primary])
    return pd.DataFrame(rows, columns=[*KEY, "acc", "loss", "diffs", "primary"])


def points(ci):
    """A difference of accuracies in points, with its 95% interval."""
    text = f"{100 * ci.mean:+.1f}"
    if ci.n < 2:
        return text
    return f"{text} [{100 * ci.low:+.1f}, {100 * ci.high:+.1f}]"


def p_text(p):
    if math.isnan(p):
        return "n/a"
    return f"{p:.2g}" if p < 0.001 else f"{p:.3f}"


def primary_sizes(sizes, augmented=False):
    """Each target's primary size in a sweep of results/PROTOCOL.md."""
    below = {target: [n for n in ns if n <= PRIMARY_N_TRAIN] for target, ns in sizes.items()}
    return {} if augmented else {target: max(ns) for target, ns in below.items() if ns}


def no_primaries(sizes, augmented=False):
    """Why a sweep of results/PROTOCOL.md has no primary, or ''."""
    if primary_sizes(sizes, augmented):
        return ""
    return "A sweep with --augment" if augmented else \
        f"A sweep of more than {PRIMARY_N_TRAIN} labels only"


def sizes_run(arms):
    return {target: set(sizes) for target, sizes in arms.groupby("target").n_train}


ARM_HEADER = ["target", "n_train", "mode", "seeds", "test acc mean ± sd", "95% CI",
              "test loss mean ± sd", "95% CI"]
DIFF_HEADER = ["target", "n_train", "paired difference", "seeds", "Δ test acc mean ± sd",
               "95% CI", "p (paired t)", "Holm p", "Δ test loss mean ± sd", "95% CI"]


def summarize(results, augmented=False, protocol=False):
    """Each arm's means over seeds; each pretrained arm minus the baseline."""
    arms = arm_runs(results)
    means = []
    for (target, n_train, mode), runs in arms.groupby(KEY, sort=False):
        acc = MeanCI.of(runs.test_acc.tolist(), ACCURACY_RANGE)
        loss = MeanCI.of(runs.test_loss.tolist(), LOSS_RANGE)
        if head := runs.head_stage.sum():
            mode += f" ({head} of {len(runs)} tested on the head stage)"
        means.append([target, str(n_train), mode, str(acc.n), *acc.text(), *loss.text()])
    seeds, compared = arms.groupby(KEY).size(), comparisons(arms, augmented, protocol)
    rows = []
    adjusted = holm([acc.p for acc in compared.acc])
    for (target, n_train, mode, acc, loss, _, primary), p in zip(compared.values, adjusted):
        rows.append([target, str(n_train), f"{mode} - {baseline_arm()}" + " (primary)" * primary,
                     str(seeds[target, n_train, mode]), *acc.text(), p_text(acc.p),
                     p_text(p), *loss.text()])
    return pd.DataFrame(means, columns=ARM_HEADER), pd.DataFrame(rows, columns=DIFF_HEADER)


PREREGISTERED_HEADER = [
    "target", "n_train", "comparison", "seeds", "mean (points)", "median", "95% t interval",
    "seeds for / against / tied", "Wilcoxon p", "Holm p (primaries)",
    f"equivalence p (±{EQUIVALENCE_MARGIN:g})", "reading"]


def preregistered(results, augmented=False, protocol=True):
    """The comparisons as results/PROTOCOL.md tests them, and power_line()."""
    rows, tests, sds = [], [], []
    compared = comparisons(arm_runs(results), augmented, protocol)
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


def power_line(sds, protocol):
    """The smallest difference the seeds of the read comparisons detect."""
    sds = [(sd, n) for sd, n in sds if n > 1 and not math.isnan(sd)]
    if not sds:
        return ""

    def span(values):
        low, high = f"{min(values):.1f}", f"{max(values):.1f}"
        return low if low == high else f"{low} to {high}"
    whose = "the primaries'" if protocol else f"{PRIMARY_ARM} − {baseline_arm()}'s"
    # beyond 100 points no accuracy can go: cut there, as the intervals are
    smallest = span([min(100.0, detectable(sd, n)) for sd, n in sds])
    return (f"With {sds[0][1]} seeds and {whose} paired sd of {span([sd for sd, _ in sds])} "
            "points, the smallest difference a paired t-test detects at 5% with 80% power is "
            f"{smallest} points.")


def collapses(results):
    """Per arm and rate, over every run: how many collapsed, how many were late."""
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


def sensitivity_table(results):
    """Each pretrained arm minus the baseline at each of the baseline's
    rates, and at its best on the test set; None without a grid."""
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
    pairs = paired_runs(arms, base_runs)
    arms = arms[arms["mode"].isin(pretrained_arms())]
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


def percent_table(results, modes=None, differences=None):
    """Mean test accuracy in % of `modes`, the leads of `differences` in points."""
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


def comparison_table(sweeps):
    """Each pretrained arm minus the baseline in points, sweep by sweep."""
    arms = {label: arm_runs(results) for label, results in sweeps.items()}
    keys = {key for runs in arms.values() for key in runs.groupby(KEY).groups
            if ARMS[key[2]].pretrained}
    leads = [comparisons(runs).set_index(KEY).acc.map(points) for runs in arms.values()]
    rows = [[target, str(n), f"{mode} − {baseline_arm()}",
             *[lead.get((target, n, mode), "–") for lead in leads]]
            for target, n, mode in sorted(keys, key=arm_order)]
    return pd.DataFrame(rows, columns=["target", "n_train", "difference", *sweeps])


def change_table(sweeps):
    """How each lead changes from a sweep to a later one, paired by the
    seeds they share; None where none shares two seeds."""
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
