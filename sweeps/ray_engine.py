"""Runs on Ray: a local instance for --workers, or the cluster at --cluster. The template and this
package reach the workers as modules (py_modules), the backbones through the object store; the
rows come back to the driver, which alone writes them. Imported by engine only; it imports Ray
only once a sweep asks for it (a one-process sweep runs without Ray installed)."""

import argparse
import contextlib
import gc
import logging
import json
import os
import signal
import subprocess
import sys
import threading
import time
import typing
from collections.abc import Iterator

import torch

import sweeps
import transfer_mnist as tm
from sweeps import watch
from sweeps.resume import machine, resume_hint
from sweeps.runs import RunResult, execute
from sweeps.settings import ExperimentFailure, one_line, quiet_libraries
from sweeps.stop import StopSignal

logger = tm.logger  # the experiment's console, as the template's

# A run whose worker process dies (killed, out of memory, its node lost) runs again, at most
# this many times, whatever killed it (Ray's memory monitor too): the same seed gives the same
# row. An exception inside a run is not retried: a bug or bad input.
RETRIES = 2


def gpus_per_run(cfg: argparse.Namespace) -> float:
    """--gpus-per-run; by default, on a GPU accelerator, a GPU shared by --workers runs (0
    elsewhere)."""
    if cfg.gpus_per_run is not None:
        return cfg.gpus_per_run
    on_gpu = cfg.accelerator in ("gpu", "cuda") or (
        cfg.accelerator == "auto" and torch.cuda.is_available()
    )
    return 1 / cfg.workers if on_gpu else 0.0


def run_devices(cfg: argparse.Namespace, gpu_ids: list) -> argparse.Namespace:
    """A run's settings on the devices Ray gave it. Ray shows a task only the GPUs it was given,
    but leaves every GPU visible to a task that asked for none: such a run is put on the CPU,
    its GPUs hidden."""
    if gpu_ids:
        return cfg
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    on_cpu = cfg.accelerator in ("auto", "gpu", "cuda")
    return argparse.Namespace(**{**vars(cfg), "accelerator": "cpu"}) if on_cpu else cfg


# in a worker process: registries by object id, unpickled once
RECEIVED: dict[str, tuple[dict, dict]] = {}


def run_remote(cfg: argparse.Namespace, registry: list, backbone: dict | None, run,
               threads: int) -> tuple[RunResult, dict | None, str, dict]:
    """One run in a Ray worker process (execute()); returns its row, its backbone if it pretrained
    one, where it ran (node, GPU) and its node: address, libraries and CPU (machine()).
    `registry` holds the object id of the driver's targets and arms: unpickled once per worker
    process, so a target's keep/relabel stays the same object and its data is read once
    (read_split's cache), not once per run."""
    import ray

    key = registry[0].hex()
    if key not in RECEIVED:
        RECEIVED[key] = ray.get(registry[0])
    # targets and arms registered at run time in the driver (image folders, say)
    tm.TARGETS.update(RECEIVED[key][0])
    tm.ARMS.update(RECEIVED[key][1])
    quiet_libraries()
    torch.set_num_threads(threads)
    gpus = ray.get_gpu_ids()
    result, backbone = execute(run_devices(cfg, gpus), run, backbone)
    gc.collect()
    where = f", GPU {', '.join(map(str, gpus))}" if gpus else ", CPU"
    address = ray.util.get_node_ip_address()
    return result, backbone, address + where, {"ip": address, **machine()}


class InstanceProcesses:
    """The processes that this invocation's local Ray instance started: the driver's children that
    ray.init() started (gcs_server, raylet, ...) and their descendants (the raylet's agents and
    workers), each seen alive in /proc with its start time. Looked at while the instance runs,
    so that processes which the death of their parent leaves behind are known too; nothing is
    found by name, and nobody else's process is ever in here. Each look is told to the watch
    (sweeps/watch.py), which outlives this process if Ray ends it."""

    def __init__(self, ending: str, own: set[int]):
        self.ending = ending
        self.seen: dict[str, list] = {}  # pid -> [start time, process title]
        self.own = own  # the instance's own processes: what ray.init() started here
        self.watch = subprocess.Popen([sys.executable, watch.__file__], stdin=subprocess.PIPE)

    def look(self) -> None:
        watch.family(sorted(self.own), self.seen)
        self.tell({"roots": sorted(self.own), "seen": self.seen, "ending": self.ending})

    def tell(self, message: dict) -> None:
        with contextlib.suppress(OSError):  # a watch that is gone has nothing to be told
            self.watch.stdin.write(json.dumps(message).encode() + b"\n")
            self.watch.stdin.flush()

    def dead(self) -> list[str]:
        """The instance's own processes (not its workers, which Ray replaces) that have died, the
        first to go named: one killed by a signal, else one that failed; an agent's death makes
        the raylet exit with 0, a raylet's takes its agents with it."""
        exited = {title: watch.exit_status(int(pid)) for pid, (start, title) in self.seen.items()
                  if int(pid) in self.own and watch.process_start(int(pid)) != start}
        agents = [title for pid, (start, title) in list(self.seen.items())
                  if watch.is_agent(title) and watch.process_start(int(pid)) != start]
        killed = [title for title, status in exited.items() if status is not None and status & 0x7F]
        failed = [title for title, status in exited.items() if status]
        for first in (killed, failed, agents, list(exited)):
            if first:
                return first
        return []

    def hasten(self, stopped: threading.Event) -> None:
        """Until `stopped`: SIGKILL each of the instance's own processes once it has a SIGTERM
        pending. They block SIGTERM (RaySweep.__enter__), so ray.shutdown()'s SIGTERM would only
        wait out a grace of a second per process before its SIGKILL."""
        own = {pid: watch.process_start(pid) for pid in self.own}
        while not stopped.wait(0.01):
            for pid, start in own.items():
                if watch.asked_to_stop(pid) and watch.process_start(pid) == start:
                    with contextlib.suppress(OSError):
                        os.kill(pid, signal.SIGKILL)

    def kill(self) -> None:
        """What the instance left running after its shutdown, then the watch, told that all is
        done."""
        watch.end(self.seen)
        self.tell({"done": True})
        with contextlib.suppress(OSError):
            self.watch.stdin.close()
        self.watch.wait()


