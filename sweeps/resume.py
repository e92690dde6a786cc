"""--resume: the settings saved beside a sweep's CSV (the resolved
flags, what made its rows, its backbones' digests), and a sweep
continued from them. Imported by engine, ray_engine and cli
(saved_settings for --report); it imports settings, runs, files and
the template."""

import argparse
import contextlib
import dataclasses
import hashlib
import importlib.metadata
import json
import os
import platform
from collections.abc import Callable, Iterable
from pathlib import Path

import transfer_mnist as tm
from sweeps.files import replace_text
from sweeps.runs import RunResult, read_results
from sweeps.settings import complete, one_line

logger = tm.logger  # the experiment's console, as the template's
Error = tm.ExperimentError

# What a resumed sweep may change: where things are and how the runs
# are spread, not what a run computes. --threads may change too, with a
# warning: it changes the order of float sums, so a whole run's numbers
RESUME_MAY_CHANGE = {"data_dir", "log_dir", "results_csv", "workers", "threads",
                     "cluster", "gpus_per_run", "devices", "resume"}
# The code that makes a sweep's rows: the template and these modules;
# the reporting ones (summary, figures, cli) may change without a row
RUN_MAKING = ("settings", "runs", "stop", "files", "augment", "data", "folders",
              "start", "engine", "ray_engine", "resume")
# The instruction sets whose kernels torch chooses between: they decide
# which float code a run executes
ISA_FLAGS = ("sse", "ssse3", "avx", "fma", "f16c", "amx", "bmi", "popcnt", "abm", "movbe")
# The settings' format: every sweep in results/ is in it (migrated
# once); this code reads no other
FORMAT = 3
# The settings that name files or folders: saved relative to the CSV's
# folder, so that --resume finds them from any working folder (and a
# sweep moved with its log folder and data resumes)
PATHS = ("data_dir", "log_dir", "results_csv")
# What makes a backbone: a sweep may borrow another's (--backbones-from)
# where these are the same
PRETRAINING = ("source", "n_pretrain", "pretrain_epochs", "pretrain_lr")


@dataclasses.dataclass
class Resumed:
    """What an interrupted sweep left: its rows, pretraining included,
    its backbones' checkpoints and what made its rows (made_by())."""

    rows: list[RunResult]
    checkpoints: dict[int, str]  # pretraining seed -> checkpoint
    made_by: dict
    # (target, mode, n_train, rate[, seed]) that --widen added
    widened: list[tuple] = dataclasses.field(default_factory=list)


def settings_path(csv_path: str | Path) -> Path:
    """The settings of the sweep whose rows are in csv_path, saved
    beside it at its start."""
    return Path(csv_path).with_suffix(".json")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: str | Path) -> str:
    return sha256(Path(path).read_bytes())


def code_digests() -> tuple[str, str]:
    """Digests of the code that makes the rows (the template but its
    docstring, whose headline changes with the results, and the
    run-making modules of this package), and of all of it, reporting
    included."""
    template = Path(tm.__file__).read_text()
    package = {path.stem: path.read_text()
               for path in sorted(Path(__file__).parent.glob("*.py"))}
    making = [template[template.index('"""', 4) + 3:],
              *(package[name] for name in RUN_MAKING)]
    everything = [template, *package.values()]
    return sha256("\0".join(making).encode()), sha256("\0".join(everything).encode())


def version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine() -> dict:
    """The libraries and the kind of CPU that make a row: of the machine
    a sweep runs on, and of each node of a cluster."""
    libraries = ("torch", "torchvision", "lightning", "ray")
    return {**{name: version(name) for name in libraries}, "cpu": cpu_kind()}


def made_by(threads: int, accelerator: str) -> dict:
    """What makes a row besides the settings: the code, the libraries,
    the kind of CPU, the torch threads and the accelerator."""
    code, everything = code_digests()
    return {"code_sha256": code, "script_sha256": everything, **machine(),
            "threads": threads, "accelerator": accelerator}


