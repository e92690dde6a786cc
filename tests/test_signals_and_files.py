"""A sweep that harms nothing and loses nothing: a signal between any two writes leaves a sweep that --resume
continues, a signal before the first run leaves nothing, one invocation writes a sweep at a time, paths
saved relative to the CSV, the kind of CPU recorded, a busy machine named. Tiny data, one process."""

import json
import os
import signal
import subprocess
import sys
import types
from pathlib import Path

import pytest
from conftest import tiny_argv

import transfer_mnist as tm
from sweeps import cli, engine, files, resume, runs, start
from sweeps.runs import Run
from sweeps.stop import StopSignal

GRID = ["--targets", "even-odd", "--modes", "finetuned", "from_scratch", "--lr-grid", "1e-3", "1e-2"]


def signal_at(monkeypatch, module, name: str, after: int = 0):
    """Make the `after`-th call of module.name (0: the first) stop the sweep as a Ctrl-C arriving there would."""
    original, calls = getattr(module, name), []

    def stopped(*args, **kwargs):
        calls.append(1)
        if len(calls) == after + 1:
            StopSignal.received = signal.SIGINT
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, stopped)


TWO_SEEDS = ["--seeds", "2", "--backbone-per-seed"]


@pytest.fixture(scope="module")
def whole(tiny_data, tmp_path_factory) -> Path:
    """The CSV of the uninterrupted sweep that every interrupted one must end with."""
    out = tmp_path_factory.mktemp("whole")
    args = tiny_argv(tiny_data[0], out / "logs") + GRID + TWO_SEEDS
    assert cli.main(args + ["--results-csv", str(out / "w.csv")]) == 0
    return out / "w.csv"


@pytest.mark.parametrize("point", ["digest recorded, row not", "a target row appended", "CSV being replaced",
                                   "settings being replaced"])
def test_a_signal_between_any_two_writes_leaves_a_sweep_that_resume_continues(tiny_args, tmp_path, monkeypatch,
                                                                               point, whole):
    args = tiny_args + GRID + TWO_SEEDS
    csv_path = tmp_path / "r.csv"
    if point == "digest recorded, row not":
        signal_at(monkeypatch, runs.ResultsCsv, "append", after=1)  # the second backbone's row
    elif point == "a target row appended":
        signal_at(monkeypatch, engine.gc, "collect", after=1)  # the first is before any run, the second after a row
    else:  # inside files.replace, the temporary file written and not yet renamed: the settings' third
        # replacement (the second backbone's digest), or the fourth, the CSV's once its first grid is complete
        stopping = types.SimpleNamespace(**{name: getattr(os, name) for name in dir(os) if not name.startswith("__")})
        monkeypatch.setattr(files, "os", stopping)
        signal_at(monkeypatch, stopping, "replace", after=2 if point == "settings being replaced" else 3)
    assert cli.main(args + ["--log-dir", str(tmp_path / "logs2"), "--results-csv", str(csv_path)]) == 130
    monkeypatch.undo()
    assert not list(tmp_path.glob("*.partial"))  # nothing half-written left beside the sweep
    assert cli.main(["--resume", str(csv_path)]) == 0
    assert csv_path.read_bytes() == whole.read_bytes()


def test_a_signal_before_the_first_run_leaves_nothing(tiny_args, tmp_path, monkeypatch, capsys):
    signal_at(monkeypatch, start, "check_data")
    log_dir = tmp_path / "new" / "logs"
    assert cli.main(tiny_args + ["--log-dir", str(log_dir)]) == 130
    err = capsys.readouterr().err
    assert "Interrupted: nothing was written" in err and "Traceback" not in err
    assert not (tmp_path / "new").exists()
    monkeypatch.undo()
    signal_at(monkeypatch, tm, "pretrain")  # in the first run: a header only, no finished run to keep
    assert cli.main(tiny_args + ["--log-dir", str(log_dir)]) == 130
    assert "Interrupted before any run finished: nothing was kept" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_a_new_sweep_or_a_dry_run_never_replaces_an_earlier_sweep_s_rows(tiny_args, tmp_path, capsys):
    first = tmp_path / "first.csv"
    assert cli.main(tiny_args + ["--targets", "even-odd", "--results-csv", str(first)]) == 0
    kept = {path.name: path.read_bytes() for path in tmp_path.glob("first.*")}
    assert set(kept) == {"first.csv", "first.json", "first.md", "first.png"}
    capsys.readouterr()
    assert cli.main(tiny_args + ["--targets", "even-odd", "--results-csv", str(first)]) == 2
    assert f"--resume {first}, or pass --overwrite" in capsys.readouterr().err
    # the sweep's own command as a dry run: its one-epoch rows go to the dry run's temporary folder
    assert cli.main(tiny_args + ["--targets", "even-odd", "--results-csv", str(first), "--dry-run"]) == 0
    assert {path.name: path.read_bytes() for path in tmp_path.glob("first.*")} == kept
    assert cli.main(tiny_args + ["--targets", "even-odd", "--results-csv", str(first), "--overwrite",
                                 "--seeds", "2"]) == 0
    assert {r.seed for r in runs.read_results([str(first)])} == {0, 1}  # asked for: replaced


