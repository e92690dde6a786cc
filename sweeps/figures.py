"""Figures: test accuracy against the number of labelled images (a sweep),
and the paired differences of several sweeps side by side, as PNG and in
TensorBoard's IMAGES tab. Imported by cli only; it imports files and
tables; matplotlib only when a figure is drawn (not pyplot: no global
state, no window; PNG through Agg).
"""

import lightning
import pandas as pd

from sweeps.files import replace
from sweeps.tables import (
    ACCURACY_RANGE, ARMS, KEY, MeanCI, arm_runs, baseline_arm, comparisons, pretrained_arms)


def curve_points(results):
    """Per target and arm, test accuracy over seeds at each n_train: the
    summary's selected runs and MeanCI."""
    arms = arm_runs(results)
    arms = arms.assign(order=arms["mode"].map(list(ARMS).index))
    arms = arms.sort_values(["n_train", "order"], kind="stable")
    points = {}
    for (target, mode, n_train), runs in arms.groupby(["target", "mode", "n_train"], sort=False):
        ci = MeanCI.of(runs.test_acc.tolist(), ACCURACY_RANGE)
        points.setdefault(target, {}).setdefault(mode, []).append((int(n_train), ci))
    return points


def leads(results):
    """Each pretrained arm minus the baseline in test accuracy, by KEY."""
    return comparisons(arm_runs(results)).set_index(KEY).acc.to_dict()


def draw_figure(results):
    """Test accuracy against n_train, one panel per target: each arm's
    mean over seeds with its 95% interval as a band; with one n_train, the
    arms side by side with error bars. One seed has no interval: points
    only. Below, where there is a baseline, the answer: each pretrained
    arm minus the baseline, paired by seed, with its 95% interval."""
    from matplotlib.figure import Figure

    points = curve_points(results)
    if not points:  # an interrupted sweep with no complete group yet
        figure = Figure(figsize=(4.8, 2), layout="constrained")
        figure.text(0.5, 0.5, "no complete (target, arm, n_train) yet: --resume completes it",
                    ha="center")
        return figure
    paired = leads(results)
    # an arm without a complete baseline to pair with has no difference
    differences = {target: {mode: [(n, paired[target, n, mode]) for n, _ in curve
                                   if (target, n, mode) in paired]
                            for mode, curve in arms.items()} for target, arms in points.items()}
    differences = {target: {mode: curve for mode, curve in by_mode.items() if curve}
                   for target, by_mode in differences.items()}
    below = any(ci.n > 1 for by_mode in differences.values() for curve in by_mode.values()
                for _, ci in curve)
    figure = Figure(figsize=(4.8 * len(points), 7.6 if below else 4), layout="constrained")
    axes = figure.subplots(1 + below, len(points), squeeze=False)
    for ax, (target, arms) in zip(axes[0], points.items()):
        draw_accuracy(ax, target, arms)
    for ax, (target, by_mode) in zip(axes[1] if below else [], differences.items()):
        draw_differences(ax, target, by_mode)
    seeds = max(ci.n for arms in points.values() for curve in arms.values() for _, ci in curve)
    figure.suptitle("1 seed, no interval" if seeds == 1 else
                    f"Mean over {seeds} seeds, 95% interval")
    return figure