def cpu_kind() -> dict[str, str]:
    """The kind of CPU, as exactly as "the same kind" needs (float
    kernels differ between kinds, and 500 epochs amplify that):
    /proc/cpuinfo's vendor, family, model and stepping (a model name
    such as "Intel(R) Xeon(R) Processor" covers several), the
    instruction-set flags, and the kernels torch picked from them."""
    fields: dict[str, str] = {}
    with contextlib.suppress(OSError):
        first_cpu = Path("/proc/cpuinfo").read_text().split("\n\n")[0]
        for line in first_cpu.splitlines():
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
    flags = sorted(f for f in fields.get("flags", "").split() if f.startswith(ISA_FLAGS))
    capability = ""
    with contextlib.suppress(Exception):  # torch before 2.1 cannot say
        import torch

        capability = torch.backends.cpu.get_cpu_capability()
    model_name = fields.get("model name", platform.processor() or platform.machine())
    return {"model_name": model_name,
            **{key.replace(" ", "_"): fields.get(key, "")
               for key in ("vendor_id", "cpu family", "model", "stepping")},
            "isa_flags": " ".join(flags), "torch_cpu_capability": capability}


def differences(saved: dict, now: dict) -> list[str]:
    """The entries of two made_by() records that differ (the CPU's field
    by field), named: cpu.stepping."""
    differ = []
    for key in sorted(saved.keys() | now.keys()):
        # the reporting code; --threads may change, with a warning
        if key in ("script_sha256", "threads"):
            continue
        old, new = saved.get(key), now.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            differ += [f"{key}.{name}" for name in differences(old, new)]
        elif old != new:
            differ.append(key)
    return differ


def update_settings(csv_path: str, change: Callable[[dict], None], new: bool = False) -> None:
    """The one place that writes the settings beside a sweep's CSV: read
    (or, `new`, begun empty), changed, and replaced in one step, so that
    a signal or a full disk while writing leaves the old settings whole."""
    path = settings_path(csv_path)
    settings = {} if new else json.loads(path.read_text())
    change(settings)
    replace_text(path, json.dumps(settings, indent=1) + "\n")


def relative_paths(config: dict, folder: Path, to_csv: bool) -> dict:
    """config's paths (PATHS, and image folders among source and
    targets) relative to the CSV's `folder` (to_csv), or back from there
    to paths that open from here."""
    def path(value):
        if to_csv:
            return os.path.relpath(value, folder)
        return value if os.path.isabs(value) else os.path.normpath(folder / value)

    def folder_target(name):
        if name in tm.TARGETS:
            return name
        return path(name) if to_csv or os.path.isdir(path(name)) else name

    changed = {name: path(config[name]) for name in PATHS
               if config.get(name) is not None}
    weights = config.get("weights")  # a file's path, or published weights' name
    if weights and os.path.isfile(weights if to_csv else path(weights)):
        changed["weights"] = path(weights)
    if "source" in config:
        changed["source"] = folder_target(config["source"])
    if "targets" in config:
        changed["targets"] = [folder_target(name) for name in config["targets"]]
    return {**config, **changed}


def save_settings(cfg: argparse.Namespace, csv_path: str, checkpoints: dict[int, str],
                  made: dict) -> None:
    """The settings beside the CSV: the resolved flags (paths relative
    to the CSV), what made the rows, and each backbone's checkpoint
    (relative to the CSV too) with a digest once it is written."""
    folder = Path(csv_path).parent
    settings = {"format": FORMAT, "config": relative_paths(vars(cfg), folder, to_csv=True),
                "made_by": made, "weights": weights_record(cfg),
                "checkpoints": {seed: {"path": os.path.relpath(path, folder), "sha256": None}
                                for seed, path in checkpoints.items()}}
    update_settings(csv_path, lambda saved: saved.update(settings), new=True)


def weights_record(cfg: argparse.Namespace) -> dict | None:
    """--weights as the sweep began with them: the backbone, the name or
    file given, the file read (a published one in torch's cache) and its
    SHA-256, which --resume checks."""
    if not cfg.weights:
        return None
    path = tm.weights_path(cfg)
    return {"backbone": cfg.backbone, "weights": cfg.weights,
            "path": os.path.abspath(path), "sha256": file_sha256(path)}


