"""Figures: test accuracy against the number of labelled images (a sweep), and the paired
differences of several sweeps side by side, as PNG and in TensorBoard's IMAGES tab. Imported by
cli only; it imports summary and the template; matplotlib only when a figure is drawn."""

import argparse

import lightning

from sweeps.files import replace
from sweeps.runs import RunResult
from sweeps.summary import ARMS, MeanCI, accuracy_ci, baseline_arm, group_by_arm, paired


def curve_points(results: list[RunResult]) -> dict[str, dict[str, list[tuple[int, MeanCI]]]]:
    """The figure's numbers: per target and arm, test accuracy over seeds at each n_train, from the
    same selected runs and MeanCI as the summary."""
    points: dict[str, dict[str, list[tuple[int, MeanCI]]]] = {}
    for (target, n_train, mode), by_seed in sorted(
        group_by_arm(results).items(), key=lambda item: (item[0][1], list(ARMS).index(item[0][2]))
    ):
        points.setdefault(target, {}).setdefault(mode, []).append(
            (n_train, accuracy_ci(by_seed.values())))
    return points


def draw_figure(results: list[RunResult]):
    """Test accuracy against n_train, one panel per target: each arm's mean over seeds with its 95%
    interval as a band; with one n_train, the arms side by side with error bars. One seed has no
    interval: points only. Below, where there is a baseline, the answer: each pretrained arm
    minus the baseline, paired by seed, with its 95% interval."""
    from matplotlib.figure import (
        Figure,  # not pyplot: no global state, no window; PNG through Agg
    )

    points = curve_points(results)
    if not points:  # an interrupted sweep with no complete group yet: a figure that says so
        figure = Figure(figsize=(4.8, 2), layout="constrained")
        figure.text(
            0.5, 0.5, "no complete (target, arm, n_train) yet: --resume completes it", ha="center"
        )
        return figure
    groups = group_by_arm(results)
    differences = {
        target: {
            mode: [(n, d[0]) for n, _ in curve if (d := paired(groups, target, n, mode))]
            for mode, curve in arms.items()
            if ARMS[mode].pretrained
        }
        for target, arms in points.items()
    }
    # an arm without a complete baseline to pair with (a --report of an interrupted sweep) has
    # no difference
    differences = {target: {mode: curve for mode, curve in by_mode.items() if curve}
                   for target, by_mode in differences.items()}
    below = any(
        ci.n > 1
        for by_mode in differences.values()
        for curve in by_mode.values()
        for _, ci in curve
    )
    figure = Figure(figsize=(4.8 * len(points), 7.6 if below else 4), layout="constrained")
    axes = figure.subplots(1 + below, len(points), squeeze=False)
    for ax, (target, arms) in zip(axes[0], points.items()):
        draw_accuracy(ax, target, arms)
    for ax, (target, by_mode) in zip(axes[1] if below else [], differences.items()):
        draw_differences(ax, target, by_mode)
    seeds = max(ci.n for arms in points.values() for curve in arms.values() for _, ci in curve)
    figure.suptitle(
        "1 seed, no interval" if seeds == 1 else f"Mean over {seeds} seeds, 95% interval"
    )
    return figure


