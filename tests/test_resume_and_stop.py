"""Sweeps you can leave running: --resume deletes nothing, a stop signal at any moment keeps every finished
run, Ray starts its own instance and ends cleanly when it dies, rows are traceable to what made them.
Tiny data; Ray stays on loopback (conftest.py)."""

import dataclasses
import gc
import json
import math
import os
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch
import torchvision
from conftest import SWEEPS, sweep_settings
from test_ray import read_csv, recorder, session_processes, wait_for

import transfer_mnist as tm
from sweeps import cli, ray_engine, resume, runs, selection, settings
from sweeps.runs import RunResult

GRID = ["--targets", "even-odd", "--modes", "finetuned", "from_scratch", "--lr-grid", "1e-3", "3e-3", "1e-2"]


@pytest.fixture(scope="module")
def grid_sweep(tiny_data, tmp_path_factory):
    """An uninterrupted sweep of two 3-rate grids (6 target runs), to compare the interrupted ones with."""
    root, _ = tiny_data
    out = tmp_path_factory.mktemp("grid")
    args = ["--data-dir", str(root), "--n-pretrain", "40", "--n-train", "20", "--pretrain-epochs", "2",
            "--train-epochs", "5", "--accelerator", "cpu", "--threads", "1", *GRID]
    assert cli.main(args + ["--log-dir", str(out / "logs"), "--results-csv", str(out / "whole.csv")]) == 0
    return args, out / "whole.csv"


def test_resume_never_restores_overwrite(grid_sweep, tmp_path, capsys):
    args, whole = grid_sweep
    logs, csv_path = tmp_path / "logs", tmp_path / "logs" / "results_version_0.csv"
    assert cli.main(args + ["--log-dir", str(logs), "--overwrite"]) == 0
    assert json.loads(csv_path.with_suffix(".json").read_text())["config"]["overwrite"] is True
    before = {p: p.read_bytes() for p in logs.rglob("*") if p.is_file() and "events" not in p.name}
    assert cli.main(["--resume", str(csv_path)]) == 0  # the README's plain resume: nothing left to run
    assert all(p.read_bytes() == data for p, data in before.items() if p.suffix in (".csv", ".json", ".ckpt"))
    assert csv_path.read_bytes() == whole.read_bytes()
    capsys.readouterr()
    assert cli.main(["--resume", str(csv_path), "--overwrite"]) == 2
    assert "--overwrite would delete it" in capsys.readouterr().err
    assert csv_path.is_file()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_between_runs_stops_the_sweep_and_keeps_every_finished_run(grid_sweep, tmp_path, monkeypatch,
                                                                             capsys, signum):
    """The signal lands in the garbage collection after the 4th run, where a __del__ used to swallow it."""
    args, whole = grid_sweep
    collect, calls = gc.collect, []

    def collect_then_signal():
        calls.append(1)
        if len(calls) == 5:  # the first collection comes before any run
            try:  # what Python does with an exception raised in a __del__: print it and go on
                os.kill(os.getpid(), signum)
                time.sleep(0.2)
            except KeyboardInterrupt:
                pass
        return collect()

    monkeypatch.setattr(gc, "collect", collect_then_signal)
    csv_path = tmp_path / "r.csv"
    assert cli.main(args + ["--log-dir", str(tmp_path / "logs"), "--results-csv", str(csv_path)]) == 128 + signum
    rows = [r for r in read_csv(csv_path) if r["mode"] != "pretrain"]
    assert len(rows) == 4  # the first grid, settled, and one run of the second, not yet
    assert [r["selected"] for r in rows].count("true") == 1 and rows[-1]["selected"] == "false"
    err = capsys.readouterr().err
    assert f"To go on: python -m sweeps --resume {csv_path}" in err and "Traceback" not in err
    monkeypatch.setattr(gc, "collect", collect)
    assert cli.main(["--resume", str(csv_path)]) == 0
    assert csv_path.read_bytes() == whole.read_bytes()


