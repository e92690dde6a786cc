"""Before a sweep's first run: its targets registered, its devices, data and sizes checked,
the subsets described, its outputs made, so that bad input fails in one line before any
training and leaves nothing behind; after a stopped sweep, what did not finish removed.
Imported by cli; it imports settings, runs, data, files, folders and the template."""

import itertools
import os
import shutil
import tempfile
from argparse import Namespace
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
from sweeps.settings import backbone_seed, one_line, seeds
from transfer_mnist import ExperimentError

logger = tm.logger  # the experiment's console, as the template's


def datasets_read(cfg):
    """The targets, and the source unless --weights (then nothing is pretrained)."""
    return cfg.targets if cfg.weights else (cfg.source, *cfg.targets)


def resolve_targets(cfg):
    """Image folders in --source and --targets registered and replaced by their names: the
    source at its first image's shape, targets as the backbone takes them. Returns its view."""
    folders = {}
    if cfg.source not in tm.TARGETS and not cfg.weights:
        folders[cfg.source] = register_image_folder(cfg.source, *folder_shape(cfg.source))
    source = folders.get(cfg.source, cfg.source)
    if not cfg.weights:  # lenet reads its channels and size there
        read_checked(cfg, source, True)
    network = tm.resolve_network(Namespace(**{**vars(cfg), "source": source}))
    for arg in cfg.targets:
        if arg not in tm.TARGETS and arg not in folders:
            folders[arg] = register_image_folder(arg, network.channels, network.size)
    if len(set(folders.values())) < len(folders):
        raise ExperimentError(f"two image folders share a name ({', '.join(folders)})")
    cfg.source = source
    cfg.targets = tuple(folders.get(arg, arg) for arg in cfg.targets)
    return network


def read_checked(cfg, name, train):
    """tm.read_split(), failing on torchvision's raw files with the file named."""
    try:
        return tm.read_split(name, cfg.data_dir, train)
    except ExperimentError as err:
        dataset = tm.TARGETS[name].dataset
        failure = err.__context__  # what torchvision raised, if it did
        if not hasattr(dataset, "resources") or failure is None:
            raise
        files = [Path(file).stem for file, _ in dataset.resources]
        raw = Path(cfg.data_dir, dataset.__name__, "raw")
        if all((raw / file).is_file() for file in files):
            split = [file for file in files if file.startswith(("t10k", "train")[train])]
            raise ExperimentError(f"{' or '.join(split)} in {raw} is damaged (truncated or "
                                  "corrupt): delete it to download it again") from None
        said = str(failure).strip()
        reason = said.splitlines()[-1] if said else type(failure).__name__
        raise ExperimentError(f"{dataset.__name__} is not in {raw} and could not be downloaded "
                              f"({reason}); put {', '.join(files)} there") from None


def check_data(cfg):
    """Fail now, not in half an hour, where data is missing or --n-pretrain does not fit (the
    targets' sizes: describe_subsets())."""
    for name in dict.fromkeys(datasets_read(cfg)):
        for train in (True, False):
            read_checked(cfg, name, train)
    if not cfg.weights:
        images = torch.arange(n_images(cfg.source, cfg.data_dir))
        where = folder_of(tm.TARGETS[cfg.source]) or cfg.source
        draw_subset(cfg.source, cfg.n_pretrain, images, cfg.seed, where, "--n-pretrain")


def span(values):
    """min-max, or the one value."""
    low, high = int(values.min()), int(values.max())
    return f"{low}" if low == high else f"{low}-{high}"


