"""`python -m sweeps`: a sweep from its command line to its outputs (CSV, settings, summary,
figure, TensorBoard), --resume, and --report of earlier sweeps (LABEL=CSV side by side).
Imported by __main__ (and a user's script that registers targets); imports the package."""

import argparse
import contextlib
import functools
import logging
import signal
import sys
import tempfile
from pathlib import Path

import torch

import transfer_mnist as tm
from sweeps.engine import run_experiment
from sweeps.figures import draw_comparison, draw_figure, log_figure, save_figure
from sweeps.files import SweepLock, SweepLocked
from sweeps.resume import (
    RESUME_COMMAND, NodeRecords, borrowed_backbones, check_made_by, differences, made_by,
    record_backbone, record_widened, resume_hint, resume_settings, save_settings, saved_settings,
    settings_path)
from sweeps.runs import (
    ResultsCsv, pretrain_checkpoint, pretraining_runs, read_results, sweep_runs, widened_runs)
from sweeps.selection import settle
from sweeps.settings import (
    PRETRAINING_SETTINGS, PRIMARY_ARM, ExperimentFailure, check_weights, complete, one_line,
    parse, protocol_sweep, quiet_libraries, run_threads)
from sweeps.start import check_inputs, prepare_outputs, remove, remove_unfinished, warn_if_busy
from sweeps.stop import StopSignal
from sweeps.summary import (
    SELECTIONS, format_table, fragile, log_learning_curves, network_line, write_comparison,
    write_summary)
from sweeps.tables import baseline_arm, no_primaries, primary_sizes


def main(argv=None):
    """A sweep or a report; its exit status: 0, 1 (a failure), 2 (bad input), 128 + signal."""
    with contextlib.ExitStack() as stack:
        for signum in (signal.SIGINT, signal.SIGTERM):
            stack.callback(signal.signal, signum, signal.getsignal(signum))
        StopSignal.received = None
        StopSignal.install()
        try:
            cfg, given = parse(argv)
            logging.basicConfig(level=logging.INFO, format="%(message)s")
            quiet_libraries()
            return report(cfg, given) if cfg.report else sweep(cfg, given, stack)
        except (tm.ExperimentError, SweepLocked) as err:
            return error(err)
        except KeyboardInterrupt:  # before the first run, or in a report: nothing half-made
            print("\nInterrupted: nothing was written", file=sys.stderr)
            return 128 + (StopSignal.received or signal.SIGINT)


def error(message, status=2):
    """`message` as the console's error line; returns the exit status."""
    print(f"error: {message}", file=sys.stderr)
    return status


def sweep(cfg, given, stack):
    """A sweep or a resumed sweep, from its checks to its outputs."""
    if cfg.dry_run:  # a smoke test leaves no runs behind, nor replaces its results
        cfg.log_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="sweeps_dry_run_"))
        cfg.results_csv = cfg.results_csv and str(Path(cfg.log_dir, Path(cfg.results_csv).name))
    created = []  # files and folders this start made: removed if it fails
    try:
        cfg, resumed, borrowed, csv_out = begin(cfg, given, stack, created)
    except (OSError, tm.ExperimentError, SweepLocked, KeyboardInterrupt) as err:
        remove(created)
        if isinstance(err, OSError):
            return error(f"cannot write {err.filename or 'the results'} ({one_line(err)})")
        raise
    announce(cfg)
    try:
        return run(cfg, csv_out, resumed, borrowed)
    except (OSError, tm.ExperimentError, ExperimentFailure, KeyboardInterrupt) as err:
        with StopSignal.deferred(then_stop=False):  # a second Ctrl-C leaves it be
            kept = remove_unfinished(cfg, csv_out, resumed, created)
        if isinstance(err, KeyboardInterrupt):
            print(f"\nInterrupted: every finished run is in {csv_out.path} (logs: {cfg.log_dir}"
                  f", {cfg.version}). To go on: {RESUME_COMMAND.format(csv_out.path)}" if kept else
                  "\nInterrupted before any run finished: nothing was kept", file=sys.stderr)
            return 128 + (StopSignal.received or signal.SIGINT)
        if isinstance(err, tm.ExperimentError):
            raise
        hint = resume_hint(csv_out.path) if kept else "no run had finished"
        return error(f"{one_line(err)}; {hint}", 1)  # a full disk, a killed worker: rows stay


