"""Sweeps on Ray: local workers and a two-node cluster give the rows of one process; faults, Ctrl-C,
GPU shares; and --resume. Tiny data; Ray stays on loopback (conftest.py sets
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0). The Ray tests are few: each starts Ray and imports torch in its
workers, seconds apiece."""

import csv
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torchvision
from conftest import SWEEPS, sweep_settings

import transfer_mnist as tm
from sweeps import cli, ray_engine, resume, runs

REPO = Path(__file__).resolve().parent.parent


def read_csv(path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def wait_for(condition, seconds: float = 180) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


def session_processes(sid: int) -> list[str]:
    """Processes still alive in a session (the script, Ray's processes, their workers)."""
    return subprocess.run(["pgrep", "-a", "-s", str(sid)], capture_output=True, text=True).stdout.splitlines()


def dies_once_in_a_worker(driver: int, marker: Path):
    """A relabel that kills the Ray worker process running it the first time (as the out-of-memory killer
    would), and maps digits to even/odd everywhere else. Nested: Ray sends it to the workers by value."""

    def parity(labels):
        if os.getpid() != driver and not marker.exists():
            marker.touch()
            os._exit(1)
        return labels % 2

    return parity


def recorder(path: Path):
    """A relabel (nested, so Ray sends it by value) that notes the worker process and the GPUs it sees."""

    def parity(labels):
        with open(path, "a") as f:
            f.write(f"{os.getpid()} {os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}\n")
        return labels % 2

    return parity


def seen_gpus(reads: Path) -> set[str]:
    """The CUDA_VISIBLE_DEVICES that worker processes saw, since the last call."""
    lines = reads.read_text().splitlines()
    reads.unlink()
    return {line.split(" ", 1)[1] for line in lines if line.split()[0] != str(os.getpid())}


@pytest.fixture(scope="module")
def sweep(tiny_data, tmp_path_factory):
    """A small grid sweep (1 seed, 2 arms, 2 rates: 4 target runs) on a target whose first Ray worker dies,
    and its rows from one process."""
    root, _ = tiny_data
    out = tmp_path_factory.mktemp("reference")
    tm.TARGETS["flaky"] = tm.Target(torchvision.datasets.MNIST, ("even", "odd"),
                                    relabel=dies_once_in_a_worker(os.getpid(), out / "died"))
    args = ["--data-dir", str(root), "--n-pretrain", "40", "--n-train", "20", "--pretrain-epochs", "2",
            "--train-epochs", "30", "--accelerator", "cpu", "--targets", "flaky",
            "--modes", "finetuned", "from_scratch", "--lr-grid", "1e-3", "1e-2", "--threads", "1"]
    assert cli.main(args + ["--log-dir", str(out / "logs"), "--results-csv", str(out / "one.csv")]) == 0
    yield args, out / "one.csv"
    del tm.TARGETS["flaky"]


def test_local_workers_and_a_two_node_cluster_give_the_rows_of_one_process_and_leave_gpus_alone(
        sweep, tmp_path, caplog, monkeypatch):
    from ray.cluster_utils import Cluster

    args, one = sweep
    with caplog.at_level(logging.INFO, logger="transfer_mnist"):
        assert cli.main(args + ["--workers", "2", "--log-dir", str(tmp_path / "local"),
                               "--results-csv", str(tmp_path / "local.csv")]) == 0
    assert (one.parent / "died").exists()  # a worker died in a run: Ray ran it again, with the same row
    assert (tmp_path / "local.csv").read_bytes() == one.read_bytes()
    assert (tmp_path / "local.md").read_bytes() == one.with_suffix(".md").read_bytes()
    assert "Target runs on a local Ray instance: 2 CPUs, 0 GPUs; each run takes 1 CPU(s) and torch thread(s)" \
        in caplog.messages
    finished = [m for m in caplog.messages if m.startswith("[") and "/pretrain" not in m]
    assert len(finished) == 4 and all(" s on 127.0.0.1, CPU; " in m for m in finished)  # loopback only
    assert (tmp_path / "local" / "flaky" / "from_scratch" / "version_0" / "n20_seed0_lr0.01").is_dir()

    # two nodes of one CPU and one logical GPU each
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1, num_gpus=1)
        caplog.clear()
        monkeypatch.setitem(tm.TARGETS, "flaky", tm.Target(torchvision.datasets.MNIST, ("even", "odd"),
                                                           relabel=recorder(tmp_path / "reads")))
        # a quarter of a GPU per run: runs share a GPU, and say which they had
        with caplog.at_level(logging.INFO, logger="transfer_mnist"):
            assert cli.main(args + ["--cluster", cluster.address, "--gpus-per-run", "0.25", "--log-dir",
                                   str(tmp_path / "cluster"), "--results-csv", str(tmp_path / "cluster.csv")]) == 0
        assert (tmp_path / "cluster.csv").read_bytes() == one.read_bytes()
        assert seen_gpus(tmp_path / "reads") == {"0"}  # a run sees the GPU Ray gave it, that one only
        assert f"Target runs on the Ray cluster at {cluster.address}: 2 CPUs, 2 GPUs; each run takes 1 CPU(s) and " \
               f"torch thread(s) and 0.25 of a GPU" in caplog.messages
        finished = [m for m in caplog.messages if m.startswith("[") and "/pretrain" not in m]
        assert len(finished) == 4 and all(", GPU 0; " in m for m in finished)
        # each row's node (the pretraining's too), with its CPU and libraries
        settings = json.loads((tmp_path / "cluster.json").read_text())
        assert len(settings["row_nodes"]) == 5 and set(settings["row_nodes"].values()) == {"127.0.0.1"}
        assert settings["nodes"]["127.0.0.1"]["cpu"] == resume.cpu_kind()
        # no GPU from Ray: none visible, though the node has one
        assert cli.main(args + ["--modes", "finetuned", "--lr-grid", "1e-3", "--cluster", cluster.address,
                               "--gpus-per-run", "0", "--log-dir", str(tmp_path / "none")]) == 0
        assert seen_gpus(tmp_path / "reads") == {""}
    finally:
        cluster.shutdown()


