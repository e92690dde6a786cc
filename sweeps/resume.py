"""--resume: the settings saved beside a sweep's CSV (X.json for X.csv:
the resolved flags, what made its rows, its backbones' digests), and a
sweep continued from them or borrowing their backbones. Imported by
engine, ray_engine and cli; it imports settings, runs, files and the
template."""

import contextlib
import dataclasses
import hashlib
import importlib.metadata
import json
import os
import platform
from argparse import Namespace
from pathlib import Path

import transfer_mnist as tm
from sweeps.files import replace_text
from sweeps.runs import RunResult, read_results
from sweeps.settings import complete, one_line
from transfer_mnist import ExperimentError

logger = tm.logger  # the experiment's console, as the template's

# What a resumed sweep may change: where things are and how the runs
# are spread, not what a run computes. --threads may change too, with a
# warning: it changes the order of float sums.
RESUME_MAY_CHANGE = {"data_dir", "log_dir", "results_csv", "workers", "threads", "cluster",
                     "gpus_per_run", "devices", "resume"}
# The code that makes a sweep's rows: the template and these modules;
# the reporting ones (summary, figures, cli) may change without a row.
RUN_MAKING = ("settings", "runs", "stop", "files", "augment", "data", "folders", "start",
              "engine", "ray_engine", "resume")
# The instruction sets whose kernels torch chooses between: they decide
# which float code a run executes.
ISA_FLAGS = ("sse", "ssse3", "avx", "fma", "f16c", "amx", "bmi", "popcnt", "abm", "movbe")
# Every sweep in results/ is in this format (migrated once); this code
# reads no other.
FORMAT = 3
# What makes a backbone: a sweep may borrow another's (--backbones-from)
# where these, and pretraining_settings(), are the same.
PRETRAINING = ("source", "n_pretrain", "pretrain_epochs", "pretrain_lr")


@dataclasses.dataclass
class Resumed:
    """What an interrupted sweep left: its rows, pretraining included,
    its backbones' checkpoints (seed -> path), what made its rows, and
    the (target, mode, n_train, rate[, seed]) that --widen added."""

    rows: list[RunResult]
    checkpoints: dict[int, str]
    made_by: dict
    widened: list[tuple] = dataclasses.field(default_factory=list)


def settings_path(csv_path: str | Path) -> Path:
    return Path(csv_path).with_suffix(".json")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def machine() -> dict:
    """The libraries and the kind of CPU that make a row: of the machine
    a sweep runs on, and of each node of a cluster."""
    libraries = ("torch", "torchvision", "lightning", "ray")
    return {**{name: importlib.metadata.version(name) for name in libraries}, "cpu": cpu_kind()}


def made_by(threads: int, accelerator: str) -> dict:
    """What makes a row besides the settings: the code (the template but
    its docstring, whose headline changes with the results, and the
    run-making modules), all the code (reporting too), the machine, the
    torch threads and the accelerator."""
    template = Path(tm.__file__).read_text()
    package = {path.stem: path.read_text() for path in sorted(Path(__file__).parent.glob("*.py"))}
    making = [template[template.index('"""', 4) + 3:], *(package[name] for name in RUN_MAKING)]
    return {"code_sha256": sha256("\0".join(making).encode()),
            "script_sha256": sha256("\0".join([template, *package.values()]).encode()),
            **machine(), "threads": threads, "accelerator": accelerator}


