"""--resume: the settings beside a sweep's CSV (X.json), and a sweep continued from them or
borrowing its backbones. Imported by ray_engine and cli; imports settings, runs, files and
the template."""

import contextlib
import dataclasses
import hashlib
import importlib.metadata
import json
import os
import platform
from argparse import Namespace
from pathlib import Path

import torch

import transfer_mnist as tm
from sweeps.files import replace_text
from sweeps.runs import RunResult, read_results
from sweeps.settings import complete, one_line
from transfer_mnist import ExperimentError

# What a resumed sweep may change: where things are and how runs are spread (--threads: warned)
RESUME_MAY_CHANGE = {"data_dir", "log_dir", "results_csv", "workers", "threads", "cluster",
                     "gpus_per_run", "devices", "resume"}
# The code that makes a sweep's rows: the template and these modules, not the reporting ones.
RUN_MAKING = ("settings", "runs", "selection", "stop", "files", "augment", "data", "folders",
              "start", "engine", "ray_engine", "resume")
ISA_FLAGS = ("sse", "ssse3", "avx", "fma", "f16c", "amx", "bmi", "popcnt", "abm", "movbe")
FORMAT = 3  # every sweep in results/ is in it (migrated once); this code reads no other
PRETRAINING = ("source", "n_pretrain", "pretrain_epochs", "pretrain_lr")
RESUME_COMMAND = "python -m sweeps --resume {}"  # how the console says to go on


@dataclasses.dataclass
class Resumed:
    """An interrupted sweep's rows, backbones, what made them, and what --widen added."""

    rows: list[RunResult]
    checkpoints: dict[int, str]
    made_by: dict
    widened: list[tuple] = dataclasses.field(default_factory=list)


def settings_path(csv_path):
    return Path(csv_path).with_suffix(".json")


def sha256(data):
    return hashlib.sha256(data).hexdigest()


def machine():
    libraries = ("torch", "torchvision", "lightning", "ray")
    return {**{name: importlib.metadata.version(name) for name in libraries}, "cpu": cpu_kind()}


def made_by(threads, accelerator):
    """What makes a row besides the settings: its code, all code, machine, threads, device."""
    template = Path(tm.__file__).read_text()
    package = {path.stem: path.read_text() for path in sorted(Path(__file__).parent.glob("*.py"))}
    making = [template[template.index('"""', 4) + 3:], *(package[name] for name in RUN_MAKING)]
    return {"code_sha256": sha256("\0".join(making).encode()),
            "script_sha256": sha256("\0".join([template, *package.values()]).encode()),
            **machine(), "threads": threads, "accelerator": accelerator}


def cpu_kind():
    """The CPU as exactly as float kernels differ: model, stepping, the ISA_FLAGS torch uses."""
    fields = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().split("\n\n")[0].splitlines():
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
    flags = sorted(flag for flag in fields.get("flags", "").split() if flag.startswith(ISA_FLAGS))
    return {"model_name": fields.get("model name", platform.processor() or platform.machine()),
            **{key.replace(" ", "_"): fields.get(key, "")
               for key in ("vendor_id", "cpu family", "model", "stepping")},
            "isa_flags": " ".join(flags),
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability()}


def differences(saved, now):
    """What differs between two made_by() records but all code and threads: cpu.stepping, ..."""
    differ = []
    for key in sorted((saved.keys() | now.keys()) - {"script_sha256", "threads"}):
        old, new = saved.get(key), now.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            differ += [f"{key}.{name}" for name in differences(old, new)]
        elif old != new:
            differ.append(key)
    return differ


def update_settings(csv_path, change, new=False):
    """The one place that writes the settings: read (`new`: none), changed, replaced in one step."""
    settings = {} if new else json.loads(settings_path(csv_path).read_text())
    change(settings)
    replace_text(settings_path(csv_path), json.dumps(settings, indent=1) + "\n")