def test_report_settles_complete_grids_only_and_keeps_the_sweep_s_own_summary(grid_sweep, tmp_path, capsys):
    args, whole = grid_sweep
    rows = runs.read_results([str(whole)])
    half = [r for r in rows if not (r.mode == "from_scratch" and r.learning_rate == 1e-2)]  # an interrupted grid
    planned = [runs.run_key(r) for r in rows]  # what the saved settings plan
    settled, incomplete = selection.settle(half, "seed", planned)
    assert [r.selected for r in settled if r.mode == "from_scratch"] == [False, False]
    assert sum(r.selected for r in settled if r.mode == "finetuned") == 1
    assert len(incomplete) == 1 and "/from_scratch n_train 20 is incomplete: 2 of 3 runs (seed 0 part-done)" in incomplete[0]
    two_seeds = half + [dataclasses.replace(r, seed=1) for r in rows if r.mode == "from_scratch"]
    settled, incomplete = selection.settle(two_seeds, "seed")  # without saved settings: the rates that other seeds ran
    assert not any(r.selected for r in settled if r.mode == "from_scratch") and len(incomplete) == 1
    assert sum(r.selected for r in settled if r.mode == "finetuned") == 1
    # --report with another selection writes beside the sweep's own files, under a name that says so
    own = {suffix: whole.with_suffix(suffix).read_bytes() for suffix in (".md", ".png")}
    assert cli.main(["--report", str(whole), "--select", "pooled"]) == 0
    assert {suffix: whole.with_suffix(suffix).read_bytes() for suffix in own} == own
    assert "(--select pooled)" in (whole.parent / "whole.pooled.md").read_text()
    assert cli.main(["--report", str(whole)]) == 0  # the sweep's own selection: the very same files
    assert {suffix: whole.with_suffix(suffix).read_bytes() for suffix in (".md", ".png")} == own
    capsys.readouterr()
    (tmp_path / "bad.csv").write_text("not,a,results,file\n1,2,3,4\n")
    (tmp_path / "bad.json").write_text(whole.with_suffix(".json").read_text())
    assert cli.main(["--resume", str(tmp_path / "bad.csv")]) == 2
    assert capsys.readouterr().err.startswith(f"error: --resume {tmp_path / 'bad.csv'} is not a results CSV")


def test_the_figure_of_a_report_whose_baseline_is_incomplete_on_one_target_says_so():
    from sweeps.figures import draw_figure

    def row(target, mode, seed, acc):
        return RunResult(target, mode, seed, 200, 10, 0.3, acc, 1e-3, 0.4, True, 100)
    rows = [row(t, m, s, 0.8 + 0.01 * s + (m == "finetuned") * 0.05) for t in ("even-odd", "fashion-mnist")
            for m in ("finetuned", "from_scratch") for s in (0, 1, 2)]
    rows = [r for r in rows if (r.target, r.mode) != ("even-odd", "from_scratch")]  # its seeds stayed out
    figure = draw_figure(rows)
    panels = {ax.get_title(): ax for ax in figure.axes}
    assert "fashion-mnist: minus from_scratch" in panels  # the complete target's differences
    said = [text.get_text() for ax in figure.axes for text in ax.texts]
    assert said == ["even-odd: no complete from_scratch to pair with"]