def check_weights_unchanged(resume: str, saved: dict | None, cfg: argparse.Namespace) -> None:
    """--resume continues with the weights the sweep began with, byte
    for byte."""
    if not saved:
        return
    path = tm.weights_path(cfg)
    now = file_sha256(path) if os.path.isfile(path) else None
    if now != saved["sha256"]:
        found = f"SHA-256 {now[:12]}" if now else "missing"
        raise Error(f"--resume {resume}: --weights {cfg.weights} are not those the sweep "
                    f"began with ({path}: {found}, the sweep's {saved['sha256'][:12]}); "
                    "put them back, or start a new sweep")


def record_backbone(csv_path: str, seed: int, checkpoint_path: str,
                    rates: dict | None = None) -> None:
    """Record seed's freshly written backbone in the settings, where it
    was written (a resumed sweep may write into another --log-dir) and
    with its digest, which --resume checks; with --pretrain-lr-grid, the
    best validation loss of every pretraining rate it was chosen from
    (`rates`)."""
    record = {"path": os.path.relpath(checkpoint_path, Path(csv_path).parent),
              "sha256": file_sha256(checkpoint_path)}
    if rates:
        record["pretraining val_loss by rate"] = {f"{r:g}": v for r, v in rates.items()}
    update_settings(csv_path, lambda settings: settings["checkpoints"].update({str(seed): record}))


class NodeRecords:
    """On a cluster, each row's node with its libraries and CPU
    (machine()), in the settings beside the CSV ("nodes": address ->
    machine, "row_nodes": run -> address), recorded before the row. A
    node unlike one that made other rows of the sweep (or its own earlier
    rows, on a resume) is named once, with what differs."""

    def __init__(self, csv_path: str):
        self.csv_path, self.named = csv_path, set()

    def __call__(self, run, node: dict) -> None:
        update_settings(self.csv_path, lambda settings: self.record(settings, run, node))

    def record(self, settings: dict, run, node: dict) -> None:
        nodes = settings.setdefault("nodes", {})
        address, record = node["ip"], {k: v for k, v in node.items() if k != "ip"}
        if address not in self.named:
            self.named.add(address)
            for other, earlier in nodes.items():
                if differ := differences(earlier, record):
                    made = ("its own earlier rows" if other == address
                            else f"the rows of node {other}")
                    logger.warning(f"Warning: node {address} is not like what made {made}: "
                                   f"{', '.join(differ)} differ; the rows of the two may not "
                                   "be comparable")
        nodes[address] = record
        settings.setdefault("row_nodes", {})[str(run)] = address


