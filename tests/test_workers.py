"""Target runs in worker processes: the same numbers as one process, and clean failures. Tiny data."""

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import transfer_mnist as tm

REPO = Path(__file__).resolve().parent.parent


def read_csv(path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def workers_of(pid: int) -> list[int]:
    """The worker processes that `pid` spawned (Linux /proc), not multiprocessing's resource tracker."""
    found = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line)
            command = (status.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if fields.get("PPid", "").strip() == str(pid) and b"spawn_main" in command and alive(int(fields["Pid"])):
            found.append(int(fields["Pid"]))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text().split("State:\t")[1][:1]
    except (OSError, IndexError):
        return False
    return state != "Z"


def wait_for(condition, seconds: float = 180) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


def test_two_workers_give_the_rows_of_one_process(tiny_args, tmp_path):
    args = tiny_args + ["--targets", "even-odd", "fashion-mnist", "--modes", "finetuned", "lp_ft", "--seeds", "2",
                        "--lr-grid", "1e-3", "1e-2", "--threads", "1"]
    assert tm.main(args + ["--workers", "1", "--results-csv", str(tmp_path / "one.csv")]) == 0
    assert tm.main(args + ["--workers", "2", "--results-csv", str(tmp_path / "two.csv")]) == 0
    assert len(read_csv(tmp_path / "one.csv")) == 1 + 2 * 2 * 2 * 2
    # every row bit for bit, in the same order, however the runs finished; so the summary too
    assert (tmp_path / "two.csv").read_bytes() == (tmp_path / "one.csv").read_bytes()
    assert (tmp_path / "two.md").read_bytes() == (tmp_path / "one.md").read_bytes()
    assert (tmp_path / "logs" / "fashion-mnist" / "lp_ft" / "version_1" / "n20_seed1_lr0.01").is_dir()


def start(tiny_args, tmp_path, *extra) -> tuple[subprocess.Popen, Path, Path]:
    results, log = tmp_path / "r.csv", tmp_path / "stderr.log"
    args = [a if a != "3" else "400" for a in tiny_args]  # target runs of a few seconds each
    process = subprocess.Popen([sys.executable, str(REPO / "transfer_mnist.py"), *args, "--results-csv", str(results),
                                "--workers", "2", "--threads", "1", *extra],
                               stdout=subprocess.DEVNULL, stderr=log.open("w"), cwd=tmp_path,
                               start_new_session=True)  # its own process group, as a terminal gives it
    return process, results, log


def test_ctrl_c_stops_every_worker_and_keeps_finished_rows(tiny_args, tmp_path):
    process, results, log = start(tiny_args, tmp_path, "--targets", "even-odd", "--seeds", "3")
    assert wait_for(lambda: "in 2 worker processes" in log.read_text() and len(workers_of(process.pid)) >= 2), \
        log.read_text()
    workers = workers_of(process.pid)
    assert wait_for(lambda: log.read_text().count("training images, seed") >= 2)  # both workers are training
    time.sleep(1)
    os.killpg(process.pid, signal.SIGINT)  # Ctrl-C in a terminal: the parent and every worker get it
    stopped = time.monotonic()
    code = process.wait(timeout=60)
    err = log.read_text()
    assert code == 130 and time.monotonic() - stopped < 10, err
    assert "Interrupted" in err and "Traceback" not in err, err
    assert not [pid for pid in workers if alive(pid)]
    assert [r["mode"] for r in read_csv(results)][0] == "pretrain"


def test_a_worker_that_dies_fails_the_experiment_and_names_its_run(tiny_args, tmp_path):
    process, results, log = start(tiny_args, tmp_path, "--targets", "even-odd", "--seeds", "4")
    assert wait_for(lambda: results.exists() and len(read_csv(results)) >= 2), log.read_text()  # a target row is in
    finished = read_csv(results)
    workers = workers_of(process.pid)
    assert len(workers) == 2
    os.kill(workers[0], signal.SIGKILL)  # as the out-of-memory killer would
    code = process.wait(timeout=60)
    err = log.read_text()
    (line,) = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 1 and "Traceback" not in err, err
    assert "a worker process died (exit code -9) while running even-odd/" in line and "seed" in line
    assert not [pid for pid in workers if alive(pid)]
    assert read_csv(results)[: len(finished)] == finished  # the rows that had finished stay
