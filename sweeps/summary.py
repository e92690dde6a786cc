"""Reporting: the run table, the summary over seeds (means with 95% intervals, seed-paired differences with
p-values and Holm's adjustment, the percent table, the sensitivity to the baseline's rate, the change of a lead
between sweeps), the learning rates run and chosen and the runs still improving, the warnings, and the
learning curves in TensorBoard. Imported by figures and cli only; it imports files, runs, settings, stats and
the template.
"""

from __future__ import annotations

import argparse
import math
import typing

import lightning

import transfer_mnist as tm
from sweeps.files import replace_text
from sweeps.runs import NEAR_CHANCE, RunResult, chance_loss, still_improving
from sweeps.settings import EQUIVALENCE_MARGIN, LR_BOUNDS, PRIMARY_ARM, PRIMARY_N_TRAIN
from sweeps.stats import MeanCI, detectable, holm, t_975, tost_p, wilcoxon_p

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


ACCURACY_RANGE, LOSS_RANGE = (0.0, 1.0), (0.0, math.inf)  # where a mean's interval can lie
POINTS_RANGE = (-100.0, 100.0)  # a difference of two accuracies, in points


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
    head initialisation); None for the baseline, or without it, or without a seed of both."""
    by_seed, base = groups[(target, n_train, mode)], groups.get((target, n_train, baseline_arm()))
    if not ARMS[mode].pretrained or base is None:
        return None
    seeds = sorted(by_seed.keys() & base.keys())
    if not seeds:
        return None
    return (MeanCI.of([by_seed[s].test_acc - base[s].test_acc for s in seeds], (-1.0, 1.0)),
            MeanCI.of([by_seed[s].test_loss - base[s].test_loss for s in seeds]))


def primary_sizes(sizes: dict[str, set[int]], augmented: bool = False) -> dict[str, int]:
    """The n_train at which each target's primary comparison is made in a sweep of results/PROTOCOL.md,
    from the sizes it ran: PRIMARY_N_TRAIN, or in a sweep without it its largest size below (a smaller run
    of the same question); with --augment or with larger sizes only (its 500 labels) none: every
    comparison there is exploratory."""
    if augmented:
        return {}
    below = {target: [n for n in ns if n <= PRIMARY_N_TRAIN] for target, ns in sizes.items()}
    return {target: max(ns) for target, ns in below.items() if ns}


def no_primaries(sizes: dict[str, set[int]], augmented: bool = False) -> str:
    """Why a sweep of results/PROTOCOL.md of these sizes has no primary comparison ('' where it has one): for
    its summary and start line."""
    if primary_sizes(sizes, augmented):
        return ""
    return "A sweep with --augment" if augmented else f"A sweep of more than {PRIMARY_N_TRAIN} labels only"


def sizes_run(groups: dict) -> dict[str, set[int]]:
    """Each target's n_train sizes in the groups of group_by_arm."""
    sizes: dict[str, set[int]] = {}
    for target, n_train, _ in groups:
        sizes.setdefault(target, set()).add(n_train)
    return sizes


def p_text(p: float) -> str:
    return "n/a" if math.isnan(p) else f"{p:.2g}" if p < 0.001 else f"{p:.3f}"


def summarize(results: list[RunResult], augmented: bool = False,
              protocol: bool = False) -> tuple[list[list[str]], list[list[str]]]:
    """Rows of two tables: each (target, n_train, mode) over seeds, and each pretrained arm minus the
    baseline, paired by seed, with its paired-t p-value and that value Holm-adjusted over every comparison
    of the table; in a sweep of results/PROTOCOL.md (`protocol`), the primary comparisons are marked where
    primary_sizes puts them."""
    groups = group_by_arm(results)
    at = primary_sizes(sizes_run(groups), augmented) if protocol else {}
    arms, differences, p_values = [], [], []
    for (target, n_train, mode), by_seed in groups.items():
        acc, loss = accuracy_ci(by_seed.values()), MeanCI.of([r.test_loss for r in by_seed.values()], LOSS_RANGE)
        head = head_stage_runs(by_seed.values()) if ARMS[mode].head_fraction else []
        shown = f"{mode} ({len(head)} of {len(by_seed)} tested on the head stage)" if head else mode
        arms.append([target, str(n_train), shown, str(acc.n), *acc.text(), *loss.text()])
        if difference := paired(groups, target, n_train, mode):
            primary = " (primary)" if mode == PRIMARY_ARM and n_train == at.get(target) else ""
            differences.append([target, str(n_train), f"{mode} - {baseline_arm()}{primary}", str(acc.n),
                                *difference[0].text(), p_text(difference[0].p), "", *difference[1].text()])
            p_values.append(difference[0].p)
    for row, adjusted in zip(differences, holm(p_values)):
        row[7] = p_text(adjusted)
    return arms, differences