def saved_settings(csv_path: str | Path) -> dict:
    """The settings saved beside a results CSV (config, made_by,
    checkpoints), or {} where there are none (a CSV from elsewhere)."""
    try:
        settings = json.loads(settings_path(csv_path).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(settings, dict) or not isinstance(settings.get("config"), dict):
        return {}
    if settings.get("format") != FORMAT:
        logger.warning(f"Warning: {settings_path(csv_path)} is in another format of settings "
                       f"({settings.get('format')}, this code reads {FORMAT}): "
                       "read as if it had none")
        return {}
    return settings


def saved_backbones(saved: dict, csv_path: str) -> tuple[dict[int, Path], dict[int, str]]:
    """The checkpoints a sweep recorded, by seed, as paths that open
    from here, and their digests."""
    recorded = {int(seed): c for seed, c in saved["checkpoints"].items()}
    folder = Path(csv_path).parent
    return ({seed: folder / c["path"] for seed, c in recorded.items()},
            {seed: c["sha256"] for seed, c in recorded.items()})


def read_saved(cfg: argparse.Namespace) -> tuple:
    """The settings saved beside --resume CSV, its flags completed, what
    made its rows and its backbones (saved_backbones())."""
    path = settings_path(cfg.resume)
    try:
        saved = json.loads(path.read_text())
        if saved.get("format") != FORMAT:
            raise ValueError(f"format {saved.get('format')}, this code reads {FORMAT}")
        config = relative_paths(saved["config"], path.parent, to_csv=False)
        settings = complete(argparse.Namespace(**config))
        backbones = saved_backbones(saved, cfg.resume)
        return saved, settings, saved["made_by"], backbones
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise Error(f"--resume {cfg.resume}: cannot read the sweep's settings from {path} "
                    f"({one_line(err)}); only a results CSV this script wrote can be "
                    "resumed") from None


def check_given(cfg: argparse.Namespace, given: set[str], settings: argparse.Namespace) -> None:
    """The flags on this command line that a resumed sweep may not
    change, as the sweep had them."""
    if "overwrite" in given:
        raise Error(f"--resume {cfg.resume} continues that sweep; --overwrite would delete it")
    differ = [name for name in sorted(given - RESUME_MAY_CHANGE)
              if getattr(cfg, name) != getattr(settings, name)]
    if differ:
        name = differ[0]
        also = f" (also differing: {', '.join(differ[1:])})" if differ[1:] else ""
        raise Error(f"--resume {cfg.resume}: --{name.replace('_', '-')} {getattr(cfg, name)} "
                    f"differs from the sweep's {getattr(settings, name)}, which produced its "
                    f"rows; drop it or start a new sweep{also}")
    if cfg.results_csv and Path(cfg.results_csv).resolve() != Path(cfg.resume).resolve():
        raise Error(f"--resume {cfg.resume} writes to that file; "
                    f"drop --results-csv {cfg.results_csv}")


def resume_settings(cfg: argparse.Namespace,
                    given: set[str]) -> tuple[argparse.Namespace, Resumed]:
    """The saved settings of the sweep in --resume CSV, with what `given`
    (the flags on this command line) may change; a flag that would
    change a run's numbers must match the saved value, and nothing that
    destroys (--overwrite) is restored."""
    saved, settings, made, (checkpoints, digests) = read_saved(cfg)
    check_given(cfg, given, settings)
    moved = Path(cfg.log_dir).resolve() != Path(settings.log_dir).resolve()
    if moved and "log_dir" in given:
        settings.version = ""  # another log folder: the resumed runs take a new version there
    for name in given & RESUME_MAY_CHANGE:
        setattr(settings, name, getattr(cfg, name))
    settings.overwrite = False  # it cleared the log folder once, at the sweep's start; never again
    if "threads" not in given:  # the sweep's threads, whatever --workers is now
        settings.threads = made["threads"]
    elif cfg.threads != made["threads"]:
        logger.warning(f"--threads {cfg.threads} differs from the sweep's {made['threads']}: "
                       "the remaining rows come from another order of float sums, and may "
                       "differ from an uninterrupted sweep's")
    try:  # a sweep stopped during its first pretraining has a header and no rows
        with open(cfg.resume) as f:
            has_rows = len(f.readlines()) > 1
        rows = read_results([cfg.resume], "--resume") if has_rows else []
    except OSError as err:
        raise Error(f"--resume {cfg.resume} cannot be read ({one_line(err)})") from None
    pretrained = {r.seed for r in rows if r.mode not in tm.ARMS}
    check_backbones(f"--resume {cfg.resume}", pretrained, checkpoints, digests)
    check_weights_unchanged(cfg.resume, saved.get("weights"), settings)
    settings.resume, settings.results_csv = cfg.resume, cfg.resume
    widened = [tuple(entry) for entry in saved.get("widened", [])]
    paths = {seed: str(path) for seed, path in checkpoints.items()}
    return settings, Resumed(rows, paths, made, widened)


def check_backbones(flag: str, seeds: Iterable[int], checkpoints: dict[int, Path],
                    digests: dict) -> None:
    """Each backbone of `seeds` is where its sweep recorded it,
    unchanged since its digest was saved."""
    for seed in seeds:
        checkpoint = checkpoints.get(seed)
        if checkpoint is None or not checkpoint.is_file():
            raise Error(f"{flag}: the sweep's pretrained backbone {checkpoint} is missing; "
                        "resume where it was written, or start a new sweep")
        if digests[seed] != file_sha256(checkpoint):
            raise Error(f"{flag}: the sweep's pretrained backbone {checkpoint} has changed since "
                        "it was written (another sweep in the same --log-dir?); start a new sweep")


def pretraining_settings(config: dict, threads: int | None) -> dict:
    """PRETRAINING's values, with the patience pretraining ran with, its
    order of batches and its torch threads."""
    patience = config.get("pretrain_patience")
    return {**{name: config.get(name) for name in PRETRAINING}, "threads": threads,
            "pretraining patience": config.get("patience") if patience is None else patience,
            "shuffled batches": bool(config.get("shuffle")),  # settings before --shuffle: never
            "pretraining rates": tuple(config.get("pretrain_lr_grid") or ())}


def borrowed_backbones(cfg: argparse.Namespace, seeds: set[int], threads: int | None) -> Resumed:
    """--backbones-from CSV: that sweep's backbones of `seeds` and their
    pretraining rows, where it pretrained them as this sweep would
    (PRETRAINING) and each is unchanged since its digest was saved."""
    csv_path = cfg.backbones_from
    flag = f"--backbones-from {csv_path}"
    saved = saved_settings(csv_path)
    if not saved or "checkpoints" not in saved:
        raise Error(f"{flag}: no sweep's settings beside it ({settings_path(csv_path)})")
    made = saved.get("made_by", {})
    config = relative_paths(saved["config"], Path(csv_path).parent, to_csv=False)
    theirs = pretraining_settings(config, made.get("threads"))
    ours = pretraining_settings(vars(cfg), threads)
    if differ := [name for name in ours if ours[name] != theirs[name]]:
        shown = "; ".join(f"{name} {theirs[name]}, here {ours[name]}" for name in differ)
        raise Error(f"{flag}: its backbones were pretrained otherwise ({shown})")
    rows = [r for r in read_results([csv_path], flag)
            if r.mode not in tm.ARMS and r.seed in seeds]
    if missing := seeds - {r.seed for r in rows}:
        raise Error(f"{flag} has no backbone of seed{'s' * (len(missing) > 1)} "
                    f"{', '.join(map(str, sorted(missing)))}")
    checkpoints, digests = saved_backbones(saved, csv_path)
    check_backbones(flag, seeds, checkpoints, digests)
    return Resumed(rows, {seed: str(checkpoints[seed]) for seed in seeds}, made)


def record_widened(csv_path: str, run, per_seed: bool = False) -> None:
    """A rate that --widen added to run's (target, mode, n_train), for
    every seed or (per_seed) for run's seed alone, in the settings
    before its runs start."""
    rate = [run.target, run.mode, run.n_train, run.learning_rate] + [run.seed] * per_seed
    update_settings(csv_path, lambda settings: settings.setdefault("widened", []).append(rate))


def check_made_by(resumed: Resumed, now: dict, resume: str) -> None:
    """--resume adds rows only where the same code, libraries, kind of
    CPU and accelerator would make them."""
    def value(record, name):
        for part in name.split("."):
            record = record.get(part) if isinstance(record, dict) else None
        return str(record)[:12] if name.endswith("sha256") else str(record)

    if differ := differences(resumed.made_by, now):
        names = {"code_sha256": "the code that makes the rows"}
        shown = "; ".join(f"{names.get(name, name)} {value(resumed.made_by, name)}, "
                          f"here {value(now, name)}" for name in differ[:3])
        raise Error(f"--resume {resume}: the sweep's rows were made otherwise ({shown}); "
                    "resume with what made them, or start a new sweep")


def resume_command(csv_path: str) -> str:
    return f"python -m sweeps --resume {csv_path}"


def resume_hint(csv_path: str) -> str:
    """How a failed sweep's message ends, in the driver and in the watch
    (sweeps/watch.py) alike."""
    return f"the finished runs are in {csv_path}; to go on: {resume_command(csv_path)}"
