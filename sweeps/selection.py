"""Choosing a learning rate in each grid, and widening a grid whose pick sits at its edge:
pure functions of finished rows. Imported by the engine, cli (--report) and the reporting
modules; it imports runs and settings, never a reporting module."""

import math
import statistics

import transfer_mnist as tm
from sweeps.runs import Run, not_nan
from sweeps.settings import next_rate


def selection_group(run, select):
    """The runs among which one learning rate is selected: a (target, mode, n_train, seed), or with
    pooled or mean selection every seed of a (target, mode, n_train)."""
    return (run.target, run.mode, run.n_train) + ((run.seed,) if select == "seed" else ())


def pooled_loss(rows, select):
    """A rate's validation loss over the seeds: the median (pooled: robust to one seed in five that
    collapsed to chance), the mean (a seed that collapsed moves it), or one seed's own."""
    losses = [not_nan(r.val_loss) for r in rows]
    return sum(losses) / len(losses) if select == "mean" else statistics.median(losses)


# A rate more of whose runs than this share were still improving at the end of their budget is
# no candidate
LATE_SHARE = 0.1


def still_improving(r):
    """Its best epoch in the last tenth of its budget: more epochs might have helped
    (under-trained)."""
    return r.best_epoch > 0.9 * r.max_epochs


def settled(rows):
    """At most LATE_SHARE of the runs were still improving at the end of their budget."""
    return sum(map(still_improving, rows)) <= LATE_SHARE * len(rows)


# A validation loss this close to guessing's is a run that learned next to nothing: seed 103 of
# even/odd at 200 labels collapsed to 0.6836 (49.3% on test) against ln 2 = 0.6931, under the
# 0.99 of an earlier threshold
NEAR_CHANCE = 0.95


def chance_loss(target):
    """The validation loss of a model that learned nothing: ln(classes), uniform guessing. None for
    a target that is not registered here."""
    spec = tm.TARGETS.get(target)
    return math.log(len(spec.label_names)) if spec else None


def learned(rows, select):
    """The rate's pooled validation loss is clearly below guessing's (a rate that diverged, or
    collapsed, is not)."""
    chance = chance_loss(rows[0].target)
    return chance is None or pooled_loss(rows, select) < NEAR_CHANCE * chance


def candidate_rates(rates, select):
    """The rates of a selection group that may be chosen. Per seed (--select seed,
    results/PROTOCOL.md), every rate the seed ran. Pooled or mean: those at which at most
    LATE_SHARE of the runs were still improving at the end of their budget, and which learned
    something. A run stopped by its budget has not shown its validation loss, and a lower rate
    under a fixed ceiling is an earlier stop in disguise: with more epochs, ever lower rates
    win. A rate that settled by diverging (0.3 and 1 for 20 epochs) is no better. Where no rate
    qualifies, every rate may (the summary's warnings count the late runs)."""
    if select == "seed":
        return rates
    return {rate: rows for rate, rows in rates.items()
            if settled(rows) and learned(rows, select)} or rates


def select_rates(results, select="seed"):
    """Mark, in each selection group, the runs of the rate with the lowest best-validation loss,
    pooled over seeds as `select` says, among its candidate_rates(), as selected (the lower rate
    on a tie). Test data never enters the choice."""
    groups = {}
    for r in results:
        groups.setdefault(selection_group(r, select), {}).setdefault(r.learning_rate, []).append(r)
    for rates in groups.values():
        candidates = candidate_rates(rates, select)
        pick = min(candidates, key=lambda rate: (pooled_loss(candidates[rate], select), rate))
        for rate, rows in rates.items():
            for r in rows:
                r.selected = rate == pick
    return results


def settle(results, select, planned=()):
    """select_rates() in every (target, mode, n_train) of rows read back (--report) that holds each
    run it should: those `planned` (from the sweeps' saved settings) and every (seed, rate) that
    it has for some rate or seed (rows without settings: an interrupted sweep leaves a grid half
    done). One that lacks any gets no selected row, so it stays out of the summary until
    --resume completes it; returned as lines that name it, with the seeds it lacks, beside the
    rows."""
    expected = {}  # (target, mode, n_train) -> its (seed, rate)s
    for run in planned:
        group = selection_group(run, "pooled")
        expected.setdefault(group, set()).add((run.seed, run.learning_rate))
    held = {}  # (target, mode, n_train) -> its rows
    for r in results:
        held.setdefault(selection_group(r, "pooled"), []).append(r)
    incomplete = []
    for (target, mode, n_train), rows in held.items():
        have = {(r.seed, r.learning_rate) for r in rows}
        seeds_held = {seed for seed, _ in have}
        want = expected.get((target, mode, n_train), set())
        # each seed widened its own grid: the planned runs, seed by seed
        if select == "seed" and want:
            want = want | have
        elif mode in tm.ARMS:
            rates = {rate for _, rate in have}
            want = want | {(seed, rate) for seed in seeds_held for rate in rates}
        if have >= want:
            select_rates(rows, select)
            continue
        for r in rows:
            r.selected = False
        lacking = {seed for seed, _ in want - have}
        found = ((lacking - seeds_held, "missing"), (lacking & seeds_held, "part-done"))
        lacks = "; ".join(f"seed{'s' * (len(ids) > 1)} {', '.join(map(str, sorted(ids)))} {what}"
                          for ids, what in found if ids)
        incomplete.append(f"{target}/{mode} n_train {n_train} is incomplete: {len(have)} of "
                          f"{len(want)} runs ({lacks}); its {len(rows)} finished rows stay out of "
                          f"the summary until --resume completes it")
    return results, incomplete


def widening(cfg, grid, rows):
    """--widen, of a complete grid (its runs and their rows, in turn): the runs of the next rate
    past the edge where its pick sits (for each seed it holds) and why; or none, warning where a
    lower rate would not settle."""
    picked = [r for r in rows if r.selected]
    pick = picked[0].learning_rate if picked else None
    rates = [r.learning_rate for r in rows]
    rate = next_rate(rates, pick) if cfg.widen and pick else None
    if rate is None:
        return [], ""
    first = grid[0]
    which = f"{first.target}/{first.mode} n_train {first.n_train}"
    if cfg.select != "seed" and rate < pick and not settled(picked) \
            and learned(picked, cfg.select):
        # no rate settled by the ceiling: a lower one would settle later still. A pick that
        # learned nothing (the rates above it diverge too) says nothing of those below it
        late = sum(map(still_improving, picked))
        return [], (f"{which}: not widened below {pick:g}, where {late} of {len(picked)} runs "
                    f"were still improving at the end of their budget: raise --train-epochs")
    new = [Run(first.target, first.mode, seed, first.n_train, rate)
           for seed in sorted({run.seed for run in grid})]
    if cfg.select == "seed":
        which += f" seed {first.seed}"
    return new, (f"{which}: the pick {pick:g} sits at an edge of the rates run "
                 f"({', '.join(f'{r:g}' for r in sorted(set(rates)))}); "
                 f"adding {rate:g} for {len(new)} seed{'s' * (len(new) > 1)}")