def preregistered(results: list[RunResult], augmented: bool = False,
                  protocol: bool = True) -> tuple[list[str], list[list[str]], str]:
    """The comparisons as results/PROTOCOL.md tests them: each pretrained arm minus the baseline in test
    accuracy points, paired by seed, with the mean and median, the 95% t interval, how many seeds favour
    each side, Wilcoxon's signed-rank p-value, Holm's adjustment, the equivalence test at
    ±EQUIVALENCE_MARGIN points and what the numbers allow one to say; and a line on the smallest difference
    the seeds detect. In a sweep of results/PROTOCOL.md (`protocol`), Holm runs over its primaries alone
    (PRIMARY_ARM where primary_sizes puts them; none with --augment), and only they are read; in any other
    sweep nothing was named before the runs, so Holm runs over every comparison, and each is read."""
    groups = group_by_arm(results)
    at = primary_sizes(sizes_run(groups), augmented) if protocol else None
    rows, primary_p, sds = [], [], []
    base = baseline_arm()
    for (target, n_train, mode), by_seed in groups.items():
        other = groups.get((target, n_train, base))
        if not ARMS[mode].pretrained or other is None or not by_seed.keys() & other.keys():
            continue
        seeds = sorted(by_seed.keys() & other.keys())
        # in points, rounded so that equal differences tie, as Wilcoxon's ranks need (not 1.12 and 1.1199...)
        diffs = [round(100 * (by_seed[s].test_acc - other[s].test_acc), 6) for s in seeds]
        ci, ordered = MeanCI.of(diffs, POINTS_RANGE), sorted(diffs)
        median = (ordered[(len(diffs) - 1) // 2] + ordered[len(diffs) // 2]) / 2
        primary = at is not None and mode == PRIMARY_ARM and n_train == at.get(target)
        tested = primary or at is None
        wilcoxon, tost = wilcoxon_p(diffs), tost_p(diffs, EQUIVALENCE_MARGIN)
        favour = f"{sum(d > 0 for d in diffs)} / {sum(d < 0 for d in diffs)} / {sum(d == 0 for d in diffs)}"
        interval = f"[{ci.low:+.1f}, {ci.high:+.1f}]" if ci.n > 1 else "n/a"
        rows.append([target, str(n_train), f"{mode} − {base}" + " (primary)" * primary, str(len(diffs)),
                     f"{ci.mean:+.1f}", f"{median:+.1f}", interval, favour, p_text(wilcoxon),
                     "", p_text(tost), "exploratory"])
        if tested:
            primary_p.append((len(rows) - 1, wilcoxon, tost, ci.mean))
        if primary or (at is None and mode == PRIMARY_ARM):
            sds.append((ci.sd, ci.n))
    for (index, _, tost, mean), adjusted in zip(primary_p, holm([p for _, p, _, _ in primary_p])):
        rows[index][9] = p_text(adjusted)
        found = "a finding" if protocol else "a difference"
        rows[index][11] = (f"{found}: {mean:+.1f} points" if adjusted < 0.05 else
                           f"no difference beyond ±{EQUIVALENCE_MARGIN:g} points" if tost < 0.05 else
                           "not shown either way")
    sds = [(sd, n) for sd, n in sds if n > 1 and not math.isnan(sd)]

    def span(values: list[float]) -> str:
        return f"{min(values):.1f}" if f"{min(values):.1f}" == f"{max(values):.1f}" else \
            f"{min(values):.1f} to {max(values):.1f}"
    whose = "the primaries'" if protocol else f"{PRIMARY_ARM} − {base}'s"
    # beyond 100 points no accuracy can go: cut there, as the intervals are
    power = (f"With {sds[0][1]} seeds and {whose} paired sd of {span([sd for sd, _ in sds])} points, the "
             f"smallest difference a paired t-test detects at 5% with 80% power is "
             f"{span([min(100.0, detectable(sd, n)) for sd, n in sds])} points.") if sds else ""
    header = PREREGISTERED_HEADER if protocol else \
        [*PREREGISTERED_HEADER[:9], f"Holm p (all {len(rows)})", *PREREGISTERED_HEADER[10:]]
    return header, rows, power


def collapses(results: list[RunResult]) -> tuple[list[str], list[list[str]]]:
    """Per target, n_train, arm and rate, over every run (not only the selected): how many collapsed (a best
    validation loss within NEAR_CHANCE of guessing's) and how many were still improving at their budget."""
    groups: dict[tuple, list[RunResult]] = {}
    for r in results:
        if r.mode in ARMS:
            groups.setdefault((r.target, r.n_train, r.mode, r.learning_rate), []).append(r)
    rows = []
    for (target, n_train, mode, rate), runs in sorted(groups.items()):
        chance = chance_loss(target)
        collapsed = sum(chance is not None and r.val_loss >= NEAR_CHANCE * chance for r in runs)
        rows.append([target, str(n_train), mode, f"{rate:g}", str(len(runs)), f"{collapsed} of {len(runs)}",
                     f"{sum(map(still_improving, runs))} of {len(runs)}", f"{sum(r.selected for r in runs)}"])
    return COLLAPSE_HEADER, rows


def collapsed_lines(results: list[RunResult]) -> str:
    """The console's count of collapsed runs: one line per arm and rate where any run collapsed, or ''."""
    lines = [f"{mode} on {target} at {n_train} labels, rate {rate}: {collapsed} collapsed"
             for target, n_train, mode, rate, _, collapsed, *_ in collapses(results)[1]
             if not collapsed.startswith("0 of")]
    heading = f"Collapsed runs (best validation loss within {1 - NEAR_CHANCE:.0%} of guessing's), over all runs:"
    return "\n  ".join([heading, *lines]) if lines else ""


def head_stage_runs(runs: typing.Iterable[RunResult]) -> list[RunResult]:
    """LP-FT runs whose best epoch lies within their head stage: the fine-tuning stage never improved on the
    head trained on the frozen backbone, so they were tested as a frozen run would be."""
    return [r for r in runs if r.best_epoch <= max(1, round(ARMS[r.mode].head_fraction * r.max_epochs))]


def sensitivity_table(results: list[RunResult]) -> tuple[list[str], list[list[str]]] | None:
    """Each pretrained arm (at its selected rate) minus the baseline at every rate the baseline ran, paired by
    seed, and minus the baseline at the rate with its best mean test accuracy: a bound on what a luckier
    choice of the baseline's rate could take away, never a result (the test set picks it). None without a
    grid."""
    base = baseline_arm()
    runs_at: dict[tuple, dict[float, dict[int, RunResult]]] = {}
    for r in results:
        if r.mode == base:
            runs_at.setdefault((r.target, r.n_train), {}).setdefault(r.learning_rate, {})[r.seed] = r
    rates = sorted({rate for by_rate in runs_at.values() for rate in by_rate})
    if len(rates) < 2:
        return None
    rows = []
    for (target, n_train, mode), by_seed in sorted(group_by_arm(results).items(), key=lambda item: (
            item[0][0], item[0][1], list(ARMS).index(item[0][2]))):
        by_rate = runs_at.get((target, n_train), {})
        if not ARMS[mode].pretrained or not by_rate:
            continue

        def against(base_runs: dict[int, RunResult]) -> str:
            seeds = sorted(by_seed.keys() & base_runs.keys())
            diffs = [by_seed[s].test_acc - base_runs[s].test_acc for s in seeds]
            return points(MeanCI.of(diffs, (-1.0, 1.0))) if seeds else "–"

        best = max(by_rate, key=lambda rate: (sum(r.test_acc for r in by_rate[rate].values()) / len(by_rate[rate])))
        rows.append([target, str(n_train), f"{mode} − {base}",
                     *[against(by_rate[rate]) if rate in by_rate else "–" for rate in rates],
                     f"{against(by_rate[best])} (at {best:g})"])
    header = ["target", "n_train", "difference", *[f"{base} at {rate:g}" for rate in rates],
              f"bound: {base} at its best rate on the test set"]
    return header, rows


def points(ci: MeanCI) -> str:
    """A difference of accuracies in percentage points, with its 95% interval: +6.2 [+4.6, +7.9]."""
    return f"{100 * ci.mean:+.1f}" + (f" [{100 * ci.low:+.1f}, {100 * ci.high:+.1f}]" if ci.n > 1 else "")


def difference_text(groups: dict, target: str, n_train: int, mode: str) -> str:
    difference = paired(groups, target, n_train, mode) if (target, n_train, mode) in groups else None
    return points(difference[0]) if difference else "–"


def percent_table(results: list[RunResult], modes: list[str] | None = None,
                  differences: list[str] | None = None) -> tuple[list[str], list[list[str]]]:
    """Per (target, n_train): each arm's mean test accuracy in %, and each pretrained arm minus the baseline
    in points with its 95% interval. Columns: `modes`, or the arms that ran; the differences of `differences`
    among them, or of every pretrained one."""
    groups = group_by_arm(results)
    modes = modes or [mode for mode in ARMS if any(key[2] == mode for key in groups)]
    pretrained = [mode for mode in modes if ARMS[mode].pretrained and baseline_arm() in modes
                  and mode in (modes if differences is None else differences)]
    rows = []
    for target, n_train in dict.fromkeys((key[0], key[1]) for key in sorted(groups, key=lambda k: (k[0], k[1]))):
        rows.append([target, str(n_train)]
                    + [f"{100 * accuracy_ci(groups[(target, n_train, m)].values()).mean:.1f}"
                       if (target, n_train, m) in groups else "–" for m in modes]
                    + [difference_text(groups, target, n_train, m) for m in pretrained])
    return ["target", "n_train", *modes, *[f"{mode} − {baseline_arm()}" for mode in pretrained]], rows


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
    """How many choices sat at the lowest or highest rate of their grid (a sign it is too narrow), but at
    LR_BOUNDS, where --widen stops (at_a_bound); None under 3 rates, where every choice is at an edge."""
    if min(len(grid) for _, grid in choices) < 3:
        return None
    return sum(r.learning_rate in (min(grid), max(grid)) for r, grid in choices) - at_a_bound(choices)


def at_a_bound(choices: list[tuple[RunResult, list[float]]]) -> int:
    """How many choices sat at an edge of their grid that is one of LR_BOUNDS, beyond which --widen goes not."""
    return sum(r.learning_rate in LR_BOUNDS and r.learning_rate in (min(grid), max(grid)) for r, grid in choices)


def budget_rows(results: list[RunResult]) -> list[list[str]]:
    """Per target and arm, over its selected runs: the rates run and those chosen and how often, how often the
    choice sat at an edge of the rates run, and how many runs were still improving at the end of their budget."""
    ran: dict[tuple[str, str], set[float]] = {}
    for r in results:
        ran.setdefault((r.target, r.mode), set()).add(r.learning_rate)
    rows = []
    for (target, mode), choices in rate_choices(results).items():
        chosen = [r for r, _ in choices]
        counts = {rate: sum(r.learning_rate == rate for r in chosen)
                  for rate in sorted({r.learning_rate for r in chosen})}
        rates = [len(grid) for _, grid in choices]
        edge = at_an_edge(choices)
        rows.append([target, mode, str(len(chosen)), ", ".join(f"{rate:g}" for rate in sorted(ran[(target, mode)])),
                     ", ".join(f"{rate:g} ×{n}" for rate, n in counts.items()),
                     "no grid" if max(rates) == 1 else f"n/a: a grid of {min(rates)} rates is all edges"
                     if edge is None else f"{edge} of {len(chosen)}",
                     f"{sum(map(still_improving, chosen))} of {len(chosen)}"])
    return rows


def fragile(results: list[RunResult]) -> list[str]:
    """Where the answer is fragile, in words, each with what it counts against and what to do: for the end of
    the console and the Markdown."""
    backbones = [r for r in results if r.mode not in ARMS and r.selected]  # a pretraining grid's pick each
    weak = [r for r in backbones if still_improving(r)]
    epochs = "/".join(sorted({str(r.best_epoch) for r in weak}))
    warnings = [f"{len(weak)} of {len(backbones)} backbones (seed"
                f"{'s' * (len(weak) > 1)} {', '.join(str(r.seed) for r in weak)}) were still improving when "
                f"pretraining stopped: best validation loss at epoch {epochs} of {weak[0].max_epochs} (test accuracy {min(r.test_acc for r in weak):.4f}"
                + (f"-{max(r.test_acc for r in weak):.4f}" if len(weak) > 1 else "")
                + "); pretraining longer may change what transfer gains: raise --pretrain-epochs (--protocol fair "
                  "stops on --pretrain-patience)"] if weak else []
    choices = [choice for per_arm in rate_choices(results).values() for choice in per_arm]
    for mode in ARMS:
        selected = [r for r, _ in choices if r.mode == mode]
        late = sum(map(still_improving, selected))
        if late:
            warnings.append(f"{mode}: {late} of {len(selected)} selected runs were still improving in the last tenth "
                            f"of their epochs; their test accuracy may be understated: raise --train-epochs")
        head = head_stage_runs(selected) if ARMS[mode].head_fraction else []
        if head:
            warnings.append(f"{mode}: {len(head)} of {len(selected)} selected runs were tested on their head stage "
                            f"(best epoch within it: fine-tuning never improved on the head), as a frozen run with "
                            f"the head's budget would be")
    for r, _ in choices:
        chance = chance_loss(r.target)
        if chance is not None and r.val_loss >= NEAR_CHANCE * chance:
            warnings.append(f"{r.target}/{r.mode} n_train {r.n_train} seed {r.seed} (lr {r.learning_rate:g}), a "
                            f"selected run, is no better than chance on validation (loss {r.val_loss:.4f}; guessing "
                            f"gives {chance:.4f}): it learned next to nothing at that rate, and its test accuracy is in the "
                            f"summary; read its learning curves, and the sensitivity table")
    if any(len(grid) > 1 for _, grid in choices):
        edge = at_an_edge(choices)
        if edge:
            warnings.append(f"{edge} of {len(choices)} selected runs have their rate at an edge of the rates run: the "
                            f"best rate may lie beyond; widen --lr-grid (or --widen)")
        elif edge is None:
            warnings.append("a grid of fewer than 3 rates cannot tell whether the best rate lies outside it")
        if bound := at_a_bound(choices):
            warnings.append(f"{bound} of {len(choices)} selected runs have their rate at {LR_BOUNDS[0]:g} or "
                            f"{LR_BOUNDS[1]:g}, where --widen stops: the rates beyond were not tried")
    elif choices:
        warnings.append("every arm ran at one fixed learning rate, not its best: --protocol fair gives each arm "
                        "its best of a grid, over 5 seeds")
    return warnings


ARM_HEADER = ["target", "n_train", "mode", "seeds", "test acc mean ± sd", "95% CI", "test loss mean ± sd", "95% CI"]
DIFF_HEADER = ["target", "n_train", "paired difference", "seeds", "Δ test acc mean ± sd", "95% CI", "p (paired t)",
               "Holm p", "Δ test loss mean ± sd", "95% CI"]
BUDGET_HEADER = ["target", "mode", "runs", "learning rates run", "learning rates chosen", "at an edge of the rates run",
                 "best epoch in the last tenth of the budget"]


PREREGISTERED_HEADER = ["target", "n_train", "comparison", "seeds", "mean (points)", "median", "95% t interval",
                        "seeds for / against / tied", "Wilcoxon p", "Holm p (primaries)",
                        f"equivalence p (±{EQUIVALENCE_MARGIN:g})", "reading"]
COLLAPSE_HEADER = ["target", "n_train", "mode", "learning rate", "runs", "collapsed (near chance)",
                   "still improving at the budget", "selected"]


SELECTIONS = {"seed": "each seed's own validation loss picks its rate (--select seed)",
              "pooled": "one rate per (target, arm, n_train): the lowest median validation loss over seeds, which "
                        "one collapsed seed cannot move (--select pooled)",
              "mean": "one rate per (target, arm, n_train): the lowest mean validation loss over seeds "
                      "(--select mean)"}


def network_line(configs: typing.Iterable[dict]) -> str:
    """The backbone the runs of sweeps with these saved settings trained, for their summary's first line."""
    lines = []
    for config in configs:
        start = f"from --weights {config['weights']}" if config.get("weights") else \
            f"pretrained here on {config.get('source')}"
        size = f", images resized to {config['image_size']} pixels" if config.get("image_size") else ""
        lines.append(f"{config.get('backbone', 'lenet')} {start}{size}")
    return f"Backbone: {'; '.join(dict.fromkeys(lines))}.\n\n" if lines else ""


def write_summary(results: list[RunResult], path: str, select: str = "seed", warnings: typing.Sequence[str] = (),
                  augmented: bool = False, protocol: bool = False, network: str = "") -> str:
    """Markdown at `path`: the summary over seeds (the run table when every arm ran one seed), each
    comparison once: seed-selected sweeps by results/PROTOCOL.md's rules (pre-registered primaries only in
    its own sweeps, `protocol`), earlier ones by paired t-tests with Holm's adjustment; the sensitivity to the
    baseline's rate, then the learning rates run and chosen and the runs still improving at the end of
    their budget, and the warnings (these `warnings` first: a report's incomplete groups, say). Returns the
    summary as aligned text for the console: '' for one seed, where the run table says it all. `network`
    (network_line()) opens the Markdown."""
    budget = budget_rows(results)
    grid = any(not r.selected for r in results)
    closing = ("## Learning rates and epoch budget\n\n" + (f"Rate selection: {SELECTIONS[select]}.\n\n" if grid else "")
               + f"{markdown(BUDGET_HEADER, budget)}\n")
    if [*warnings, *fragile(results)]:
        closing += "\n## Warnings\n\n" + "".join(f"- {warning}\n" for warning in [*warnings, *fragile(results)])
    if all(len(by_seed) < 2 for by_seed in group_by_arm(results).values()):
        replace_text(path, f"# Test results\n\n{network}{markdown(*run_rows(results))}\n\n{closing}")
        return ""
    arms, differences = summarize(results, augmented, protocol)
    fewest = min(int(row[3]) for row in arms)
    caution = (f"Intervals from {fewest} seeds are wide (t(0.975) is {t_975(fewest - 1):.3f} with {fewest} seeds, "
               f"{t_975(4):.3f} with 5); they are cut to what the metric can reach.\n\n" if fewest in (2, 3) else "")
    sensitivity = sensitivity_table(results)
    sensitive = ("## Sensitivity to the baseline's rate\n\nEach pretrained arm minus the baseline run at each of its "
                 "rates instead of the one validation chose, paired by seed; the last column picks the baseline's "
                 "rate on the test set, so it is a bound on how much a luckier choice could take away, not a "
                 f"result.\n\n{markdown(*sensitivity)}\n\n") if sensitivity else ""
    if select == "seed":  # each comparison once, in points: the paired-t table would repeat it
        compared, console = seed_comparisons(results, augmented, protocol)
        tables = [compared, "In percent: mean test accuracy.\n\n", markdown(*percent_table(results, differences=()))]
    else:
        reading = "the ones to state as findings where below 0.05."
        console = [aligned(DIFF_HEADER, differences)]
        tables = ["Paired by seed: both arms of a seed share the training subset and the head's initial weights. "
                  "p: the paired t-test of no difference in test accuracy; Holm p: adjusted by Holm's method over "
                  f"the {len(differences)} comparisons of this table, {reading}\n\n{markdown(DIFF_HEADER, differences)}"
                  "\n\nIn percent: mean test accuracy, and the paired difference in points with its 95% interval."
                  f"\n\n", markdown(*percent_table(results))]
    replace_text(path, f"# Test results over seeds\n\n{network}{markdown(ARM_HEADER, arms)}\n\n{caution}{''.join(tables)}"
                       f"\n\n{sensitive}{closing}")
    return "\n\n".join([aligned(ARM_HEADER, arms)] + [caution.strip()] * bool(caution) + [*filter(None, console)]
                         + [aligned(BUDGET_HEADER, budget)])


def seed_comparisons(results: list[RunResult], augmented: bool, protocol: bool) -> tuple[str, list[str]]:
    """The comparisons of a seed-selected sweep as results/PROTOCOL.md tests them (preregistered()), as
    Markdown and as the console's lines: pre-registered in its own sweeps, its rules applied elsewhere."""
    header, rows, power = preregistered(results, augmented, protocol)
    if protocol:
        none = no_primaries(sizes_run(group_by_arm(results)), augmented)
        title = "The pre-registered comparisons (results/PROTOCOL.md)"
        rules = (f"{none} has no primaries: every row is exploratory, intervals and no claims." if none else
                 "The primaries: Wilcoxon's signed-rank test, Holm's adjustment over the primaries alone, and a "
                 f"difference within ±{EQUIVALENCE_MARGIN:g} points shown by two one-sided tests at 5%. The "
                 "other rows are exploratory: intervals, no claims.")
    else:
        title = "The comparisons, each seed at its own rate"
        rules = ("No comparison was named before these runs, so none is primary: Wilcoxon's signed-rank test with "
                 f"Holm's adjustment over all {len(rows)} comparisons, and a difference within "
                 f"±{EQUIVALENCE_MARGIN:g} points shown by two one-sided tests at 5%.")
    text = (f"## {title}\n\nEach pretrained arm minus {baseline_arm()} in test accuracy points, paired by seed, "
            f"each seed at the rate its own validation loss chose. {' '.join(filter(None, [rules, power]))}\n\n"
            f"{markdown(header, rows)}\n\n## Collapsed and still-improving runs, at every rate\n\n"
            f"{markdown(*collapses(results))}\n\n")
    return text, [f"{aligned(header, rows)}\n{power}", collapsed_lines(results)]


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


def change_table(sweeps: dict[str, list[RunResult]]) -> tuple[list[str], list[list[str]]] | None:
    """How each pretrained arm's lead over the baseline changes from one sweep to a later one of --report
    LABEL=CSV ..., paired by the seeds they share: (arm − baseline) in the later minus (arm − baseline) in the
    earlier, in points with its 95% interval and paired-t p-value. None where no two sweeps share two seeds."""
    base = baseline_arm()
    groups = {label: group_by_arm(results) for label, results in sweeps.items()}

    def lead(by_arm: dict, target: str, n_train: int, mode: str) -> dict[int, float]:
        arm, baseline = by_arm.get((target, n_train, mode), {}), by_arm.get((target, n_train, base), {})
        return {seed: arm[seed].test_acc - baseline[seed].test_acc for seed in arm.keys() & baseline.keys()}

    rows = []
    labels = list(groups)
    for i, earlier in enumerate(labels):
        for later in labels[i + 1:]:
            for target, n_train, mode in sorted(groups[earlier].keys() & groups[later].keys(), key=lambda key: (
                    key[0], key[1], list(ARMS).index(key[2]))):
                if not ARMS[mode].pretrained:
                    continue
                before, after = (lead(groups[label], target, n_train, mode) for label in (earlier, later))
                seeds = sorted(before.keys() & after.keys())
                if len(seeds) > 1:
                    change = MeanCI.of([after[s] - before[s] for s in seeds], (-2.0, 2.0))
                    rows.append([target, str(n_train), f"{mode} − {base}", f"{later} − {earlier}", str(len(seeds)),
                                 points(change), p_text(change.p)])
    return (["target", "n_train", "difference", "change", "seeds", "change in points", "p (paired t)"], rows) \
        if rows else None