def draw_accuracy(ax, target: str, arms: dict) -> None:
    """A target's panel: each arm's mean test accuracy over seeds against
    n_train, its 95% interval as a band (error bars at one size)."""
    sizes = sorted({n for curve in arms.values() for n, _ in curve})
    for position, (mode, curve) in enumerate(arms.items()):
        x = [n for n, _ in curve] if len(sizes) > 1 else [position]
        mean, low, high = ([100 * getattr(ci, field) for _, ci in curve]
                           for field in ("mean", "low", "high"))
        # an arm's colour in both rows
        (line,) = ax.plot(x, mean, marker="o", linestyle="-" if len(sizes) > 1 else "none",
                          label=mode, color=f"C{list(ARMS).index(mode)}")
        if all(ci.n > 1 for _, ci in curve) and len(sizes) > 1:
            ax.fill_between(x, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
        elif all(ci.n > 1 for _, ci in curve):
            ax.errorbar(x, mean, yerr=[[mean[0] - low[0]], [high[0] - mean[0]]], fmt="none",
                        ecolor=line.get_color(), capsize=4)
    size_axis(ax, sizes, list(arms))
    ax.set(title=target, ylabel="test accuracy (%)")
    if len(sizes) > 1:
        ax.legend()


def draw_differences(ax, target: str, by_mode: dict) -> None:
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
        mean = [100 * ci.mean for _, ci in curve]
        spread = [[100 * (ci.mean - ci.low) if ci.n > 1 else 0 for _, ci in curve],
                  [100 * (ci.high - ci.mean) if ci.n > 1 else 0 for _, ci in curve]]
        ax.errorbar(x, mean, yerr=spread, fmt="o", capsize=3, label=mode,
                    color=f"C{list(ARMS).index(mode)}")
    ax.axhline(0, color="grey", linewidth=0.8)
    size_axis(ax, sizes, list(by_mode))
    # a longer title overran the figure
    ax.set(title=f"{target}: minus {baseline_arm()}", ylabel="paired difference (points)")
    if len(sizes) > 1:
        ax.legend()


def size_axis(ax, sizes: list[int], modes: list[str]) -> None:
    """n_train along x on a log scale; with one n_train, the arms side by side."""
    if len(sizes) > 1:
        ax.set_xscale("log")
        ax.set_xticks(sizes, [str(n) for n in sizes])
        ax.minorticks_off()
        ax.set_xlabel("labelled training images")
    else:
        ax.set_xticks(range(len(modes)), modes)
        ax.set_xlim(-0.5, len(modes) - 0.5)  # the arms side by side, none on the frame
        ax.set_xlabel(f"{sizes[0]} labelled training images")
    ax.grid(alpha=0.3)


def save_figure(figure, path) -> None:
    """The figure as a PNG, in one step (files.replace)."""
    replace(path, lambda partial: figure.savefig(partial, format="png"))


def log_figure(figure, cfg: argparse.Namespace) -> None:
    """The figure in TensorBoard's IMAGES tab, as the run figure/<version>."""
    tb_logger = lightning.pytorch.loggers.TensorBoardLogger(
        cfg.log_dir, name="figure", version=cfg.version, default_hp_metric=False
    )
    tb_logger.experiment.add_figure("test_accuracy", figure, close=False)
    tb_logger.finalize("success")


def draw_comparison(sweeps: dict[str, list[RunResult]]):
    """comparison_table() as a figure: one panel per target and n_train, the pretrained arms along
    x, each sweep's paired difference with the baseline as a point with its 95% interval."""
    from matplotlib.figure import Figure

    groups = {label: group_by_arm(results) for label, results in sweeps.items()}
    targets, sizes = (
        sorted({key[i] for by_arm in groups.values() for key in by_arm}) for i in (0, 1)
    )
    ran = {key[2] for by_arm in groups.values() for key in by_arm}
    modes = [mode for mode in ARMS if ARMS[mode].pretrained and mode in ran]
    figure = Figure(figsize=(max(6.4, 4.8 * len(targets)), 4 * len(sizes)), layout="constrained")
    axes = figure.subplots(len(sizes), len(targets), squeeze=False)
    # a row per n_train
    for ax, (n_train, target) in zip(axes.flat, [(n, t) for n in sizes for t in targets]):
        for i, (label, by_arm) in enumerate(groups.items()):
            found = [(x, d[0]) for x, mode in enumerate(modes) if (target, n_train, mode) in by_arm
                     and (d := paired(by_arm, target, n_train, mode))]
            if not found:
                continue
            # the sweeps side by side
            x = [x + 0.12 * (i - (len(groups) - 1) / 2) for x, _ in found]
            mean = [100 * ci.mean for _, ci in found]
            spread = [[100 * (ci.mean - ci.low) if ci.n > 1 else 0 for _, ci in found],
                      [100 * (ci.high - ci.mean) if ci.n > 1 else 0 for _, ci in found]]
            # a colour per sweep
            ax.errorbar(x, mean, yerr=spread, fmt="o", capsize=3, label=label, color=f"C{i}")
        ax.axhline(0, color="grey", linewidth=0.8)
        ax.set_xticks(range(len(modes)), modes)
        ax.set_xlim(-0.5, len(modes) - 0.5)
        ax.grid(alpha=0.3)
        ax.set(
            title=f"{target}, {n_train} labelled images",
            ylabel=f"test accuracy − {baseline_arm()} (points)",
        )
        ax.legend()
    figure.suptitle(f"Paired difference with {baseline_arm()}: mean over seeds, 95% interval")
    return figure
