"""Runs on Ray: a local instance for --workers, or the cluster at --cluster. The template and this
package reach the workers as modules (py_modules), the backbones through the object store; the
rows come back to the driver, which alone writes them. Imported by engine only; it imports
settings, runs, resume, stop, watch and the template, and Ray only once a sweep asks for it (a
one-process sweep runs without Ray installed)."""

import argparse
import gc
import logging
import os
import signal
import subprocess
import sys
import threading

import torch

import sweeps
import transfer_mnist as tm
from sweeps import watch
from sweeps.resume import machine, resume_hint
from sweeps.runs import execute
from sweeps.settings import ExperimentFailure, one_line, quiet_libraries
from sweeps.stop import StopSignal

logger = tm.logger  # the experiment's console, as the template's

# A run whose worker process dies (killed, out of memory, its node lost) runs again, at most
# this many times, whatever killed it (Ray's memory monitor too): the same seed gives the same
# row. An exception inside a run is not retried: a bug or bad input.
RETRIES = 2


def gpus_per_run(cfg):
    """--gpus-per-run; by default, on a GPU accelerator, a GPU shared by --workers runs (0
    elsewhere)."""
    if cfg.gpus_per_run is not None:
        return cfg.gpus_per_run
    on_gpu = cfg.accelerator in ("gpu", "cuda") or (
        cfg.accelerator == "auto" and torch.cuda.is_available()
    )
    return 1 / cfg.workers if on_gpu else 0.0


def run_devices(cfg, gpu_ids):
    """A run's settings on the devices Ray gave it. Ray shows a task only the GPUs it was given,
    but leaves every GPU visible to a task that asked for none: such a run is put on the CPU,
    its GPUs hidden."""
    if gpu_ids:
        return cfg
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    on_cpu = cfg.accelerator in ("auto", "gpu", "cuda")
    return argparse.Namespace(**{**vars(cfg), "accelerator": "cpu"}) if on_cpu else cfg


# in a worker process: registries by object id, unpickled once
RECEIVED = {}


def run_remote(cfg, registry, backbone, run, threads):
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


