"""Before a sweep's first run: its targets registered (image folders
too), its devices, data, labels and sizes checked, the subsets
described, and its outputs (log folder, version, CSV) made, so that bad
input fails in one line before any training and leaves nothing behind;
after a stopped sweep, what did not finish removed. Imported by cli; it
imports settings, runs, data, files, folders and the template."""

import argparse
import contextlib
import os
import shutil
import tempfile
from pathlib import Path

import lightning
import torch

import transfer_mnist as tm
from sweeps.data import (available_images, draw_subset, file_positions, n_images,
                         pretraining_images, same_files, subset_draw)
from sweeps.files import SweepLock
from sweeps.folders import folder_of, folder_shape, register_image_folder
from sweeps.runs import (ResultsCsv, pretraining_runs, read_results, read_weights, run_folder,
                         run_key, sweep_runs)
from sweeps.settings import backbone_seed, seeds

logger = tm.logger  # the experiment's console, as the template's


def datasets_read(cfg: argparse.Namespace) -> tuple[str, ...]:
    """The targets, and the source unless --weights (then nothing is
    pretrained)."""
    return cfg.targets if cfg.weights else (cfg.source, *cfg.targets)


def resolve_targets(cfg: argparse.Namespace) -> tm.View:
    """Replace image folders in --source and --targets by the names they
    are registered under: a source folder at its first image's channels
    and size, target folders as the backbone takes them (a torchvision
    model's RGB at --image-size, lenet's the source's channels and size).
    Returns the backbone's view of images."""
    folders = {}
    if cfg.source not in tm.TARGETS and not cfg.weights:
        folders[cfg.source] = register_image_folder(cfg.source, *folder_shape(cfg.source))
    source = folders.get(cfg.source, cfg.source)
    if not cfg.weights:  # lenet reads its channels and size there
        read_checked(cfg, source, True)
    network = tm.resolve_network(argparse.Namespace(**{**vars(cfg), "source": source}))
    for arg in cfg.targets:
        if arg not in tm.TARGETS and arg not in folders:
            folders[arg] = register_image_folder(arg, network.channels, network.size)
    if len(set(folders.values())) < len(folders):
        raise tm.ExperimentError(f"two image folders share a name ({', '.join(folders)}); "
                                 "rename one")
    cfg.source = source
    cfg.targets = tuple(folders.get(arg, arg) for arg in cfg.targets)
    return network


def read_checked(cfg: argparse.Namespace, name: str, train: bool):
    """tm.read_split(), where it fails on torchvision's raw files with
    the file named: damaged, or missing."""
    try:
        return tm.read_split(name, cfg.data_dir, train)
    except tm.ExperimentError as err:
        dataset = tm.TARGETS[name].dataset
        failure = err.__context__  # what torchvision raised, if it did
        if not hasattr(dataset, "resources") or failure is None:
            raise
        files = [Path(file).stem for file, _ in dataset.resources]
        raw = Path(cfg.data_dir, dataset.__name__, "raw")
        if all((raw / file).is_file() for file in files):
            split = [file for file in files if file.startswith(("t10k", "train")[train])]
            raise tm.ExperimentError(f"{' or '.join(split)} in {raw} is damaged (truncated or "
                                     "corrupt); delete it to download it again") from None
        said = str(failure).strip()
        reason = said.splitlines()[-1] if said else type(failure).__name__
        raise tm.ExperimentError(f"{dataset.__name__} is not in {raw} and could not be "
                                 f"downloaded ({reason}); put {', '.join(files)} there, or "
                                 "pass the --data-dir that holds it") from None


def check_data(cfg: argparse.Namespace) -> None:
    """Fail before pretraining, not half an hour later, when a dataset is
    missing or damaged or --n-pretrain does not fit (describe_subsets()
    draws the targets' subsets)."""
    for name in dict.fromkeys(datasets_read(cfg)):
        for train in (True, False):
            read_checked(cfg, name, train)
    if not cfg.weights:
        images = torch.arange(n_images(cfg.source, cfg.data_dir))
        where = folder_of(tm.TARGETS[cfg.source]) or cfg.source
        draw_subset(cfg.source, cfg.n_pretrain, images, cfg.seed, where, "--n-pretrain")