def test_a_sweep_is_written_by_one_invocation_at_a_time(tmp_path):
    csv_path = tmp_path / "r.csv"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from sweeps.files import SweepLock; "
                               f"SweepLock({str(csv_path)!r}).acquire(); print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    with pytest.raises(files.SweepLocked, match=f"being written by another invocation \\(PID {holder.pid}\\)"):
        files.SweepLock(csv_path).acquire()
    holder.kill()  # SIGKILL: the kernel drops its lock
    holder.wait()
    lock = files.SweepLock(csv_path)
    lock.acquire()
    assert lock.path.read_text() == f"{os.getpid()}\n"
    lock.release()
    assert not lock.path.exists()


def test_resume_finds_a_sweep_s_files_from_any_folder(tiny_args, tmp_path, monkeypatch):
    data = Path(tiny_args[tiny_args.index("--data-dir") + 1])
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    args = tiny_args + ["--targets", "even-odd", "--modes", "finetuned", "--seeds", "2", "--backbone-per-seed"]
    args[args.index("--data-dir") + 1] = os.path.relpath(data)
    args[args.index("--log-dir") + 1] = "logs"
    signal_at(monkeypatch, tm, "pretrain", after=1)  # in the second backbone
    assert cli.main(args + ["--results-csv", "out/r.csv"]) == 130
    monkeypatch.undo()
    config = json.loads((tmp_path / "here" / "out" / "r.json").read_text())["config"]
    assert config["log_dir"] == "../logs" and config["data_dir"] == os.path.relpath(data, tmp_path / "here" / "out")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert cli.main(["--resume", "../here/out/r.csv"]) == 0
    assert {p.name for p in (tmp_path / "here" / "logs" / "pretrain" / "version_0").iterdir()} == {"seed0", "seed1"}
    assert not (tmp_path / "elsewhere" / "logs").exists()


def test_the_settings_record_the_kind_of_cpu_and_resume_names_what_differs(tiny_args, tmp_path, capsys):
    kind = resume.cpu_kind()
    assert {"vendor_id", "cpu_family", "model", "stepping", "isa_flags"} <= kind.keys()
    assert resume.differences({"cpu": kind, "torch": "2"}, {"cpu": {**kind, "stepping": "x"}, "torch": "2"}) \
        == ["cpu.stepping"]



def test_on_a_cluster_each_row_s_node_is_recorded_and_an_unlike_node_is_named(tmp_path, caplog):
    csv = tmp_path / "r.csv"
    begun = {"config": {}, "made_by": {}, "checkpoints": {}}
    resume.update_settings(str(csv), lambda settings: settings.update(begun), new=True)
    record = resume.NodeRecords(str(csv))
    node = {"ip": "10.0.0.1", **resume.machine()}
    unlike = {**node, "ip": "10.0.0.2", "torch": "0.0", "cpu": {**node["cpu"], "model": "x"}}
    first, second, third = (Run("even-odd", "finetuned", seed, 50, 1e-3) for seed in range(3))
    with caplog.at_level("WARNING", logger="transfer_mnist"):
        record(first, node)
        record(second, unlike)
        record(third, unlike)  # named once
    assert caplog.messages == ["Warning: node 10.0.0.2 is not like what made the rows of node 10.0.0.1: cpu.model, "
                               "torch differ; the rows of the two may not be comparable"]
    settings = json.loads(resume.settings_path(csv).read_text())
    assert settings["row_nodes"] == {str(first): "10.0.0.1", str(second): "10.0.0.2", str(third): "10.0.0.2"}
    assert settings["nodes"]["10.0.0.1"] == {key: value for key, value in node.items() if key != "ip"}
    assert cli.machines_differ({str(csv): settings}) == [
        f"the nodes that made the rows were not made alike: cpu.model, torch differ between {csv} node 10.0.0.1, "
        f"{csv} node 10.0.0.2; their rows may not be comparable"]

def test_a_busy_machine_is_named_at_the_start(monkeypatch, caplog):
    cores = os.cpu_count() or 1
    for running, warned in ((cores + 1, True), (1, False)):  # every core busy besides this process; only this one
        monkeypatch.setattr(tm.Path, "read_text", lambda self: f"0.00 0.00 0.00 {running}/300 4242")
        caplog.clear()
        with caplog.at_level("WARNING", logger="transfer_mnist"):
            start.warn_if_busy(1, 2)
        assert caplog.messages == [f"Warning: other running processes ({cores}) leave 0 of {cores} cores free for 2 "
                                   f"workers of 1 torch thread: runs may be many times slower; lower --workers"
                                   ] * warned