def cpu_kind() -> dict[str, str]:
    """The kind of CPU, as exactly as "the same kind" needs (float
    kernels differ between kinds, and 500 epochs amplify that):
    /proc/cpuinfo's vendor, family, model and stepping (a model name
    such as "Intel(R) Xeon(R) Processor" covers several), the
    instruction-set flags, and the kernels torch picked from them."""
    fields = {"model name": platform.processor() or platform.machine()}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().split("\n\n")[0].splitlines():
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
    flags = sorted(flag for flag in fields.get("flags", "").split() if flag.startswith(ISA_FLAGS))
    kind = {"model_name": fields["model name"], "isa_flags": " ".join(flags)}
    for key in ("vendor_id", "cpu family", "model", "stepping"):
        kind[key.replace(" ", "_")] = fields.get(key, "")
    kind["torch_cpu_capability"] = ""
    with contextlib.suppress(Exception):  # torch before 2.1 cannot say
        import torch

        kind["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    return kind


def differences(saved: dict, now: dict) -> list[str]:
    """The entries of two made_by() records that differ, the CPU's field
    by field (cpu.stepping); not the reporting code's digest, nor the
    threads (--threads may change, with a warning)."""
    differ = []
    for key in sorted((saved.keys() | now.keys()) - {"script_sha256", "threads"}):
        old, new = saved.get(key), now.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            differ += [f"{key}.{name}" for name in differences(old, new)]
        elif old != new:
            differ.append(key)
    return differ


def update_settings(csv_path: str, change, new: bool = False) -> None:
    """The one place that writes the settings: read (or, `new`, begun
    empty), change(settings), and replaced in one step, so that a signal
    or a full disk while writing leaves the old settings whole."""
    path = settings_path(csv_path)
    settings = {} if new else json.loads(path.read_text())
    change(settings)
    replace_text(path, json.dumps(settings, indent=1) + "\n")


def relative_paths(config: dict, folder: Path, to_csv: bool) -> dict:
    """config's paths (data, logs, CSV; a weights file, image folders
    among source and targets) relative to the CSV's `folder` (to_csv),
    so that --resume finds them from any working folder, or back from
    there to paths that open from here."""
    def path(value):
        return os.path.relpath(value, folder) if to_csv else os.path.normpath(folder / value)

    def path_if(value, exists):  # a dataset's or published weights' name stays
        there = exists(value if to_csv else path(value))
        return path(value) if value and value not in tm.TARGETS and there else value

    changed = {name: path(config[name]) for name in ("data_dir", "log_dir", "results_csv")
               if config[name] is not None}
    changed["weights"] = path_if(config["weights"], os.path.isfile)
    changed["source"] = path_if(config["source"], os.path.isdir)
    changed["targets"] = [path_if(name, os.path.isdir) for name in config["targets"]]
    return {**config, **changed}


def save_settings(cfg: Namespace, csv_path: str, checkpoints: dict[int, str], made: dict) -> None:
    """The settings at a sweep's start: its flags, what made its rows,
    its --weights (weights_record()) and where each backbone will be (a
    digest once it is written), paths relative to the CSV."""
    folder = Path(csv_path).parent
    settings = {"format": FORMAT, "config": relative_paths(vars(cfg), folder, to_csv=True),
                "made_by": made, "weights": weights_record(cfg),
                "checkpoints": {seed: {"path": os.path.relpath(path, folder), "sha256": None}
                                for seed, path in checkpoints.items()}}
    update_settings(csv_path, lambda saved: saved.update(settings), new=True)


def weights_record(cfg: Namespace) -> dict | None:
    """--weights as the sweep began with them: the name or file given,
    the file read (a published one in torch's cache) and its digest."""
    if not cfg.weights:
        return None
    path = tm.weights_path(cfg)
    return {"backbone": cfg.backbone, "weights": cfg.weights, "path": os.path.abspath(path),
            "sha256": sha256(Path(path).read_bytes())}


def check_weights_unchanged(resume: str, saved: dict | None, cfg: Namespace) -> None:
    """--resume continues with the weights the sweep began with (`saved`,
    a weights_record()), byte for byte."""
    if not saved:
        return
    path = tm.weights_path(cfg)
    now = sha256(Path(path).read_bytes()) if os.path.isfile(path) else None
    if now != saved["sha256"]:
        found = f"SHA-256 {now[:12]}" if now else "missing"
        raise ExperimentError(f"--resume {resume}: --weights {cfg.weights} are not those the "
                              f"sweep began with ({path}: {found}, the sweep's "
                              f"{saved['sha256'][:12]})")


def record_backbone(csv_path: str, seed: int, checkpoint_path: str, rates=None) -> None:
    """Seed's freshly written backbone, where it was written (a resumed
    sweep may write into another --log-dir) and its digest, which
    --resume checks; with --pretrain-lr-grid, the best validation loss
    of each pretraining rate it was chosen from (`rates`)."""
    record = {"path": os.path.relpath(checkpoint_path, Path(csv_path).parent),
              "sha256": sha256(Path(checkpoint_path).read_bytes())}
    if rates:
        record["pretraining val_loss by rate"] = {f"{r:g}": v for r, v in rates.items()}
    update_settings(csv_path, lambda settings: settings["checkpoints"].update({str(seed): record}))


def record_widened(csv_path: str, run, per_seed: bool = False) -> None:
    """A rate that --widen added to run's (target, mode, n_train), for
    every seed or (per_seed) for run's seed alone, before its runs."""
    rate = [run.target, run.mode, run.n_train, run.learning_rate] + [run.seed] * per_seed
    update_settings(csv_path, lambda settings: settings.setdefault("widened", []).append(rate))


class NodeRecords:
    """On a cluster, each row's node with its machine(), recorded before
    the row ("nodes": address -> machine, "row_nodes": run -> address).
    A node unlike one that made other rows of the sweep (or its own
    earlier rows, on a resume) is named once, with what differs."""

    def __init__(self, csv_path: str):
        self.csv_path = csv_path
        self.named = set()

    def __call__(self, run, node: dict) -> None:
        update_settings(self.csv_path, lambda settings: self.record(settings, run, node))

    def record(self, settings: dict, run, node: dict) -> None:
        nodes = settings.setdefault("nodes", {})
        record = dict(node)
        address = record.pop("ip")
        for other, earlier in nodes.items() if address not in self.named else ():
            if differ := differences(earlier, record):
                made = "its own earlier rows" if other == address else f"the rows of node {other}"
                logger.warning(f"Warning: node {address} is not like what made {made}: "
                               f"{', '.join(differ)} differ; the rows of the two may not be "
                               "comparable")
        self.named.add(address)
        nodes[address] = record
        settings.setdefault("row_nodes", {})[str(run)] = address


def saved_settings(csv_path: str | Path) -> dict:
    """The settings beside a results CSV, or {} where there are none (a
    CSV from elsewhere) or they cannot be read."""
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        settings = json.loads(settings_path(csv_path).read_text())
        if settings["format"] != FORMAT:
            logger.warning(f"Warning: {settings_path(csv_path)} is in another format of "
                           f"settings ({settings['format']}, this code reads {FORMAT}): read "
                           "as none")
        elif isinstance(settings["config"], dict):
            return settings
    return {}


def backbones(checkpoints: dict, csv_path: str, seeds, flag: str) -> dict[int, str]:
    """The checkpoints a sweep recorded (its settings' "checkpoints"), by
    seed, as paths that open from here; each of `seeds` where it was
    recorded and unchanged since."""
    paths = {int(seed): Path(csv_path).parent / c["path"] for seed, c in checkpoints.items()}
    for seed in seeds:
        path = paths.get(seed)
        if path is None or not path.is_file():
            raise ExperimentError(f"{flag}: the sweep's backbone {path} is missing")
        if checkpoints[str(seed)]["sha256"] != sha256(path.read_bytes()):
            raise ExperimentError(f"{flag}: the sweep's backbone {path} has changed since it was "
                                  "written (another sweep in its --log-dir?)")
    return {seed: str(path) for seed, path in paths.items()}


def resume_settings(cfg: Namespace, given: set[str]) -> tuple[Namespace, Resumed]:
    """The saved settings of the sweep in --resume CSV, with what `given`
    (the flags on this command line) may change: a flag that would
    change a run's numbers must match the saved value, and --overwrite
    (which cleared the log folder at the sweep's start) is not restored."""
    flag = f"--resume {cfg.resume}"
    try:
        saved = json.loads(settings_path(cfg.resume).read_text())
        if saved["format"] != FORMAT:
            raise ValueError(f"format {saved['format']}, this code reads {FORMAT}")
        config = relative_paths(saved["config"], Path(cfg.resume).parent, to_csv=False)
        settings = complete(Namespace(**config))
        made = saved["made_by"]
        # a sweep stopped in its first pretraining has a header and no rows
        has_rows = len(Path(cfg.resume).read_bytes().splitlines()) > 1
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ExperimentError(f"{flag}: cannot read the sweep's settings or rows "
                              f"({one_line(err)})") from None
    settings.overwrite = False  # it cleared the log folder once, at the start
    differ = [name for name in sorted(given - RESUME_MAY_CHANGE)
              if getattr(cfg, name) != getattr(settings, name)]
    if differ:
        also = f" (also differing: {', '.join(differ[1:])})" if differ[1:] else ""
        raise ExperimentError(f"{flag}: --{differ[0].replace('_', '-')} {getattr(cfg, differ[0])} "
                              f"differs from the sweep's {getattr(settings, differ[0])}{also}")
    if Path(cfg.results_csv or cfg.resume).resolve() != Path(cfg.resume).resolve():
        raise ExperimentError(f"{flag} writes to that file; drop --results-csv")
    if "log_dir" in given and Path(cfg.log_dir).resolve() != Path(settings.log_dir).resolve():
        settings.version = ""  # another log folder: the resumed runs take a new version there
    for name in given & RESUME_MAY_CHANGE:
        setattr(settings, name, getattr(cfg, name))
    if "threads" not in given:  # the sweep's threads, whatever --workers is now
        settings.threads = made["threads"]
    elif cfg.threads != made["threads"]:
        logger.warning(f"--threads {cfg.threads} differs from the sweep's {made['threads']}: the "
                       "remaining rows may differ from an uninterrupted sweep's (float sums)")
    rows = read_results([cfg.resume], "--resume") if has_rows else []
    pretrained = {r.seed for r in rows if r.mode not in tm.ARMS}
    checkpoints = backbones(saved["checkpoints"], cfg.resume, pretrained, flag)
    check_weights_unchanged(cfg.resume, saved.get("weights"), settings)
    settings.resume = settings.results_csv = cfg.resume
    widened = [tuple(entry) for entry in saved.get("widened", [])]
    return settings, Resumed(rows, checkpoints, made, widened)


def pretraining_settings(config: dict, threads: int | None) -> dict:
    """PRETRAINING's values, with the patience pretraining ran with, its
    order of batches (settings before --shuffle: never shuffled) and its
    torch threads."""
    patience = config.get("pretrain_patience")
    return {**{name: config.get(name) for name in PRETRAINING}, "threads": threads,
            "pretraining patience": config.get("patience") if patience is None else patience,
            "shuffled batches": bool(config.get("shuffle")),
            "pretraining rates": tuple(config.get("pretrain_lr_grid") or ())}


def borrowed_backbones(cfg: Namespace, seeds: set[int], threads: int | None) -> Resumed:
    """--backbones-from CSV: that sweep's backbones of `seeds` and their
    pretraining rows, where it pretrained them as this sweep would
    (pretraining_settings()) and each is unchanged since."""
    csv_path = cfg.backbones_from
    flag = f"--backbones-from {csv_path}"
    saved = saved_settings(csv_path)
    if "checkpoints" not in saved:
        raise ExperimentError(f"{flag}: no sweep's settings beside it")
    config = relative_paths(saved["config"], Path(csv_path).parent, to_csv=False)
    theirs = pretraining_settings(config, saved["made_by"]["threads"])
    ours = pretraining_settings(vars(cfg), threads)
    if differ := [name for name in ours if ours[name] != theirs[name]]:
        shown = "; ".join(f"{name} {theirs[name]}, here {ours[name]}" for name in differ)
        raise ExperimentError(f"{flag}: its backbones were pretrained otherwise ({shown})")
    rows = [r for r in read_results([csv_path], flag) if r.mode not in tm.ARMS and r.seed in seeds]
    if missing := seeds - {r.seed for r in rows}:
        raise ExperimentError(f"{flag} has no backbone of seed {min(missing)}")
    checkpoints = backbones(saved["checkpoints"], csv_path, seeds, flag)
    return Resumed(rows, {seed: checkpoints[seed] for seed in seeds}, saved["made_by"])


def check_made_by(resumed: Resumed, now: dict, resume: str) -> None:
    """--resume adds rows only where the same code, libraries, kind of
    CPU and accelerator would make them."""
    def shown(record, name):
        key, _, field = name.partition(".")
        value = record.get(key, {}).get(field) if field else record.get(key)
        return str(value)[:12] if key == "code_sha256" else value

    if differ := differences(resumed.made_by, now):
        names = {"code_sha256": "the code that makes the rows"}
        listed = "; ".join(f"{names.get(name, name)} {shown(resumed.made_by, name)}, "
                           f"here {shown(now, name)}" for name in differ[:3])
        raise ExperimentError(f"--resume {resume}: the sweep's rows were made otherwise "
                              f"({listed})")


def resume_command(csv_path: str) -> str:
    return f"python -m sweeps --resume {csv_path}"


def resume_hint(csv_path: str) -> str:
    """How a failed sweep's message ends, in the driver and in the watch
    (sweeps/watch.py) alike."""
    return f"the finished runs are in {csv_path}; to go on: {resume_command(csv_path)}"