def test_the_settings_record_what_made_the_rows_and_resume_refuses_a_mismatch(grid_sweep, tmp_path, capsys):
    args, _ = grid_sweep
    run = args[:-4] + ["--lr-grid", "1.2345678e-4", "3e-3", "--log-dir", str(tmp_path / "logs")]
    csv_path = tmp_path / "r.csv"
    assert cli.main(run + ["--results-csv", str(csv_path)]) == 0
    settings = json.loads(csv_path.with_suffix(".json").read_text())
    made = settings["made_by"]
    assert made["threads"] == 1 and made["accelerator"] == "cpu" and made["torch"].startswith("2.")
    assert {"code_sha256", "script_sha256", "torchvision", "lightning", "ray"} <= made.keys()
    checkpoint = csv_path.parent / settings["checkpoints"]["0"]["path"]
    assert settings["checkpoints"]["0"]["sha256"] == resume.sha256(checkpoint.read_bytes())
    # every rate is kept exactly, so every finished row is recognised: nothing runs again
    assert {r["learning_rate"] for r in read_csv(csv_path) if r["mode"] != "pretrain"} == {"0.00012345678", "0.003"}
    before = csv_path.read_bytes()
    assert cli.main(["--resume", str(csv_path), "--workers", "1"]) == 0 and csv_path.read_bytes() == before
    capsys.readouterr()
    # another version of the code above the reporting section
    settings["made_by"]["code_sha256"] = "0" * 64
    csv_path.with_suffix(".json").write_text(json.dumps(settings))
    assert cli.main(["--resume", str(csv_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "made otherwise (the code that makes the rows 000000000000, here " in err and len(err.splitlines()) == 1
    # a backbone rewritten by another sweep
    settings["made_by"]["code_sha256"] = made["code_sha256"]
    csv_path.with_suffix(".json").write_text(json.dumps(settings))
    checkpoint.write_bytes(checkpoint.read_bytes() + b"\0")
    assert cli.main(["--resume", str(csv_path)]) == 2
    assert "has changed since it was written" in capsys.readouterr().err


def test_resume_keeps_the_sweep_s_threads_whatever_workers_says(tmp_path):
    csv_path = tmp_path / "r.csv"
    csv_path.write_text(",".join(tm.RESULT_COLUMNS) + "\n")  # stopped in its first pretraining
    resume.save_settings(sweep_settings(["--seeds", "2", "--workers", "2"]), str(csv_path), {0: str(tmp_path / "x.ckpt")},
                         {"threads": 1})
    resumed, _ = resume.resume_settings(sweep_settings(["--resume", str(csv_path), "--workers", "1"]),
                                        {"resume", "workers"})
    assert resumed.workers == 1 and settings.run_threads(resumed) == 1  # not torch's own, as a 1-worker sweep's


def test_a_diverged_run_keeps_its_first_epoch_and_a_grid_never_picks_it():
    def no_trainer_to_log_to(*args, **kwargs):
        pass

    module = tm.LitModule(("a", "b"), 1e-3)
    module.log_dict = no_trainer_to_log_to
    for epoch, loss in enumerate([math.nan, 0.7, math.nan, 0.5], start=1):
        module.sums["val"], module.counts["val"] = torch.tensor([loss, 0.0]), 1
        module.epochs_before = epoch - 1  # without a trainer, the epoch is this plus 1
        module.log_epoch("val")
        if epoch == 1:
            assert module.best_state is not None and module.best_epoch == 1
    assert module.best_loss == 0.5 and module.best_epoch == 4
    rows = [runs.RunResult("t", "m", 0, 20, 1, 0.1, 0.9, rate, loss, True, 5) for rate, loss in [(1e-3, 0.4), (1e-2, math.nan)]]
    assert [r.selected for r in selection.select_rates(rows)] == [True, False]


def test_an_early_write_error_is_one_line(grid_sweep, tmp_path, capsys):
    args, _ = grid_sweep
    (tmp_path / "r.json").mkdir()  # where the settings go
    assert cli.main(args + ["--log-dir", str(tmp_path / "logs"), "--results-csv", str(tmp_path / "r.csv")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: cannot write {tmp_path / 'r.json'}") and len(err.splitlines()) == 1
    assert not (tmp_path / "r.csv").exists()


# ---- Ray ----------------------------------------------------------------------------------
def test_run_devices_hide_the_gpus_from_a_run_that_ray_gave_none(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    assert ray_engine.run_devices(sweep_settings(["--accelerator", "auto"]), [0]).accelerator == "auto"
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert ray_engine.run_devices(sweep_settings(["--accelerator", "gpu"]), []).accelerator == "cpu"
    assert os.environ["CUDA_VISIBLE_DEVICES"] == ""


def test_workers_start_their_own_instance_and_read_a_lambda_target_once(tiny_data, tmp_path, monkeypatch,
                                                                        tail_ray_log):
    root, _ = tiny_data
    # what `ray start` leaves behind: an address file and a RAY_ADDRESS pointing to nothing
    raytmp = Path(tempfile.mkdtemp(dir="/tmp"))  # short: Ray's socket paths live below it
    (raytmp / "ray").mkdir()
    (raytmp / "ray" / "ray_current_cluster").write_text("127.0.0.1:6391")
    monkeypatch.setenv("RAY_TMPDIR", str(raytmp))
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6391")
    monkeypatch.setitem(tm.TARGETS, "recorded", tm.Target(torchvision.datasets.MNIST, ("even", "odd"),
                                                          relabel=recorder(tmp_path / "reads")))
    args = ["--data-dir", str(root), "--n-pretrain", "40", "--n-train", "20", "--pretrain-epochs", "1",
            "--train-epochs", "2", "--accelerator", "cpu", "--targets", "recorded", "--modes", "finetuned",
            "--seeds", "4", "--lr-grid", "1e-3", "1e-2", "--threads", "1"]
    tails = []  # a `tail -f` of the session's log, started while the sweep runs
    watcher = threading.Thread(target=lambda: tails.append(tail_ray_log(raytmp / "ray")))
    watcher.start()
    assert cli.main(args + ["--workers", "2", "--log-dir", str(tmp_path / "a")]) == 0
    watcher.join()
    assert tails[0] is not None and tails[0].poll() is None  # the sweep's clean-up spared it
    assert os.environ["RAY_task_oom_retries"] == str(ray_engine.RETRIES)  # the memory monitor's retries are bounded
    reads = [line.split()[0] for line in (tmp_path / "reads").read_text().splitlines()]
    per_worker = {pid: reads.count(pid) for pid in set(reads) if pid != str(os.getpid())}
    assert 0 < len(per_worker) < 8  # 8 runs, fewer worker processes: some ran several
    assert all(n == 2 for n in per_worker.values()), per_worker  # the train and test split, once per worker


# a killed agent makes the raylet exit and Ray end the driver at once, without a word: the watch says it.
# A driver killed from outside takes its raylet with it at once: the watch must not blame the raylet.
@pytest.mark.parametrize("victim", ["raylet/raylet", "ray::RuntimeEnvAgent", "the script"])
def test_a_local_ray_instance_that_dies_ends_the_sweep_in_one_line_and_spares_other_processes(victim, tiny_args,
                                                                                               tmp_path, tail_ray_log):
    args = [a if a != "3" else "400" for a in tiny_args]
    log = tmp_path / "stderr.log"
    raytmp = Path(tempfile.mkdtemp(dir="/tmp"))  # short: Ray's socket paths live below it
    process = subprocess.Popen([*SWEEPS, *args, "--targets", "even-odd",
                                "--modes", "finetuned", "--lr-grid", "1e-3", "1e-2", "3e-2", "--patience", "0",
                                "--results-csv", str(tmp_path / "r.csv"), "--workers", "2", "--threads", "1"],
                               stdout=subprocess.DEVNULL, stderr=log.open("w"), cwd=tmp_path, start_new_session=True,
                               env={**os.environ, "RAY_TMPDIR": str(raytmp)})
    tail = tail_ray_log(raytmp)  # names the session, was not started by it
    assert wait_for(lambda: len([line for line in session_processes(process.pid) if "ray::run_remote" in line]) == 2)
    if victim == "the script":
        os.kill(process.pid, signal.SIGKILL)
        assert process.wait(timeout=60) == -signal.SIGKILL
        what = f"the script (PID {process.pid}) was ended from outside; its local Ray instance is stopped"
    else:
        os.kill(int([line for line in session_processes(process.pid) if victim in line][0].split()[0]), signal.SIGKILL)
        assert process.wait(timeout=60) == 1
        what = f"the local Ray instance stopped under the script: its {victim.split('/')[-1].removeprefix('ray::')} " \
               "process died"
    assert wait_for(lambda: not session_processes(process.pid), 10), session_processes(process.pid)  # the watch too
    err = log.read_text()
    assert f"error: {what}; the finished runs are in {tmp_path / 'r.csv'}; to go on: python -m sweeps --resume" \
           in err and "Traceback" not in err, err
    assert err.count("error:") == 1, err
    assert [r["mode"] for r in read_csv(tmp_path / "r.csv")] == ["pretrain"]
    assert tail.poll() is None  # the clean-up left it alone