def relative_paths(config, folder, to_csv):
    """config's paths relative to the CSV's `folder` (to_csv: resume from anywhere), or back."""
    def path(value):
        return os.path.relpath(value, folder) if to_csv else os.path.normpath(folder / value)

    def path_if(value, exists):  # a dataset's or published weights' name stays
        there = value not in tm.TARGETS and exists(value if to_csv else path(value))
        return path(value) if there else value

    changed = {name: path(config[name]) for name in ("data_dir", "log_dir", "results_csv")
               if config[name] is not None}
    changed["weights"] = config["weights"] and path_if(config["weights"], os.path.isfile)
    changed["source"] = path_if(config["source"], os.path.isdir)
    changed["targets"] = [path_if(name, os.path.isdir) for name in config["targets"]]
    return {**config, **changed}


def save_settings(cfg, csv_path, checkpoints, made):
    """The settings at a sweep's start: its flags, what makes its rows, where backbones go."""
    folder = Path(csv_path).parent
    settings = {"format": FORMAT, "config": relative_paths(vars(cfg), folder, to_csv=True),
                "made_by": made, "weights": weights_record(cfg),
                "checkpoints": {seed: {"path": os.path.relpath(path, folder), "sha256": None}
                                for seed, path in checkpoints.items()}}
    update_settings(csv_path, lambda saved: saved.update(settings), new=True)


def weights_record(cfg):
    if not cfg.weights:
        return None
    path = tm.weights_path(cfg)
    return {"backbone": cfg.backbone, "weights": cfg.weights, "path": os.path.abspath(path),
            "sha256": sha256(Path(path).read_bytes())}


def check_weights_unchanged(resume, saved, cfg):
    """--resume goes on with the weights the sweep began with (`saved`), byte for byte."""
    path = tm.weights_path(cfg)
    now = sha256(Path(path).read_bytes()) if os.path.isfile(path) else None
    if now != saved["sha256"]:
        found = f"SHA-256 {now[:12]}" if now else "missing"
        raise ExperimentError(f"--resume {resume}: --weights {cfg.weights} are not those the "
                              f"sweep began with ({path}: {found}, the sweep's "
                              f"{saved['sha256'][:12]}); put them back, or start a new sweep")


def record_backbone(csv_path, seed, checkpoint_path, rates=None):
    """Seed's new backbone: where it is, its digest, each pretraining rate's best loss."""
    record = {"path": os.path.relpath(checkpoint_path, Path(csv_path).parent),
              "sha256": sha256(Path(checkpoint_path).read_bytes())}
    if rates:
        record["pretraining val_loss by rate"] = {f"{r:g}": v for r, v in rates.items()}
    update_settings(csv_path, lambda settings: settings["checkpoints"].update({str(seed): record}))


def record_widened(csv_path, run, per_seed=False):
    rate = [run.target, run.mode, run.n_train, run.learning_rate] + [run.seed] * per_seed
    update_settings(csv_path, lambda settings: settings.setdefault("widened", []).append(rate))


@dataclasses.dataclass
class NodeRecords:
    """On a cluster, each row's node and its machine(), recorded before the row. A node unlike
    one that made other rows (or its own, on a resume) is named once, with what differs."""

    csv_path: str
    named: set = dataclasses.field(default_factory=set)

    def __call__(self, run, node):
        address, record = node["ip"], {k: v for k, v in node.items() if k != "ip"}
        update_settings(self.csv_path, lambda settings: self.record(settings, run, address, record))

    def record(self, settings, run, address, record):
        nodes = settings.setdefault("nodes", {})
        for other, earlier in nodes.items() if address not in self.named else ():
            if differ := differences(earlier, record):
                made = "its own earlier rows" if other == address else f"the rows of node {other}"
                tm.logger.warning(f"Warning: node {address} is not like what made {made}: "
                                  f"{', '.join(differ)} differ; the rows of the two may not "
                                  "be comparable")
        self.named.add(address)
        nodes[address] = record
        settings.setdefault("row_nodes", {})[str(run)] = address


def saved_settings(csv_path):
    """The settings beside a results CSV, or {} where none can be read."""
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        settings = json.loads(settings_path(csv_path).read_text())
        if settings["format"] != FORMAT:
            tm.logger.warning(f"Warning: {settings_path(csv_path)} is in another format of "
                              f"settings ({settings['format']}, this code reads {FORMAT}): ignored")
        elif isinstance(settings["config"], dict):
            return settings
    return {}