def begin(cfg, given, stack, created):
    """The checks and outputs before the first run. Returns the settings (--resume: the
    sweep's), what the run resumes, the backbones it borrows (--backbones-from), its CSV."""
    resumed = None
    if cfg.resume:
        if cfg.dry_run:
            raise tm.ExperimentError(
                "--resume continues a real sweep; it does not go with --dry-run")
        lock = SweepLock(cfg.resume)  # before its rows are read: nobody else writes them
        lock.acquire()
        stack.callback(lock.release)
        cfg, resumed = resume_settings(cfg, given)
    check_weights(cfg, given)
    as_given = argparse.Namespace(**vars(cfg))  # before image folders become target names
    accelerator = check_inputs(cfg, created)
    made = made_by(run_threads(cfg) or torch.get_num_threads(), accelerator)
    if resumed:
        check_made_by(resumed, made, cfg.resume)
    seeds = {run.seed for run in pretraining_runs(cfg)}
    borrowed = None
    if cfg.backbones_from and not resumed:
        borrowed = borrowed_backbones(cfg, seeds, made["threads"])
    csv_out = prepare_outputs(cfg, created, stack)
    if not cfg.resume:  # resume: the settings beside the CSV
        created.append(settings_path(csv_out.path))
        checkpoints = {seed: pretrain_checkpoint(cfg, seed) for seed in seeds}
        as_given.version = cfg.version
        save_settings(as_given, csv_out.path, checkpoints, made)
    return cfg, resumed, borrowed, csv_out


def announce(cfg):
    """The start's lines: the settings, what the protocol compares, a busy machine."""
    unused = PRETRAINING_SETTINGS if cfg.weights else ()  # nothing is pretrained
    settings = ", ".join(f"{key}={value}" for key, value in vars(cfg).items() if key not in unused)
    tm.logger.info(f"Settings: {settings}")
    sizes = {target: set(cfg.n_train) for target in cfg.targets}
    none = no_primaries(sizes, cfg.augment)
    if cfg.protocol == "fair" and not protocol_sweep(vars(cfg)):
        tm.logger.info("Not a sweep of results/PROTOCOL.md: its rules apply, with no primary "
                       "comparison; Holm's adjustment runs over every comparison")
    elif cfg.protocol == "fair" and none:  # named before any run: the others are exploratory
        tm.logger.info(f"{none} has no primary comparison: every comparison is exploratory")
    elif cfg.protocol == "fair":
        at = max(primary_sizes(sizes, cfg.augment).values())
        tm.logger.info(f"Primary comparison: {PRIMARY_ARM} − {baseline_arm()} on each target "
                       f"at {at} labels; the others are exploratory")
    if not cfg.cluster:  # every worker's threads on this machine's cores
        warn_if_busy(run_threads(cfg) or torch.get_num_threads(), cfg.workers)


def run(cfg, csv_out, resumed, borrowed):
    """The runs, summary, figure and TensorBoard's extras, the console's table."""
    results = run_experiment(
        cfg, csv_out, resumed, borrowed=borrowed,
        on_pretrained=functools.partial(record_backbone, csv_out.path),
        on_node=NodeRecords(csv_out.path),
        on_widened=functools.partial(record_widened, csv_out.path, per_seed=cfg.select == "seed"))
    out = Path(csv_out.path)
    summary = write_summary(results, str(out.with_suffix(".md")), cfg.select,
                            augmented=cfg.augment, protocol=protocol_sweep(vars(cfg)),
                            network=network_line([vars(cfg)]))
    log_learning_curves(results, cfg)
    figure = draw_figure(results)
    save_figure(figure, out.with_suffix(".png"))
    log_figure(figure, cfg)
    show(results, summary)
    if cfg.dry_run:
        print("Dry run: every stage ran; its logs and results were in a temporary folder, "
              "now removed.")
    else:
        print(f"Results: {out}, {out.with_suffix('.md')} and {out.with_suffix('.png')}. "
              f"TensorBoard: tensorboard --logdir {cfg.log_dir}")
    return 0


def show(results, summary, warnings=()):
    """The run table, the summary over seeds if any, and where the answer is fragile."""
    print(f"\n{format_table(results)}\n")
    if summary:
        print(f"{summary}\n")
    for warning in [*warnings, *fragile(results)]:
        print(f"Warning: {warning}")


def report(cfg, given):
    """--report: table, summary, Markdown and figure from CSVs; LABEL=CSV: compare()."""
    labelled = ["=" in arg for arg in cfg.report]
    if any(labelled) and not all(labelled):
        raise tm.ExperimentError(
            "--report takes CSVs, or LABEL=CSV for each to compare sweeps; not both")
    try:
        if all(labelled):
            return compare(cfg, given)
        results, cfg.select, warnings, *rest = load_sweep(cfg.report, cfg, given)
        out = report_output(cfg, given)
        if cfg.results_csv:
            try:
                out.parent.mkdir(parents=True, exist_ok=True)
                ResultsCsv(cfg.results_csv).rewrite(results)
            except OSError as err:
                raise tm.ExperimentError(
                    f"--results-csv {out} cannot be written ({err.strerror or err})") from None
        summary = write_summary(results, str(out.with_suffix(".md")), cfg.select, warnings, *rest)
        save_figure(draw_figure(results), out.with_suffix(".png"))
    except OSError as err:
        return error(one_line(err), 1)
    show(results, summary, warnings)
    print(f"Rebuilt from {', '.join(cfg.report)}: {out.with_suffix('.md')} and "
          f"{out.with_suffix('.png')}")
    return 0