def span(values: torch.Tensor) -> str:
    """min-max, or the one value."""
    low, high = int(values.min()), int(values.max())
    return f"{low}" if low == high else f"{low}-{high}"


def drawn(cfg: argparse.Namespace, name: str, n_train: int) -> tuple[torch.Tensor, ...]:
    """Over the seeds, for target `name` at n_train (each draw made, so
    that a size that does not fit fails here): the training and the
    validation images per class (seeds x 2 x classes), how many of each
    pretraining saw (seeds x 2), and the number of validation images."""
    labels = tm.read_split(name, cfg.data_dir, True)[1]
    positions = file_positions(name, cfg.data_dir)
    n_classes = len(tm.TARGETS[name].label_names)
    counts, seen = [], []
    for seed in seeds(cfg):
        available, where = available_images(cfg, name, backbone_seed(cfg, seed))
        where = folder_of(tm.TARGETS[name]) or where
        subsets = subset_draw(cfg, name)(name, n_train, available, seed, where)
        pretrained_on = torch.empty(0, dtype=torch.long)
        if same_files(cfg, name):
            pretrained_on = pretraining_images(cfg, backbone_seed(cfg, seed))
        counts.append([torch.bincount(labels[idx], minlength=n_classes) for idx in subsets])
        seen.append([int(torch.isin(positions[idx], pretrained_on).sum()) for idx in subsets])
    return torch.stack([torch.stack(c) for c in counts]), torch.tensor(seen), len(subsets[1])


def describe_subsets(cfg: argparse.Namespace) -> tuple[list[str], list[str]]:
    """Per target and n_train, over the seeds: training and validation
    images per class, and how many of them pretraining saw (the backbone
    of that seed, on the same files); and warnings where a class has
    fewer than two validation images in some seed: its validation loss,
    which picks the epoch and the rate, rests on one image of that class
    or none."""
    lines, warnings, seed_range = [], [], seeds(cfg)
    seeds_used = f", seeds {seed_range[0]}-{seed_range[-1]}" if len(seed_range) > 1 else ""
    for name, n_train in ((name, n) for name in cfg.targets for n in cfg.n_train):
        counts, seen, n_val = drawn(cfg, name, n_train)
        labels = tm.TARGETS[name].label_names
        if same_files(cfg, name):
            overlap = (f"pretraining saw {span(seen[:, 0])} of the training and "
                       f"{span(seen[:, 1])} of the validation images"
                       + ("" if cfg.disjoint else " (--disjoint keeps them apart)"))
        else:
            overlap = ("nothing was pretrained here" if cfg.weights
                       else f"pretraining ({cfg.source}) saw none of them")
        per_class = ", ".join(f"{label} {span(counts[:, 0, k])} + {span(counts[:, 1, k])}"
                              for k, label in enumerate(labels))
        lines.append(f"{name}: {n_train} training + {n_val} validation images a run{seeds_used}; "
                     f"per class {per_class}; {overlap}")
        few = [label for k, label in enumerate(labels) if counts[:, 1, k].min() < 2]
        if few:
            warnings.append(
                f"Warning: {name} at n_train {n_train}: {len(few)} of {len(labels)} classes have "
                f"fewer than 2 validation images in some seed ({', '.join(few[:4])}"
                f"{', ...' if len(few) > 4 else ''}); the validation loss that picks each run's "
                "epoch and rate is noisy: give more with --n-val"
                + ("" if cfg.stratify else " or --stratify"))
    return lines, warnings