def test_gpu_shares_default_to_the_workers_on_a_gpu_accelerator():
    assert ray_engine.gpus_per_run(sweep_settings(["--workers", "4", "--accelerator", "gpu"])) == 0.25
    assert ray_engine.gpus_per_run(sweep_settings(["--workers", "4", "--accelerator", "cpu"])) == 0.0
    assert ray_engine.gpus_per_run(sweep_settings(["--workers", "4", "--accelerator", "gpu", "--gpus-per-run", "0.5"])) == 0.5
    with pytest.raises(SystemExit):
        sweep_settings(["--gpus-per-run", "1.5"])


def test_one_process_does_not_import_ray(tiny_args, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # any `import ray` now fails
    assert cli.main(tiny_args + ["--targets", "even-odd", "--modes", "finetuned"]) == 0


# SIGTERM, as timeout or a batch scheduler sends it; a terminal's Ctrl-C (SIGINT) is tested in one process
# (test_resume_and_stop), and Ray blocks it in its own processes
@pytest.mark.parametrize("signum", [signal.SIGTERM])
def test_a_signal_to_the_process_group_stops_the_script_and_its_ray_instance_keeping_finished_rows(
        signum, tiny_args, tmp_path, tail_ray_log):
    args = [a if a != "3" else "300" for a in tiny_args]  # runs of a few seconds each
    log = tmp_path / "stderr.log"
    raytmp = Path(tempfile.mkdtemp(dir="/tmp"))  # short: Ray's socket paths live below it
    process = subprocess.Popen([*SWEEPS, *args, "--targets", "even-odd",
                                "--modes", "finetuned", "--lr-grid", "1e-3", "1e-2", "--patience", "0",
                                "--results-csv", str(tmp_path / "r.csv"), "--workers", "2", "--threads", "1"],
                               stdout=subprocess.DEVNULL, stderr=log.open("w"), cwd=tmp_path,
                               start_new_session=True,  # its own process group and session, as a terminal gives it
                               env={**os.environ, "RAY_TMPDIR": str(raytmp)})
    tail = tail_ray_log(raytmp)  # names the session, was not started by it
    running = lambda: [line for line in session_processes(process.pid) if "ray::run_remote" in line]  # noqa: E731
    assert wait_for(lambda: len(running()) == 2), log.read_text()
    os.killpg(process.pid, signum)  # the script and every process of its Ray instance get it
    stopped = time.monotonic()
    code = process.wait(timeout=60)
    err = log.read_text()
    assert code == 128 + signum and time.monotonic() - stopped < 15, err
    assert "Interrupted" in err and "Traceback" not in err, err
    assert wait_for(lambda: not session_processes(process.pid), 5), session_processes(process.pid)
    assert [r["mode"] for r in read_csv(tmp_path / "r.csv")] == ["pretrain"]  # the finished row stays
    assert tail.poll() is None  # the clean-up left it alone


def test_a_run_that_keeps_dying_ends_the_sweep_and_bad_input_is_not_retried(sweep, tmp_path, monkeypatch, capsys):
    args, _ = sweep
    driver, attempts = os.getpid(), tmp_path / "attempts"
    monkeypatch.setattr(ray_engine, "RETRIES", 1)  # a retry is a new worker process: seconds each
    monkeypatch.setenv("RAY_task_oom_retries", "1")

    def dies_in_workers(labels):  # nested: Ray sends it by value to the workers
        if os.getpid() != driver:
            os._exit(1)
        return labels % 2

    monkeypatch.setitem(tm.TARGETS, "flaky", tm.Target(torchvision.datasets.MNIST, ("even", "odd"),
                                                       relabel=dies_in_workers))
    one_run = args + ["--modes", "finetuned", "--lr-grid", "1e-3", "--workers", "2"]
    assert cli.main(one_run + ["--log-dir", str(tmp_path / "a"), "--results-csv", str(tmp_path / "a.csv")]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (f"error: flaky/finetuned n_train 20 seed 0 lr 0.001 failed {ray_engine.RETRIES + 1} times: its worker "
                   f"process died (WorkerCrashedError); the finished runs are in {tmp_path / 'a.csv'}; to go on: "
                   f"python -m sweeps --resume {tmp_path / 'a.csv'}")
    assert [r["mode"] for r in read_csv(tmp_path / "a.csv")] == ["pretrain"]

    def damaged_in_workers(labels):
        if os.getpid() != driver:
            with open(attempts, "a") as f:
                f.write("x")
            raise tm.ExperimentError("image folder x/train: cannot identify image file x/train/a/3.png")
        return labels % 2

    monkeypatch.setitem(tm.TARGETS, "flaky", tm.Target(torchvision.datasets.MNIST, ("even", "odd"),
                                                       relabel=damaged_in_workers))
    assert cli.main(one_run + ["--log-dir", str(tmp_path / "b"), "--results-csv", str(tmp_path / "b.csv")]) == 2
    assert capsys.readouterr().err.strip() == "error: image folder x/train: cannot identify image file x/train/a/3.png"
    assert attempts.read_text() == "x"  # tried once: bad input is not retried
    assert [r["mode"] for r in read_csv(tmp_path / "b.csv")] == ["pretrain"]


# ---- --resume -----------------------------------------------------------------------------
def test_an_interrupted_sweep_resumes_to_the_uninterrupted_result(sweep, tmp_path, monkeypatch, capsys, caplog):
    args, one = sweep
    calls, train = [], tm.train

    def interrupted_after_two(*a, **kw):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append((a[2].target, a[1]))
        return train(*a, **kw)

    monkeypatch.setattr(tm, "train", interrupted_after_two)
    run = args + ["--log-dir", str(tmp_path / "logs"), "--results-csv", str(tmp_path / "r.csv")]
    assert cli.main(run) == 130
    assert len(read_csv(tmp_path / "r.csv")) == 1 + 2  # pretraining and one finished grid of two rates
    assert (tmp_path / "r.json").is_file()  # the settings, saved at the start

    def no_pretraining(*args):
        raise AssertionError("a resumed sweep pretrained again")

    monkeypatch.setattr(tm, "pretrain", no_pretraining)
    monkeypatch.setattr(tm, "train", lambda *a, **kw: calls.append((a[2].target, a[1])) or train(*a, **kw))
    with caplog.at_level(logging.INFO, logger="transfer_mnist"):
        assert cli.main(["--resume", str(tmp_path / "r.csv")]) == 0  # alone: the saved settings
    assert calls[2:] == [("flaky", "from_scratch")] * 2  # only the missing runs
    assert f"Resuming {tmp_path / 'r.csv'}: 2 of 4 target runs and 1 of 1 pretraining runs done, skipped; " \
           f"2 target runs remain" in caplog.messages
    for suffix in (".csv", ".md", ".png"):
        assert (tmp_path / "r").with_suffix(suffix).read_bytes() == one.with_suffix(suffix).read_bytes(), suffix

    # the same command plus --resume: nothing left to run, the same files
    calls.clear()
    assert cli.main(run + ["--resume", str(tmp_path / "r.csv"), "--workers", "1"]) == 0
    assert calls == [] and (tmp_path / "r.csv").read_bytes() == one.read_bytes()

    # a setting that changes a run's numbers refuses, naming it
    capsys.readouterr()
    assert cli.main(run + ["--resume", str(tmp_path / "r.csv"), "--train-epochs", "31", "--seed", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --resume {tmp_path / 'r.csv'}: --seed 3 differs from the sweep's 0") and \
        "also differing: train_epochs" in err and len(err.splitlines()) == 1
    assert cli.main(["--resume", str(tmp_path / "missing.csv")]) == 2
    assert "cannot read the sweep's settings" in capsys.readouterr().err


def test_a_sweep_stopped_in_its_pretraining_leaves_nothing_and_starts_again(sweep, tmp_path, monkeypatch):
    args, one = sweep
    pretrain = tm.pretrain

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(tm, "pretrain", interrupted)
    run = args + ["--log-dir", str(tmp_path / "logs"), "--results-csv", str(tmp_path / "r.csv")]
    assert cli.main(run) == 130
    assert not list(tmp_path.iterdir())  # no empty CSV, no settings, no log version: nothing had finished
    monkeypatch.setattr(tm, "pretrain", pretrain)
    assert cli.main(run) == 0
    assert (tmp_path / "r.csv").read_bytes() == one.read_bytes()


class FakeRay:
    """What RaySweep.run asks of Ray, in order: a task finishes when waited for, oldest first."""

    class exceptions:
        RayTaskError = LocalRayletDiedError = RayError = type("Never", (Exception,), {})

    def __init__(self):
        self.started: list = []  # runs in the order they were given to Ray
        self.results: dict = {}
        self.waited: list = []  # how many tasks were pending at each wait

    def put(self, value):
        return value

    def remote(self, function):
        fake = self

        class Task:
            def options(self, **options):
                return self

            def remote(self, cfg, registry, backbone, run, threads):
                ref = object()
                fake.started.append(run)
                fake.results[ref] = (runs.RunResult(run.target, run.mode, run.seed, run.n_train, 1, 0.1, 0.9,
                                                  run.learning_rate, 0.1, True, 1), {"w": 1}, "127.0.0.1, CPU", None)
                return ref
        return Task()

    def wait(self, refs, num_returns, timeout):
        self.waited.append(len(refs))
        return [refs[:1], refs[1:]]

    def get(self, ref):
        return self.results.pop(ref)


def test_a_phase_s_runs_go_to_ray_in_the_plan_s_order_no_more_at_once_than_it_runs(sweep):
    from sweeps.runs import Run

    args, _ = sweep
    cfg = cli.parse(args + ["--workers", "2"])[0]
    engine = ray_engine.RaySweep(cfg, 1, "r.csv")
    engine.ray, engine.slots = FakeRay(), 2
    jobs = [(Run("flaky", "finetuned", seed, 20, 1e-3), {"w": 1}) for seed in range(5)]
    ended = [run for run, *_ in engine.run(jobs)]
    # every run given to Ray once, in order; two at a time, the rest waiting here
    assert engine.ray.started == ended == [run for run, _ in jobs]
    assert max(engine.ray.waited) == 2
