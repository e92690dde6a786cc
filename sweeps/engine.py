"""A sweep from start to end: pretrain (once, or once per seed), then every run of the plan, in this process
or on Ray (ray_engine), each row written as its run ends and its grid's choice made once the grid is
complete. Imported by cli; it imports settings, runs, stop, resume, ray_engine and the template."""

import argparse
import contextlib
import functools
import gc
import os
import time
from collections.abc import Callable

import torch

import transfer_mnist as tm
from sweeps.ray_engine import RaySweep
from sweeps.resume import Resumed
from sweeps.runs import (
    ResultsCsv,
    Run,
    RunResult,
    execute,
    learned,
    read_weights,
    pretrain_checkpoint,
    pretraining_rates,
    pretraining_runs,
    run_key,
    save_backbone,
    select_rates,
    selection_group,
    settled,
    still_improving,
    sweep_runs,
    widened_runs,
)
from sweeps.settings import backbone_seed, next_rate, run_threads, seeds
from sweeps.stop import StopSignal

logger = tm.logger  # the experiment's console, as the template's


def run_here(cfg: argparse.Namespace, jobs: dict, finished: Callable) -> None:
    """Each (run, backbone) of `jobs` in this process, one after the other; finished(key, result, backbone,
    where, node) may return more jobs, which run after these."""
    queue = dict(jobs)
    while queue:
        StopSignal.check()
        key = next(iter(queue))
        run, backbone = queue.pop(key)
        result, backbone = execute(cfg, run, backbone)
        queue.update(finished(key, result, backbone, "", None) or {})


