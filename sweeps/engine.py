"""A sweep from start to end: pretrain (once, or once per seed), then every run of the plan, in this process
or on Ray (ray_engine), each row written as its run ends and its grid's choice made once the grid is
complete. Imported by cli; it imports settings, runs, stop, resume, ray_engine and the template."""

import argparse
import contextlib
import functools
import gc
import os
from collections.abc import Callable

import torch

import transfer_mnist as tm
from sweeps.ray_engine import RaySweep
from sweeps.resume import Resumed
from sweeps.runs import (
    ResultsCsv,
    RunResult,
    execute,
    pretrain_checkpoint,
    pretraining_runs,
    run_key,
    save_backbone,
    select_rates,
    selection_group,
    sweep_runs,
)
from sweeps.settings import backbone_seed, run_threads
from sweeps.stop import StopSignal

logger = tm.logger  # the experiment's console, as the template's


def run_here(cfg: argparse.Namespace, jobs: dict, finished: Callable) -> None:
    """Each (run, backbone) of `jobs` in this process, one after the other; finished(key, result, backbone)."""
    for key, (run, backbone) in jobs.items():
        StopSignal.check()
        result, backbone = execute(cfg, run, backbone)
        finished(key, result, backbone)
        logger.info(f"{result.target}/{result.mode}: best epoch {result.best_epoch}, test loss {result.test_loss:.4f}, "
                    f"test accuracy {result.test_acc:.4f}, {result.seconds:.1f} s")


def run_experiment(cfg: argparse.Namespace, csv_out: ResultsCsv, resumed: Resumed | None = None,
                   on_pretrained: Callable[[int, str], None] | None = None) -> list[RunResult]:
    """Pretrain, then run every arm on every target, training-set size and seed, once per rate of --lr-grid,
    in this process or on Ray (--workers, --cluster). Rows go to the CSV as their runs finish; at the end
    the CSV holds them in the order of pretraining_runs() and sweep_runs(), whatever order they finished
    in. A resumed sweep skips the runs, pretraining included, that its CSV holds already.
    on_pretrained(seed, checkpoint) is called once seed's backbone is written, before its row."""
    pretraining, runs = pretraining_runs(cfg), sweep_runs(cfg)
    grids: dict[tuple, list[int]] = {}  # the runs among which one rate is selected
    for index, run in enumerate(runs):
        grids.setdefault(selection_group(run, cfg.select), []).append(index)
    earlier = {run_key(r): r for r in resumed.rows} if resumed else {}
    done = {index: earlier[run] for index, run in enumerate(runs) if run in earlier}
    backbones = {run.seed: tm.read_backbone(resumed.checkpoints[run.seed]) for run in pretraining if run in earlier}

    def in_order() -> list[RunResult]:
        return [earlier[run] for run in pretraining if run in earlier] + [done[i] for i in sorted(done)]

    def pretrained(seed: int, result: RunResult, backbone: dict) -> None:
        earlier[run_key(result)], backbones[seed] = result, backbone
        if not os.path.isfile(pretrain_checkpoint(cfg, seed)):  # pretrained on another node: keep it for --resume
            save_backbone(backbone, pretrain_checkpoint(cfg, seed))
        if on_pretrained:  # before the row: a resume that finds the row finds the backbone's digest too
            on_pretrained(seed, pretrain_checkpoint(cfg, seed))
        csv_out.append(result)
        StopSignal.check()

    def finished(index: int, result: RunResult, _=None) -> None:
        """Every row goes to the CSV as its run finishes, `selected` false until its grid is complete; then
        the grid's choice is made and the CSV rewritten with it."""
        done[index] = result
        grid = grids[selection_group(runs[index], cfg.select)]
        complete = all(i in done for i in grid)
        result.selected = complete
        if complete and len(grid) > 1:
            select_rates([done[i] for i in grid], cfg.select)
            csv_out.rewrite(in_order())
        else:
            csv_out.append(result)
        # Free the finished run now: Lightning's reference cycles keep its tensors until the cyclic
        # collector happens to run. Measured: without this, resident memory grew from 1.1 to 1.45 GB
        # over 24 runs (2.7 GB over 121); each collection takes 0.16 s.
        with StopSignal.deferred():
            gc.collect()

    todo = {index: run for index, run in enumerate(runs) if index not in done}
    if resumed:
        logger.info(f"Resuming {csv_out.path}: {len(done)} of {len(runs)} target runs and {len(backbones)} of "
                    f"{len(pretraining)} pretraining runs done, skipped; {len(todo)} target runs remain")
    threads = run_threads(cfg)
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(threads or torch_threads)  # pretraining too: the same --threads, the same numbers
    try:
        # Ray starts first: a cluster that cannot be reached fails before pretraining, not after it
        with RaySweep(cfg, threads) if cfg.workers > 1 or cfg.cluster else contextlib.nullcontext() as engine:
            run_all = engine.run if engine is not None else functools.partial(run_here, cfg)
            run_all({run.seed: (run, None) for run in pretraining if run.seed not in backbones}, pretrained)
            backbone_of = {run.seed: backbones[backbone_seed(cfg, run.seed)] for run in runs}
            run_all({index: (run, backbone_of[run.seed]) for index, run in todo.items()}, finished)
    finally:
        torch.set_num_threads(torch_threads)
    for grid in grids.values():  # grids completed by rows of an earlier, interrupted invocation too
        select_rates([done[i] for i in grid], cfg.select)
    results = in_order()
    csv_out.rewrite(results)
    return results