def report_output(cfg, given):
    """Where --report writes: --results-csv, else beside the first CSV; a merge or another
    selection than the sweep's under a name that says so (X.merged.md, X.pooled.md)."""
    if cfg.results_csv:
        return Path(cfg.results_csv)
    first = Path(cfg.report[0])
    own_select = saved_settings(first).get("config", {}).get("select", "seed")
    parts = ["merged"] * (len(cfg.report) > 1)
    if "select" in given and cfg.select != own_select:
        parts.append(cfg.select)
    return first.with_name(".".join([first.stem, *parts, "csv"])) if parts else first


def compare(cfg, given):
    """--report LABEL=CSV ...: the sweeps side by side (.md, .png), each one's summary too."""
    paths = {}
    for arg in cfg.report:
        label, _, path = arg.partition("=")
        paths.setdefault(label, []).append(path)
    out = Path(cfg.results_csv or Path(next(iter(paths.values()))[0]).with_name("comparison.csv"))
    out.parent.mkdir(parents=True, exist_ok=True)
    sweeps = {}
    for label, csvs in paths.items():
        sweeps[label], select, warnings, *rest = load_sweep(csvs, cfg, given)
        for warning in warnings:
            print(f"Warning: {label}: {warning}")
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in label)
        name = out.with_name(f"{out.stem}.{safe}.md")
        write_summary(sweeps[label], str(name), select, warnings, *rest)
        save_figure(draw_figure(sweeps[label]), name.with_suffix(".png"))
    side_by_side = write_comparison(sweeps, paths, out.with_suffix(".md"))
    save_figure(draw_comparison(sweeps), out.with_suffix(".png"))
    print(f"\n{side_by_side}\n\nCompared: {out.with_suffix('.md')} and "
          f"{out.with_suffix('.png')}, and each sweep's summary beside them")
    return 0


def load_sweep(paths, cfg, given):
    """Results CSVs' rows merged, selected by --select (else the first sweep's), in the
    groups complete as planned. Returns the rows, and write_summary()'s arguments after its
    path: the selection, the warnings (incomplete, no settings, machines), whether augmented
    (no primaries then), whether a sweep of results/PROTOCOL.md, and the network's line."""
    saved = {path: saved_settings(path) for path in paths}
    configs = [settings.get("config", {}) for settings in saved.values()]
    chosen = [config["select"] for config in configs if "select" in config]
    select = cfg.select if "select" in given or not chosen else chosen[0]
    planned = []
    for settings in saved.values():  # a sweep whose settings cannot be read plans nothing
        with contextlib.suppress(KeyError, TypeError, AttributeError, ValueError):
            config = settings["config"]
            targets = [name if name in tm.TARGETS else Path(name).name
                       for name in config["targets"]]
            config = complete(argparse.Namespace(**{**config, "targets": targets}))
            planned += sweep_runs(config)
            planned += widened_runs(config, map(tuple, settings.get("widened", [])))
    results, incomplete = settle(read_results(paths), select, planned)
    warnings = [f"{path} has no settings beside it ({settings_path(path).name}): its planned "
                f"seeds, sizes and rates are taken from its rows, and {SELECTIONS[select]}"
                for path, settings in saved.items() if "config" not in settings]
    return (results, select, incomplete + warnings + machines_differ(saved),
            any(config.get("augment") for config in configs),
            all(map(protocol_sweep, configs)), network_line(filter(None, configs)))


def machines_differ(saved):
    """Warnings where merged sweeps, or a cluster's nodes, differ in code, libraries or CPU."""
    sweeps = {path: settings["made_by"] for path, settings in saved.items()
              if isinstance(settings.get("made_by"), dict)}
    nodes = {f"{path} node {address}": record for path, settings in saved.items()
             for address, record in settings.get("nodes", {}).items()}
    warnings = []
    for what, records in (("merged sweeps", sweeps), ("nodes that made the rows", nodes)):
        if len(records) < 2:
            continue
        first, *others = records.values()
        differ = sorted({key for other in others for key in differences(first, other)})
        if differ:
            warnings.append(f"the {what} were not made alike: {', '.join(differ)} differ "
                            f"between {', '.join(records)}; their rows may not be comparable")
    return warnings