class RaySweep:
    """The runs as Ray tasks of `threads` CPUs and a share of a GPU each: on a local instance for
    --workers runs at a time, started and stopped here, or on the cluster at --cluster."""

    def __init__(self, cfg: argparse.Namespace, threads: int, csv_path: str):
        self.cfg, self.threads, self.gpus = cfg, threads, gpus_per_run(cfg)
        self.ending = resume_hint(csv_path)
        self.pending: dict = {}  # task -> key of its run
        self.slots = 1  # runs at a time on a local instance: its CPUs / threads
        self.processes: InstanceProcesses | None = None
        self.looked = 0.0  # when the instance's processes were last looked at

    def __enter__(self) -> "RaySweep":
        cfg = self.cfg
        # a local instance binds to loopback only: a sweep opens no port on the network
        if not cfg.cluster:
            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        # Ray's memory monitor retries the runs it kills without limit unless told (its own
        # count, beside max_retries); the driver owns the tasks, so this holds on a cluster too
        os.environ.setdefault("RAY_task_oom_retries", str(RETRIES))
        import ray

        self.ray = ray
        self.start(ray)
        if self.processes:
            self.processes.look()
        resources = ray.cluster_resources()
        if self.gpus and not resources.get("GPU"):
            self.__exit__()
            raise tm.ExperimentError(
                f"--gpus-per-run {self.gpus:g}, but Ray has no GPU here; pass --gpus-per-run 0"
            )
        # Worker processes start now and import torch (seconds) while this process pretrains
        warm_up = ray.remote(quiet_libraries).options(num_cpus=self.threads)
        self.slots = int(resources["CPU"] // self.threads)  # runs at a time
        self.pending = {warm_up.remote(): None for _ in range(self.slots)}
        on = f"the Ray cluster at {cfg.cluster}" if cfg.cluster else "a local Ray instance"
        logger.info(
            f"Target runs on {on}: {resources['CPU']:g} CPUs, {resources.get('GPU', 0):g} GPUs; "
            f"each run takes {self.threads} "
            f"CPU(s) and torch thread(s)" + (f" and {self.gpus:g} of a GPU" if self.gpus else "")
        )
        return self

    def start(self, ray) -> None:
        """ray.init(): a local instance of our own, whose processes are
        noted, or the cluster at --cluster."""
        cfg = self.cfg
        quiet = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.ERROR,
                 "runtime_env": {"py_modules": [tm.__file__, os.path.dirname(sweeps.__file__)]}}
        # "local": a new instance of our own, even where `ray start` runs or left its address behind
        local = {"address": "local", "num_cpus": cfg.workers * self.threads,
                 "num_gpus": torch.cuda.device_count() if self.gpus else 0}
        # The processes Ray starts inherit the signals blocked here. Ray blocks SIGINT in them,
        # so that a terminal's Ctrl-C is the driver's to handle; SIGTERM to the whole process
        # group (timeout, a batch scheduler) killed them before the driver could stop the sweep,
        # and Ray then ended the driver (exit 1)
        blocked = (
            None if cfg.cluster else signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        )
        before = set(watch.children(os.getpid()))
        try:
            ray.init(**({"address": cfg.cluster} if cfg.cluster else local), **quiet)
        # ConnectionError, or a ValueError/RuntimeError for an address Ray cannot use
        except Exception as err:
            raise tm.ExperimentError(
                f"cannot start Ray on {cfg.cluster or 'this machine'}: {one_line(err)}"
            ) from None
        finally:
            # ray.init() replaced the SIGTERM handler; one that came meanwhile arrives now
            StopSignal.install()
            if blocked is not None:
                signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        if not cfg.cluster:  # what ray.init() started here, from Ray's own folder
            started = set(watch.children(os.getpid())) - before
            ray_folder = os.path.dirname(ray.__file__)
            own = {pid for pid in started if watch.runs_from(pid, ray_folder)}
            self.processes = InstanceProcesses(self.ending, own)

    def __exit__(self, *exc_info) -> None:
        # Ctrl-C or an error: nothing of this sweep keeps running on the cluster
        for task in self.pending:
            with contextlib.suppress(Exception):  # an instance that died has nothing left to cancel
                self.ray.cancel(task, force=True)
        if self.processes is None:
            self.ray.shutdown()
            return
        self.processes.look()
        stopped = threading.Event()
        hastener = threading.Thread(target=self.processes.hasten, args=(stopped,), daemon=True)
        hastener.start()
        try:
            self.ray.shutdown()  # a local instance stops with every process it started,
        finally:
            stopped.set()
            hastener.join()
        self.processes.kill()  # unless it lost its GCS or raylet: what they started outlives them

    def run(self, jobs: list[tuple]) -> Iterator[tuple]:
        """Each (run, backbone) of `jobs` as a Ray task: (run, result,
        backbone, where, node) here as each ends. A local instance gets no
        more runs than it runs at once, the rest wait here, in order; a
        cluster, which may grow, gets them all."""
        ray = self.ray
        cfg = self.worker_settings()
        registry = [ray.put(self.registry())]  # a list: Ray passes the id, not the value
        task = ray.remote(run_remote).options(num_cpus=self.threads, num_gpus=self.gpus,
                                              max_retries=RETRIES, retry_exceptions=False)
        stored: dict[int, typing.Any] = {}  # each backbone put into the object store once
        queue = list(jobs)
        self.pending = {}  # the warm-up tasks are not waited for
        while queue or self.pending:
            while queue and (cfg.cluster or len(self.pending) < self.slots):
                run, backbone = queue.pop(0)
                if backbone is not None and id(backbone) not in stored:
                    stored[id(backbone)] = ray.put(backbone)
                ref = task.remote(cfg, registry, stored.get(id(backbone)), run, self.threads)
                self.pending[ref] = run
            StopSignal.check()
            for ref in self.wait():
                run = self.pending.pop(ref)
                result, backbone, where, node = self.outcome(ref, run)
                yield run, result, backbone, f" on {where}", node

    def worker_settings(self) -> argparse.Namespace:
        """The settings with absolute paths: a worker process does not
        start in this folder."""
        cfg = argparse.Namespace(**vars(self.cfg))
        cfg.data_dir = os.path.abspath(cfg.data_dir)
        cfg.log_dir = os.path.abspath(cfg.log_dir)
        if cfg.weights and os.path.isfile(cfg.weights):  # lenet reads its channels there
            cfg.weights = os.path.abspath(cfg.weights)
        return cfg

    def registry(self) -> tuple[dict, dict]:
        """The targets and arms a sweep uses, registered at run time too."""
        cfg = self.cfg
        names = [name for name in (cfg.source, *cfg.targets) if name in tm.TARGETS]
        return {name: tm.TARGETS[name] for name in names}, {
            name: tm.ARMS[name] for name in cfg.modes
        }

    def outcome(self, ref, run) -> tuple:
        """A finished task's (result, backbone, where, node); its failure
        as the sweep's."""
        ray = self.ray
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as err:  # inside the run: bad input, a full disk
            raise (
                err.cause if isinstance(err.cause, (tm.ExperimentError, OSError)) else err
            ) from None
        except ray.exceptions.LocalRayletDiedError:
            self.check_instance()  # an agent's death, which took the raylet with it
            raise ExperimentFailure(self.died("raylet")) from None
        except ray.exceptions.RayError as err:  # its worker died every time
            self.check_instance()  # or the instance under it
            raise ExperimentFailure(f"{run} failed {RETRIES + 1} times: its worker process died "
                                    f"({type(err).__name__})") from None

    def wait(self) -> list:
        """The tasks that finished within a second (the timeout lets Ctrl-C in)."""
        self.check_instance()
        return self.ray.wait(list(self.pending), num_returns=1, timeout=1.0)[0]

    def check_instance(self) -> None:
        """A local instance that lost one of its processes ends the sweep, naming it: without its
        GCS, raylet or an agent it runs on but cannot run tasks or be shut down cleanly."""
        if self.processes is None:
            return
        # workers come and go; 2 s is 40 ms of /proc a minute
        if time.monotonic() - self.looked > 2:
            self.processes.look()
            self.looked = time.monotonic()
        dead = self.processes.dead()
        if dead:
            raise ExperimentFailure(self.died(", ".join(dict.fromkeys(dead))))

    def died(self, process: str) -> str:
        return f"the local Ray instance stopped under the script: its {process} process died"