def backbones(checkpoints, csv_path, seeds, flag):
    """A sweep's backbones by seed, as paths from here; those of `seeds` checked unchanged."""
    paths = {int(seed): Path(csv_path).parent / c["path"] for seed, c in checkpoints.items()}
    for seed in seeds:
        if not (seed in paths and paths[seed].is_file()):
            raise ExperimentError(f"{flag}: the sweep's backbone {paths.get(seed)} is missing")
        if checkpoints[str(seed)]["sha256"] != sha256(paths[seed].read_bytes()):
            raise ExperimentError(f"{flag}: the sweep's backbone {paths[seed]} has changed since "
                                  "it was written")
    return {seed: str(path) for seed, path in paths.items()}


def resume_settings(cfg, given):
    """The --resume sweep's settings, and the given flags that do not change a run's numbers."""
    flag = f"--resume {cfg.resume}"
    try:
        saved = json.loads(settings_path(cfg.resume).read_text())
        if saved["format"] != FORMAT:
            raise ValueError(f"format {saved['format']}, this code reads {FORMAT}")
        config = relative_paths(saved["config"], Path(cfg.resume).parent, to_csv=False)
        settings = complete(Namespace(**config))
        made = saved["made_by"]
        has_rows = len(Path(cfg.resume).read_bytes().splitlines()) > 1
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ExperimentError(f"{flag}: cannot read the sweep's settings or rows "
                              f"({one_line(err)})") from None
    if "overwrite" in given:
        raise ExperimentError(f"{flag} continues that sweep; --overwrite would delete it")
    settings.overwrite = False
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
        tm.logger.warning(f"--threads {cfg.threads}, the sweep's {made['threads']}: the remaining "
                          "rows may differ from an uninterrupted sweep's (float sums)")
    rows = read_results([cfg.resume], "--resume") if has_rows else []  # stopped in pretraining
    pretrained = {r.seed for r in rows if r.mode not in tm.ARMS}
    backbone_paths = backbones(saved["checkpoints"], cfg.resume, pretrained, flag)
    if saved.get("weights"):
        check_weights_unchanged(cfg.resume, saved["weights"], settings)
    settings.resume = settings.results_csv = cfg.resume
    return settings, Resumed(rows, backbone_paths, made, list(map(tuple, saved.get("widened", []))))


def pretraining_settings(config, threads):
    """What makes a backbone: a sweep may borrow another's where these are the same."""
    patience = config.get("pretrain_patience")
    return {**{name: config.get(name) for name in PRETRAINING}, "threads": threads,
            "pretraining patience": config.get("patience") if patience is None else patience,
            "shuffled batches": bool(config.get("shuffle")),
            "pretraining rates": tuple(config.get("pretrain_lr_grid") or ())}


def borrowed_backbones(cfg, seeds, threads):
    """That sweep's backbones and pretraining rows of `seeds`, where pretrained as here."""
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


def check_made_by(resumed, now, resume):
    """--resume adds rows only where the same code, libraries, CPU and accelerator would."""
    def shown(record, name):  # cpu.stepping: record["cpu"]["stepping"]; a digest's start
        key, _, field = name.partition(".")
        value = record.get(key, {}).get(field) if field else record.get(key)
        return str(value)[:12] if key == "code_sha256" else value

    if differ := differences(resumed.made_by, now):
        named = {"code_sha256": "the code that makes the rows"}.get
        listed = "; ".join(f"{named(name, name)} {shown(resumed.made_by, name)}, "
                           f"here {shown(now, name)}" for name in differ[:3])
        raise ExperimentError(f"--resume {resume}: the sweep's rows were made otherwise ({listed})")


def resume_hint(csv_path):
    """How a failed sweep's message ends, here and in sweeps/watch.py."""
    return f"the finished runs are in {csv_path}; to go on: {RESUME_COMMAND.format(csv_path)}"