def drawn(cfg, name, n_train):
    """Each seed's draw for target `name` at n_train (a size that does not fit fails here): its
    training and validation images per class (seeds x 2 x classes), how many of each
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


def describe_subsets(cfg):
    """Per target and n_train, over the seeds: the images per class, how many pretraining saw,
    and warnings where a class has fewer than two validation images in some seed (the
    validation loss, which picks the epoch and the rate, rests on one image of it or none)."""
    lines, warnings, seed_range = [], [], seeds(cfg)
    seeds_used = f", seeds {seed_range[0]}-{seed_range[-1]}" if len(seed_range) > 1 else ""
    for name, n_train in itertools.product(cfg.targets, cfg.n_train):
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
                f"fewer than 2 validation images in some seed ({', '.join(few[:4])}); the "
                "validation loss that picks each run's epoch and rate is noisy: give more with "
                "--n-val"
                + ("" if cfg.stratify else " or --stratify"))
    return lines, warnings


def warn_if_busy(threads, workers):
    """Beside other busy processes, torch's threads wait on each other and runs take many times
    as long: say so at the start, and what to lower."""
    try:  # the tasks running now, but this one
        busy = int(Path("/proc/loadavg").read_text().split()[3].split("/")[0]) - 1
    except OSError:  # not Linux: no count of busy tasks
        busy = 0
    cores = os.cpu_count() or 1
    if cores - busy < threads * workers:
        lower = [flag for flag, value in (("--threads", threads), ("--workers", workers))
                 if value > 1]
        logger.warning(f"Warning: other running processes ({busy}) leave {max(cores - busy, 0)} "
                       f"of {cores} cores free for {workers} worker{'s' * (workers > 1)} of "
                       f"{threads} torch thread{'s' * (threads > 1)}: runs may be many times "
                       f"slower" + (f"; lower {' or '.join(lower)}" if lower else ""))


def check_devices(cfg):
    """One device, checked before any training; returns the accelerator Lightning resolves."""
    try:
        trainer = lightning.Trainer(
            accelerator=cfg.accelerator, devices=cfg.devices, logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    except Exception as err:  # Lightning raises several kinds for an unknown or unavailable one
        raise ExperimentError(f"--accelerator {cfg.accelerator} --devices {cfg.devices}: "
                              f"{one_line(err)}") from None
    if trainer.world_size > 1:
        raise ExperimentError("this experiment runs on one device; pass --devices 1")
    return type(trainer.accelerator).__name__.removesuffix("Accelerator").lower()


def check_inputs(cfg, created):
    """Everything that can be checked before training, with data folders that a failed
    download leaves added to `created`. Returns the resolved accelerator."""
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
        raise ExperimentError("--backbone-per-seed pretrains with each seed: drop --pretrain-seed")
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


def topmost_missing(path):
    """The topmost of path and its parents that is not there, if any: all mkdir -p makes."""
    return [p for p in (path, *path.parents) if not p.exists()][-1:]


def prepare_outputs(cfg, created, stack):
    """The log folder (cleared with --overwrite) and the CSV made now, so that a path that
    cannot be written fails before any training, and the version of this invocation's runs.
    A new sweep locks its CSV (until `stack` closes); a resumed one has, and appends."""
    log_dir = Path(cfg.log_dir)
    if log_dir.exists() and not log_dir.is_dir():
        raise ExperimentError(f"--log-dir {log_dir} is a file, not a folder")
    if cfg.overwrite and log_dir.is_dir() and not cfg.dry_run:
        clear_log_dir(log_dir)
    try:
        missing = topmost_missing(log_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
        created += missing
        tempfile.TemporaryFile(dir=log_dir).close()
    except OSError as err:
        raise ExperimentError(f"--log-dir {log_dir} cannot be created or written "
                              f"({one_line(err)})") from None
    if not (cfg.resume and cfg.version):
        numbers = (p.name.removeprefix("version_") for p in log_dir.glob("**/version_*"))
        cfg.version = f"version_{max(map(int, filter(str.isdigit, numbers)), default=-1) + 1}"
    csv_path = Path(cfg.results_csv or log_dir / f"results_{cfg.version}.csv")
    if csv_path.is_dir():
        raise ExperimentError(f"--results-csv {csv_path} is a folder, not a file")
    try:
        missing = topmost_missing(csv_path.parent)
        csv_path.parent.mkdir(parents=True, exist_ok=True)
        created += missing
        if not cfg.resume:
            lock = SweepLock(csv_path)
            lock.acquire()
            stack.callback(lock.release)
            rows = csv_path.read_bytes().splitlines() if csv_path.is_file() else []
            if len(rows) > 1 and not cfg.overwrite:
                raise ExperimentError(f"--results-csv {csv_path} holds a sweep's rows: "
                                      f"--resume {csv_path}, or pass --overwrite")
        created += topmost_missing(csv_path)  # locked: no other invocation made it
        return ResultsCsv(str(csv_path), append=bool(cfg.resume))
    except OSError as err:
        raise ExperimentError(f"--results-csv {csv_path} cannot be written "
                              f"({one_line(err)})") from None


def clear_log_dir(log_dir):
    """--overwrite: delete the log folder, unless it holds files that no sweep wrote."""
    ours = {"pretrain", "learning_curve", "figure", *tm.TARGETS}
    foreign = sorted(path.name for path in log_dir.iterdir()
                     if path.name not in ours and not path.name.startswith("results_"))
    if foreign:
        raise ExperimentError(f"--overwrite would delete {log_dir}, which holds files no "
                              f"sweep wrote ({', '.join(foreign[:3])})")
    logger.info(f"--overwrite: removing {log_dir}")
    shutil.rmtree(log_dir)


def remove_unfinished(cfg, csv_out, resumed, created):
    """After a sweep stopped: the folders of its unfinished runs removed, and where no run of a
    new sweep finished, everything it made. Returns whether rows are kept."""
    try:
        finished = {run_key(r) for r in read_results([csv_out.path], "--resume")}
    except ExperimentError:  # a header and no rows
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
            if log_dir not in parent.parents or any(parent.iterdir()):
                break
            parent.rmdir()
    return bool(finished or resumed)


def remove(paths):
    """What a failed start made, removed again."""
    for path in reversed(paths):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