def warn_if_busy(threads: int, workers: int) -> None:
    """Beside other busy processes, torch's threads wait on each other
    and runs take many times as long: say so at the start, and what to
    lower."""
    loadavg = Path("/proc/loadavg")
    running = loadavg.read_text().split()[3] if loadavg.exists() else "1/1"
    busy = int(running.split("/")[0]) - 1  # the tasks running now, but this one
    cores = os.cpu_count() or 1
    if cores - busy < threads * workers:
        lower = [flag for flag, value in (("--threads", threads), ("--workers", workers))
                 if value > 1]
        logger.warning(f"Warning: other running processes ({busy}) leave {max(cores - busy, 0)} "
                       f"of {cores} cores free for {workers} worker{'s' * (workers > 1)} of "
                       f"{threads} torch thread{'s' * (threads > 1)}: runs may be many times "
                       f"slower" + (f"; lower {' or '.join(lower)}" if lower else ""))


def check_devices(cfg: argparse.Namespace) -> str:
    """The experiment runs on one device: say so before any training if
    --accelerator/--devices disagree. Returns the accelerator that
    Lightning resolves --accelerator to (cpu, cuda, mps, ...)."""
    try:
        trainer = lightning.Trainer(
            accelerator=cfg.accelerator, devices=cfg.devices, logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    except Exception as err:  # Lightning raises several kinds for an unknown or unavailable one
        raise tm.ExperimentError(f"--accelerator {cfg.accelerator} --devices {cfg.devices}: "
                                 f"{str(err).strip().splitlines()[0]}") from None
    if trainer.world_size > 1:
        raise tm.ExperimentError("this experiment runs on one device; pass --devices 1")
    return type(trainer.accelerator).__name__.removesuffix("Accelerator").lower()


def check_inputs(cfg: argparse.Namespace, created: list[Path]) -> str:
    """Everything that can be checked before training: targets, devices,
    the data, its labels and sizes. Data folders that a failed download
    leaves are added to `created`. Returns the resolved accelerator."""
    for name in datasets_read(cfg):  # before anything is read
        if name in tm.TARGETS and folder_of(tm.TARGETS[name]) is None:
            created += topmost_missing(Path(cfg.data_dir, tm.TARGETS[name].dataset.__name__, "raw"))
    network = resolve_targets(cfg)
    # a backbone without a classifier to cut, too small an --image-size,
    # weights that do not fit or cannot be had: each fails here
    tm.LitModule(["?"], 1.0, network.shape, backbone=cfg.backbone)
    if cfg.weights:
        read_weights(cfg.backbone, cfg.weights, network.channels)
    if cfg.backbone_per_seed and cfg.pretrain_seed is not None:
        raise tm.ExperimentError("--backbone-per-seed pretrains each seed's backbone with that "
                                 "seed; drop --pretrain-seed")
    accelerator = check_devices(cfg)
    check_data(cfg)
    lines, warnings = describe_subsets(cfg)
    for name in dict.fromkeys(datasets_read(cfg)):
        target = tm.TARGETS[name]
        logger.info(f"{name}: {folder_of(target) or target.dataset.__name__}, "
                    f"{len(target.label_names)} classes ({', '.join(target.label_names)})")
    for name in cfg.targets:  # what the model sees, once per target
        logger.info(tm.describe(name, tm.input_view(network, name)))
    for line in lines:
        logger.info(line)
    for warning in warnings:
        logger.warning(warning)
    return accelerator


def topmost_missing(path: Path) -> list[Path]:
    """The topmost of path and its parents that does not exist yet, if
    any: what removes all that mkdir -p makes there."""
    return [p for p in (path, *path.parents) if not p.exists()][-1:]


def prepare_outputs(cfg: argparse.Namespace, created: list[Path],
                    stack: contextlib.ExitStack) -> ResultsCsv:
    """Create the log folder (cleared with --overwrite) and the results
    CSV now, so that a path that cannot be written fails before any
    training; set the version that this invocation's runs share. A new
    sweep locks its CSV first (until `stack` closes): another invocation
    may be writing that file. A resumed sweep appends to its CSV (locked
    already), and keeps its version where it keeps its log folder."""
    log_dir = Path(cfg.log_dir)
    if log_dir.exists() and not log_dir.is_dir():
        raise tm.ExperimentError(f"--log-dir {log_dir} is a file, not a folder")
    if cfg.overwrite and log_dir.is_dir() and not cfg.dry_run:
        clear_log_dir(log_dir)
    try:
        created += topmost_missing(log_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=log_dir).close()
    except OSError as err:
        raise tm.ExperimentError(f"--log-dir {log_dir} cannot be created or written "
                                 f"({err.strerror or err})") from None
    if not (cfg.resume and cfg.version):
        numbers = (p.name.removeprefix("version_") for p in log_dir.glob("**/version_*"))
        cfg.version = f"version_{max(map(int, filter(str.isdigit, numbers)), default=-1) + 1}"
    csv_path = Path(cfg.results_csv or log_dir / f"results_{cfg.version}.csv")
    if csv_path.is_dir():
        raise tm.ExperimentError(f"--results-csv {csv_path} is a folder, not a file")
    try:
        created += topmost_missing(csv_path)
        csv_path.parent.mkdir(parents=True, exist_ok=True)
        if not cfg.resume:
            lock = SweepLock(csv_path)
            lock.acquire()
            stack.callback(lock.release)
            rows = csv_path.read_bytes().splitlines() if csv_path.is_file() else []
            if len(rows) > 1 and not cfg.overwrite:
                raise tm.ExperimentError(
                    f"--results-csv {csv_path} holds the rows of an earlier sweep: continue it "
                    f"with --resume {csv_path}, or pass --overwrite to replace them")
        return ResultsCsv(str(csv_path), append=bool(cfg.resume))
    except OSError as err:
        raise tm.ExperimentError(f"--results-csv {csv_path} cannot be written "
                                 f"({err.strerror or err})") from None


def clear_log_dir(log_dir: Path) -> None:
    """--overwrite: delete the log folder, unless it holds files that a
    sweep did not write."""
    ours = {"pretrain", "learning_curve", "figure", *tm.TARGETS}
    foreign = sorted(path.name for path in log_dir.iterdir()
                     if path.name not in ours and not path.name.startswith("results_"))
    if foreign:
        raise tm.ExperimentError(f"--overwrite would delete {log_dir}, which holds files a sweep "
                                 f"did not write ({', '.join(foreign[:3])}); choose another "
                                 "--log-dir")
    logger.info(f"--overwrite: removing {log_dir}")
    shutil.rmtree(log_dir)


def remove_unfinished(cfg: argparse.Namespace, csv_out: ResultsCsv, resumed,
                      created: list[Path]) -> bool:
    """After a sweep stopped: the log folders of its runs that did not
    finish removed (their checkpoints too), and, where no run finished in
    a new sweep, everything it made. Returns whether rows are kept."""
    try:
        finished = {run_key(r) for r in read_results([csv_out.path], "--resume")}
    except tm.ExperimentError:  # a header and no rows
        finished = set()
    if not finished and not resumed:
        remove(created)
    log_dir = Path(cfg.log_dir)
    # a grid's other rates are its pretraining's too
    pretrained = {run.seed for run in finished if run.mode == "pretrain"}
    for run in pretraining_runs(cfg) + sweep_runs(cfg):
        folder = Path(run_folder(cfg, run))
        kept = run in finished or (run.mode == "pretrain" and run.seed in pretrained)
        if kept or not folder.is_dir():
            continue
        shutil.rmtree(folder, ignore_errors=True)
        for parent in folder.parents:  # the folders that held only it
            if parent == log_dir or not parent.is_relative_to(log_dir) or not parent.is_dir() \
                    or any(parent.iterdir()):
                break
            parent.rmdir()
    return bool(finished or resumed)


def remove(paths: list[Path]) -> None:
    """What a failed start made, removed again."""
    for path in reversed(paths):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