def clock(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{seconds:02d}" if minutes >= 60 else f"{minutes}:{seconds:02d}"


class Progress:
    """The console's line for each finished run: [k/N], its numbers and seconds, the time since the first run
    began and an estimate of what is left: the mean seconds of the finished runs of each kind (pretraining,
    target run) times the runs of that kind left, shared among the workers. Target runs not yet timed are
    left out of the estimate, and the line says so."""

    def __init__(self, pretraining: int, target_runs: int, workers: int):
        self.left = {"pretraining": pretraining, "target run": target_runs}
        self.seconds: dict[str, list[float]] = {kind: [] for kind in self.left}
        self.total, self.workers, self.started = pretraining + target_runs, workers, time.monotonic()

    def add(self, target_runs: int) -> None:
        """Target runs that --widen added."""
        self.left["target run"] += target_runs
        self.total += target_runs

    def line(self, run, result: RunResult, where: str) -> str:
        kind = "pretraining" if run.mode == "pretrain" else "target run"
        self.left[kind] -= 1
        self.seconds[kind].append(result.seconds)
        done = self.total - sum(self.left.values())
        work = sum(sum(times) / len(times) * self.left[k] for k, times in self.seconds.items() if times)
        timed = any(self.left[k] for k, times in self.seconds.items() if times)
        untimed = [f"{n} {k}{'s' * (n > 1)} not yet timed" for k, n in self.left.items() if n and not self.seconds[k]]
        share = max(1, min(self.workers, sum(self.left.values())))
        estimate = "; ".join([f"about {clock(work / share)} left"] * timed + untimed) or "done"
        return (f"[{done}/{self.total}] {run.target}/{run.mode}: best epoch {result.best_epoch}, test loss "
                f"{result.test_loss:.4f}, test accuracy {result.test_acc:.4f} (n_train {run.n_train}, seed {run.seed}, "
                f"lr {run.learning_rate:g}), {result.seconds:.1f} s{where}; "
                f"{clock(time.monotonic() - self.started)} elapsed; {estimate}")


def plan_line(cfg: argparse.Namespace, pretraining: list[Run], todo: list[Run]) -> str:
    """What a sweep is about to run, in one line."""
    rates = "each arm at its own rate" if not cfg.lr_grid else f"rates {', '.join(f'{r:g}' for r in cfg.lr_grid)}"
    where = (f"on {cfg.workers} workers" if cfg.workers > 1 else "in this process") if not cfg.cluster \
        else f"on the Ray cluster at {cfg.cluster}"
    seed_list = sorted({run.seed for run in todo}) or [cfg.seed]
    patience = "" if cfg.pretrain_patience is None else f", ending {cfg.pretrain_patience} after the best"
    start = (f"{len(pretraining)} pretraining{'s' * (len(pretraining) != 1)} ({cfg.source}, {cfg.n_pretrain} "
             f"images, up to {cfg.pretrain_epochs} epochs{patience}) and" if not cfg.weights else
             f"from {cfg.backbone} with --weights {cfg.weights}, nothing pretrained:")
    return (f"Running {start} {len(todo)} target runs "
            f"({', '.join(cfg.targets)}; n_train {', '.join(map(str, cfg.n_train))}; {', '.join(cfg.modes)}; "
            + (f"seeds {seed_list[0]}-{seed_list[-1]}; " if len(seed_list) > 1 else "")
            + f"{rates}; up to {cfg.train_epochs} epochs) {where}; target runs start as their backbone is ready")


def run_experiment(cfg: argparse.Namespace, csv_out: ResultsCsv, resumed: Resumed | None = None,
                   on_pretrained: Callable[[int, str, dict | None], None] | None = None,
                   on_node: Callable[[Run, dict], None] | None = None,
                   on_widened: Callable[[Run], None] | None = None,
                   borrowed: Resumed | None = None) -> list[RunResult]:
    """Pretrain, then run every arm on every target, training-set size and seed, once per rate of --lr-grid,
    in this process or on Ray (--workers, --cluster). Rows go to the CSV as their runs finish; at the end
    the CSV holds them in the order of pretraining_runs() and sweep_runs() (a widened rate after its grid),
    whatever order they finished in. A resumed sweep skips the runs, pretraining included, that its CSV holds
    already, and runs the rates its grids were widened by. `borrowed`: another sweep's backbones
    (--backbones-from), whose pretraining rows are copied instead of pretraining.
    on_pretrained(seed, checkpoint, rates) is called once seed's backbone is written (or borrowed), with every
    pretraining rate's validation loss (None for one rate), before its row; on
    a cluster, on_node(run, node) with the node that made each row (its address, libraries and CPU), before
    the row; on_widened(run) for the first seed's run of each rate that --widen adds, before it starts."""
    pretraining, runs = pretraining_runs(cfg), sweep_runs(cfg)
    planned = len(runs)
    runs += widened_runs(cfg, resumed.widened if resumed else [])
    grids: dict[tuple, list[int]] = {}  # the runs among which one rate is selected
    for index, run in enumerate(runs):
        grids.setdefault(selection_group(run, cfg.select), []).append(index)
    earlier = {run_key(r): r for r in resumed.rows} if resumed else {}
    for r in borrowed.rows if borrowed else []:  # another sweep's backbones: their rows and digests, here first
        if run_key(r) in pretraining and run_key(r) not in earlier:
            if on_pretrained:
                on_pretrained(r.seed, borrowed.checkpoints[r.seed], None)
            csv_out.append(r)
            earlier[run_key(r)] = r
    done = {index: earlier[run] for index, run in enumerate(runs) if run in earlier}
    checkpoints = {**(borrowed.checkpoints if borrowed else {}), **(resumed.checkpoints if resumed else {})}
    backbones = {run.seed: tm.read_backbone(checkpoints[run.seed]) for run in pretraining if run in earlier}
    if cfg.weights:  # every pretrained arm starts from them, whatever its seed
        state = read_weights(cfg.backbone, cfg.weights, tm.resolve_network(cfg).channels)
        backbones = {backbone_seed(cfg, seed): state for seed in seeds(cfg)}
    block = {}  # a run's (target, n_train, seed, arm): the rows of its grid stay together, widened rates last
    for index, run in enumerate(runs):
        block.setdefault((run.target, run.n_train, run.seed, run.mode), index)

    def in_order() -> list[RunResult]:
        def place(i: int) -> tuple:
            return block[(runs[i].target, runs[i].n_train, runs[i].seed, runs[i].mode)], i >= planned, i
        return [earlier[run] for run in pretraining if run in earlier] + [done[i] for i in sorted(done, key=place)]

    def widen(group: tuple) -> dict:
        """--widen: the next rate beyond the edge where a complete grid's pick sits, as jobs: for every seed of
        a pooled group, for its seed alone with --select seed."""
        indices = grids[group]
        pick = next((done[i].learning_rate for i in indices if done[i].selected), None)
        rate = next_rate([runs[i].learning_rate for i in indices], pick) if cfg.widen and pick else None
        if rate is None:
            return {}
        picked = [done[i] for i in indices if done[i].selected]
        if cfg.select != "seed" and rate < pick and not settled(picked) and learned(picked, cfg.select):
            # no rate had settled by the ceiling (candidate_rates): a lower one would settle later still. A pick
            # that learned nothing (the rates above it diverge too) says nothing about the rates below it
            logger.warning(f"{group[0]}/{group[1]} n_train {group[2]}: not widened below {pick:g}, where "
                           f"{sum(map(still_improving, picked))} of {len(picked)} runs were still improving at "
                           f"the end of their budget: raise --train-epochs")
            return {}
        target, mode, n_train = group[:3]
        new = [Run(target, mode, seed, n_train, rate) for seed in sorted({runs[i].seed for i in indices})]
        if on_widened:  # before the runs: a resume runs them too
            on_widened(new[0])
        which = f"{target}/{mode} n_train {n_train}" + (f" seed {group[3]}" if len(group) > 3 else "")
        logger.info(f"{which}: the pick {pick:g} sits at an edge of the rates "
                    f"run ({', '.join(f'{r:g}' for r in sorted({runs[i].learning_rate for i in indices}))}); "
                    f"adding {rate:g} for {len(new)} seed{'s' * (len(new) > 1)}")
        jobs = {}
        for run in new:
            runs.append(run)
            indices.append(len(runs) - 1)
            block.setdefault((run.target, run.n_train, run.seed, run.mode), len(runs) - 1)
            jobs[len(runs) - 1] = (run, backbones[backbone_seed(cfg, run.seed)])
        progress.add(len(jobs))
        return jobs

    todo = {index: run for index, run in enumerate(runs) if index not in done}
    waiting: dict[int, dict] = {}  # backbone seed -> its target runs, submitted once that backbone exists
    for index, run in todo.items():
        waiting.setdefault(backbone_seed(cfg, run.seed), {})[index] = run
    progress = Progress(len({run.seed for run in pretraining} - backbones.keys()), len(todo), max(cfg.workers, 1))

    def ready(seed: int) -> dict:
        """Seed's target runs, as jobs with their backbone."""
        return {index: (run, backbones[seed]) for index, run in waiting.pop(seed, {}).items()}

    def pretrained(seed: int, results: list[RunResult], backbone: dict, where: str) -> dict:
        """Seed's pretraining grid is done: its backbone and row are the pick's; every rate's validation loss
        goes into the settings with the backbone."""
        pick = next(r for r in results if r.selected)
        checkpoint = pretrain_checkpoint(cfg, seed, pick.learning_rate)
        backbones[seed] = backbone
        if not os.path.isfile(checkpoint):  # pretrained on another node: keep it for --resume
            save_backbone(backbone, checkpoint)
        if on_pretrained:  # before the row: a resume that finds the row finds the backbone's digest too
            rates = {r.learning_rate: r.val_loss for r in results} if len(results) > 1 else None
            on_pretrained(seed, checkpoint, rates)
        earlier[run_key(pick)] = pick
        csv_out.append(pick)
        logger.info(progress.line(run_key(pick), pick, where))
        StopSignal.check()
        return ready(seed)

    def finished(index: int | Run, result: RunResult, backbone: dict | None, where: str,
                 node: dict | None) -> dict:
        """Every row goes to the CSV as its run finishes, `selected` false until its grid is complete; then
        the grid's choice is made and the CSV rewritten with it. A pretraining's target runs follow it."""
        results = result if isinstance(result, list) else [result]  # a pretraining grid: a row per rate
        if node and on_node and cfg.cluster:  # local workers run on this machine, which made_by records
            for r in results:
                on_node(run_key(r), node)
        if isinstance(index, Run):
            return pretrained(index.seed, results, backbone, where)
        done[index] = result
        group = selection_group(runs[index], cfg.select)
        grid = grids[group]
        complete = all(i in done for i in grid)
        result.selected = complete
        if complete and len(grid) > 1:
            select_rates([done[i] for i in grid], cfg.select)
            csv_out.rewrite(in_order())
        else:
            csv_out.append(result)
        logger.info(progress.line(runs[index], result, where))
        # Free the finished run now: Lightning's reference cycles keep its tensors until the cyclic
        # collector happens to run. Measured: without this, resident memory grew from 1.1 to 1.45 GB
        # over 24 runs (2.7 GB over 121). The objects alive before the first run are frozen (below).
        with StopSignal.deferred():
            gc.collect()
        return widen(group) if complete and len(grid) > 1 else {}

    if resumed:
        logger.info(f"Resuming {csv_out.path}: {len(done)} of {len(runs)} target runs and {len(backbones)} of "
                    f"{len(pretraining)} pretraining runs done, skipped; {len(todo)} target runs remain")
    logger.info(plan_line(cfg, [run for run in pretraining if run.seed not in backbones], list(todo.values())))
    threads = run_threads(cfg)
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(threads or torch_threads)  # pretraining too: the same --threads, the same numbers
    # The libraries' 440,000 objects, alive for good, are left out of each run's collection: 0.16 s a run
    # with them, under 0.01 s without (the widening test of fake runs: 21 s before, 2.6 s after)
    gc.collect()
    gc.freeze()
    try:
        # Ray starts first: a cluster that cannot be reached fails before pretraining, not after it
        on_ray = cfg.workers > 1 or cfg.cluster
        with RaySweep(cfg, threads, csv_out.path) if on_ray else contextlib.nullcontext() as engine:
            run_all = engine.run if engine is not None else functools.partial(run_here, cfg)
            # pretraining first (keyed by its Run), each seed's target runs (by index) once its backbone exists
            first = pretraining_rates(cfg)[0]  # a seed's pretraining grid is one job
            jobs = {run: (run, None) for run in pretraining if run.seed not in backbones and run.learning_rate == first}
            for seed in list(backbones):
                jobs.update(ready(seed))
            for group, grid in list(grids.items()):  # grids an earlier invocation completed: widened if they need it
                if len(grid) > 1 and all(i in done for i in grid):
                    select_rates([done[i] for i in grid], cfg.select)
                    jobs.update(widen(group))
            run_all(jobs, finished)
    finally:
        gc.unfreeze()
        torch.set_num_threads(torch_threads)
    for grid in grids.values():  # grids completed by rows of an earlier, interrupted invocation too
        select_rates([done[i] for i in grid], cfg.select)
    results = in_order()
    csv_out.rewrite(results)
    return results