class RaySweep:
    """The runs as Ray tasks of `threads` CPUs and a share of a GPU each: on a local instance for
    --workers runs at a time, started and stopped here, or on the cluster at --cluster."""

    def __init__(self, cfg, threads, csv_path):
        self.cfg = cfg
        self.threads = threads
        self.gpus = gpus_per_run(cfg)
        self.ending = resume_hint(csv_path)
        self.slots = 1  # runs at a time on a local instance: its CPUs / threads
        self.own = {}  # a local instance's processes: PID -> (start, title)
        self.watch = None

    def __enter__(self):
        # Ray's memory monitor retries the runs it kills without limit unless told (its own
        # count, beside max_retries); the driver owns the tasks, so this holds on a cluster too
        os.environ.setdefault("RAY_task_oom_retries", str(RETRIES))
        import ray

        self.ray = ray
        self.start()
        resources = ray.cluster_resources()
        if self.gpus and not resources.get("GPU"):
            self.__exit__()
            raise tm.ExperimentError(
                f"--gpus-per-run {self.gpus:g}, but Ray has no GPU here; pass --gpus-per-run 0"
            )
        self.slots = int(resources["CPU"] // self.threads)
        # worker processes start now and import torch (seconds) while this process pretrains
        warm_up = ray.remote(quiet_libraries).options(num_cpus=self.threads)
        for _ in range(self.slots):
            warm_up.remote()
        cluster = self.cfg.cluster
        on = f"the Ray cluster at {cluster}" if cluster else "a local Ray instance"
        gpus = f" and {self.gpus:g} of a GPU" if self.gpus else ""
        logger.info(
            f"Target runs on {on}: {resources['CPU']:g} CPUs, {resources.get('GPU', 0):g} GPUs; "
            f"each run takes {self.threads} CPU(s) and torch thread(s){gpus}"
        )
        return self

    def start(self):
        """ray.init(): the cluster at --cluster, or a local instance of our own ("local", even
        where `ray start` runs or left its address behind), on loopback only, whose processes
        the watch (sweeps/watch.py) is given."""
        cfg = self.cfg
        options = {"address": cfg.cluster, "include_dashboard": False, "log_to_driver": False,
                   "logging_level": logging.ERROR,
                   "runtime_env": {"py_modules": [tm.__file__, os.path.dirname(sweeps.__file__)]}}
        if not cfg.cluster:
            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
            options.update(address="local", num_cpus=cfg.workers * self.threads,
                           num_gpus=torch.cuda.device_count() if self.gpus else 0)
        # The processes Ray starts inherit the signals blocked here. Ray blocks SIGINT in them,
        # so that a terminal's Ctrl-C is the driver's to handle; SIGTERM to the whole process
        # group (timeout, a batch scheduler) killed them before the driver could stop the
        # sweep, and Ray then ended the driver (exit 1)
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        before = set(watch.children(os.getpid()))
        try:
            self.ray.init(**options)
        # ConnectionError, or a ValueError/RuntimeError for an address Ray cannot use
        except Exception as err:
            raise tm.ExperimentError(
                f"cannot start Ray on {cfg.cluster or 'this machine'}: {one_line(err)}"
            ) from None
        finally:
            # ray.init() replaced the SIGTERM handler; one that came meanwhile arrives now
            StopSignal.install()
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        if cfg.cluster:
            return
        # what ray.init() started here, from Ray's own folder: nobody else's process
        ray_folder = os.path.dirname(self.ray.__file__)
        started = set(watch.children(os.getpid())) - before
        self.own = {pid: (watch.process_start(pid), watch.process_title(pid))
                    for pid in started if watch.runs_from(pid, ray_folder)}
        self.watch = subprocess.Popen([sys.executable, watch.__file__, self.ending,
                                       *map(str, self.own)], stdin=subprocess.PIPE)

    def __exit__(self, *exc_info):
        """Ray ends a job's tasks when its driver leaves. A local instance stops with its
        processes, SIGKILLed at once (watch.hasten), and the watch ends what they started,
        as a raylet or GCS that died leaves it running."""
        if self.watch is None:
            self.ray.shutdown()
            return
        stopped = threading.Event()
        hastener = threading.Thread(target=watch.hasten, args=(self.own, stopped))
        hastener.start()
        try:
            self.ray.shutdown()
        finally:
            stopped.set()
            hastener.join()
        self.watch.communicate(b"stopped")

    def run(self, jobs):
        """Each (run, backbone) of `jobs` as a Ray task: (run, result, backbone, where, node)
        here as each ends. A local instance gets no more runs than it runs at once, the rest
        wait here, in order; a cluster, which may grow, gets them all."""
        ray = self.ray
        cfg = self.worker_settings()
        # the targets and arms, registered at run time too; in a list: Ray passes the id
        names = [name for name in (cfg.source, *cfg.targets) if name in tm.TARGETS]
        targets = {name: tm.TARGETS[name] for name in names}
        registry = [ray.put((targets, {name: tm.ARMS[name] for name in cfg.modes}))]
        task = ray.remote(run_remote).options(num_cpus=self.threads, num_gpus=self.gpus,
                                              max_retries=RETRIES, retry_exceptions=False)
        stored = {}  # each backbone put into the object store once
        queue = list(jobs)
        pending = {}  # task -> its run
        while queue or pending:
            while queue and (cfg.cluster or len(pending) < self.slots):
                run, backbone = queue.pop(0)
                if backbone is not None and id(backbone) not in stored:
                    stored[id(backbone)] = ray.put(backbone)
                ref = task.remote(cfg, registry, stored.get(id(backbone)), run, self.threads)
                pending[ref] = run
            StopSignal.check()
            self.check_instance()
            # a second at most: Ctrl-C gets in
            for ref in ray.wait(list(pending), num_returns=1, timeout=1.0)[0]:
                run = pending.pop(ref)
                result, backbone, where, node = self.outcome(ref, run)
                yield run, result, backbone, f" on {where}", node

    def worker_settings(self):
        """The settings with absolute paths: a worker process does not start in this folder."""
        cfg = argparse.Namespace(**vars(self.cfg))
        cfg.data_dir = os.path.abspath(cfg.data_dir)
        cfg.log_dir = os.path.abspath(cfg.log_dir)
        if cfg.weights and os.path.isfile(cfg.weights):  # lenet reads its channels there
            cfg.weights = os.path.abspath(cfg.weights)
        return cfg

    def outcome(self, ref, run):
        """A finished task's (result, backbone, where, node); its failure as the sweep's."""
        ray = self.ray
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as err:  # inside the run: bad input, a full disk
            cause = err.cause
            raise (cause if isinstance(cause, (tm.ExperimentError, OSError)) else err) from None
        except ray.exceptions.RayError as err:  # its worker died every time, or the instance
            self.check_instance()
            if isinstance(err, ray.exceptions.LocalRayletDiedError):
                raise ExperimentFailure(watch.DIED.format("raylet")) from None
            raise ExperimentFailure(f"{run} failed {RETRIES + 1} times: its worker process died "
                                    f"({type(err).__name__})") from None

    def check_instance(self):
        """A local instance whose own process was killed or failed ends the sweep, naming it:
        it runs on but cannot run tasks. (One that exits with 0, as the raylet does when an
        agent dies, takes the driver with it: the watch names the agent.)"""
        ended = [(watch.exit_status(pid), title) for pid, (start, title) in self.own.items()
                 if watch.process_start(pid) != start]
        # killed by a signal first, then failed
        dead = sorted((status & 0x7F == 0, title) for status, title in ended if status)
        if dead:
            raise ExperimentFailure(watch.DIED.format(dead[0][1]))