def draw_accuracy(ax, target, arms):
    """A target's panel: each arm's mean test accuracy over seeds against
    n_train, its 95% interval as a band (error bars at one size)."""
    sizes = sorted({n for curve in arms.values() for n, _ in curve})
    for position, (mode, curve) in enumerate(arms.items()):
        x = [n for n, _ in curve] if len(sizes) > 1 else [position]
        mean, low, high = ([100 * getattr(ci, field) for _, ci in curve]
                           for field in ("mean", "low", "high"))
        (line,) = ax.plot(x, mean, marker="o", linestyle="-" if len(sizes) > 1 else "none",
                          label=mode, color=f"C{list(ARMS).index(mode)}")
        if all(ci.n > 1 for _, ci in curve) and len(sizes) > 1:
            ax.fill_between(x, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
        elif all(ci.n > 1 for _, ci in curve):
            ax.errorbar(x, mean, yerr=[[mean[0] - low[0]], [high[0] - mean[0]]], fmt="none",
                        ecolor=line.get_color(), capsize=4)
    size_axis(ax, sizes, list(arms))
    ax.set(title=target, ylabel="test accuracy (%)")


def error_bars(ax, x, cis, **style):
    """Differences in points, each with its 95% interval (none for one seed)."""
    mean = [100 * ci.mean for ci in cis]
    spread = [[100 * (ci.mean - ci.low) if ci.n > 1 else 0 for ci in cis],
              [100 * (ci.high - ci.mean) if ci.n > 1 else 0 for ci in cis]]
    ax.errorbar(x, mean, yerr=spread, fmt="o", capsize=3, **style)


def draw_differences(ax, target, by_mode):
    """A target's lower panel: each pretrained arm minus the baseline,
    paired by seed, with its 95% interval."""
    if not by_mode:
        ax.set_axis_off()
        ax.text(0.5, 0.5, f"{target}: no complete {baseline_arm()} to pair with", ha="center",
                transform=ax.transAxes)
        return
    sizes = sorted({n for curve in by_mode.values() for n, _ in curve})
    for position, (mode, curve) in enumerate(by_mode.items()):
        shift = 0.04 * (position - (len(by_mode) - 1) / 2)  # the arms side by side at each size
        x = [n * 10 ** shift for n, _ in curve] if len(sizes) > 1 else [position]
        error_bars(ax, x, [ci for _, ci in curve], label=mode,
                   color=f"C{list(ARMS).index(mode)}")
    ax.axhline(0, color="grey", linewidth=0.8)
    size_axis(ax, sizes, list(by_mode))
    # a longer title overran the figure
    ax.set(title=f"{target}: minus {baseline_arm()}", ylabel="paired difference (points)")


def size_axis(ax, sizes, modes):
    """n_train along x on a log scale, with a legend; with one n_train,
    the arms side by side."""
    if len(sizes) > 1:
        ax.set_xscale("log")
        ax.set_xticks(sizes, [str(n) for n in sizes])
        ax.minorticks_off()
        ax.set_xlabel("labelled training images")
        ax.grid(alpha=0.3)
        ax.legend()
    else:
        arms_axis(ax, modes)
        ax.set_xlabel(f"{sizes[0]} labelled training images")


def arms_axis(ax, modes):
    """The arms side by side along x, none on the frame."""
    ax.set_xticks(range(len(modes)), modes)
    ax.set_xlim(-0.5, len(modes) - 0.5)
    ax.grid(alpha=0.3)


def save_figure(figure, path):
    """The figure as a PNG, in one step (files.replace)."""
    replace(path, lambda partial: figure.savefig(partial, format="png"))


def log_figure(figure, cfg):
    """The figure in TensorBoard's IMAGES tab, as the run figure/<version>."""
    tb_logger = lightning.pytorch.loggers.TensorBoardLogger(
        cfg.log_dir, name="figure", version=cfg.version, default_hp_metric=False)
    tb_logger.experiment.add_figure("test_accuracy", figure, close=False)
    tb_logger.finalize("success")


def draw_comparison(sweeps):
    """comparison_table() as a figure: one panel per target and n_train,
    the pretrained arms along x, each sweep's paired difference with the
    baseline as a point with its 95% interval, a colour per sweep."""
    from matplotlib.figure import Figure

    every = pd.concat([arm_runs(results) for results in sweeps.values()])
    targets, sizes = sorted(set(every.target)), sorted(set(every.n_train))
    modes = [mode for mode in pretrained_arms() if mode in set(every["mode"])]
    paired = {label: leads(results) for label, results in sweeps.items()}
    figure = Figure(figsize=(max(6.4, 4.8 * len(targets)), 4 * len(sizes)), layout="constrained")
    axes = figure.subplots(len(sizes), len(targets), squeeze=False)
    for ax, (n_train, target) in zip(axes.flat, [(n, t) for n in sizes for t in targets]):
        for i, (label, lead) in enumerate(paired.items()):
            found = [(x, lead[target, n_train, mode]) for x, mode in enumerate(modes)
                     if (target, n_train, mode) in lead]
            if found:  # the sweeps side by side
                x = [x + 0.12 * (i - (len(paired) - 1) / 2) for x, _ in found]
                error_bars(ax, x, [ci for _, ci in found], label=label, color=f"C{i}")
        ax.axhline(0, color="grey", linewidth=0.8)
        arms_axis(ax, modes)
        ax.set(title=f"{target}, {n_train} labelled images",
               ylabel=f"test accuracy − {baseline_arm()} (points)")
        ax.legend()
    figure.suptitle(f"Paired difference with {baseline_arm()}: mean over seeds, 95% interval")
    return figure
