"""A sweep from start to end: its plan (Plan) run in phases, here or on Ray (ray_engine), each
row written as its run ends. Imported by cli; imports settings, runs, selection, stop,
ray_engine and the template."""

import contextlib
import dataclasses
import datetime
import functools
import gc
import os
import statistics
import time

import torch

import transfer_mnist as tm
from sweeps.ray_engine import RaySweep
from sweeps.runs import (Run, RunResult, execute, pretrain_checkpoint,
                         pretraining_rates, pretraining_runs, read_weights, run_key,
                         save_backbone, sweep_runs, widened_runs)
from sweeps.selection import select_rates, selection_group, widening
from sweeps.settings import backbone_seed, run_threads, seeds
from sweeps.stop import StopSignal

logger = tm.logger  # the experiment's console, as the template's


def run_here(cfg, jobs):
    """Each (run, backbone) here, in turn: (run, result, backbone, where, node) as each ends."""
    for run, backbone in jobs:
        StopSignal.check()
        result, backbone = execute(cfg, run, backbone)
        yield run, result, backbone, "", None


class Progress:
    """The console's line per finished run: [k/N], its numbers, the time elapsed and left: each
    kind's mean seconds times its runs left, over the workers (a kind not yet timed is named)."""

    def __init__(self, pretraining, target_runs, workers):
        self.left = {"pretraining": pretraining, "target run": target_runs}
        self.seconds = {kind: [] for kind in self.left}
        self.workers = workers
        self.started = time.monotonic()

    def line(self, run, result, where):
        kind = "pretraining" if run.mode == "pretrain" else "target run"
        self.left[kind] -= 1
        self.seconds[kind].append(result.seconds)
        done = sum(map(len, self.seconds.values()))
        left = sum(self.left.values())
        work = sum(statistics.fmean(self.seconds[kind]) * n
                   for kind, n in self.left.items() if self.seconds[kind])
        clock = datetime.timedelta(seconds=round(work / min(self.workers, left or 1)))
        estimate = [f"about {clock} left"] if work else []
        estimate += [f"{n} {kind}{'s' * (n > 1)} not yet timed"
                     for kind, n in self.left.items() if n and not self.seconds[kind]]
        elapsed = datetime.timedelta(seconds=round(time.monotonic() - self.started))
        return (f"[{done}/{done + left}] {run.target}/{run.mode}: best epoch {result.best_epoch}, "
                f"test loss {result.test_loss:.4f}, test accuracy {result.test_acc:.4f} "
                f"(n_train {run.n_train}, seed {run.seed}, lr {run.learning_rate:g}), "
                f"{result.seconds:.1f} s{where}; {elapsed} elapsed; "
                + ("; ".join(estimate) or "done"))


@dataclasses.dataclass
class Plan:
    """Every run of a sweep, keyed by its Run, and the rows finished so far: the pretraining, the
    target runs in the results' order (sweep_runs()), then the rates that --widen added."""

    pretraining: list[Run]
    runs: list[Run]
    select: str
    rows: dict[Run, RunResult]

    def grids(self):
        """The runs among which each rate is selected."""
        grids = {}
        for run in self.runs:
            grids.setdefault(selection_group(run, self.select), []).append(run)
        return grids

    def todo(self):
        """The target runs without a row, in the plan's order."""
        return [run for run in self.runs if run not in self.rows]

    def ordered(self):
        """The rows: pretraining, then each (target, n_train, seed, arm)'s runs in plan order."""
        first = {}
        for run in self.runs:
            first.setdefault((run.target, run.n_train, run.seed, run.mode), len(first))
        blocks = sorted(self.runs, key=lambda run: first[run.target, run.n_train, run.seed,
                                                         run.mode])
        return [self.rows[run] for run in self.pretraining + blocks if run in self.rows]


def make_plan(cfg, resumed):
    """The sweep's runs; a resumed sweep's with the rates it widened by, and its rows."""
    widened = widened_runs(cfg, resumed.widened) if resumed else []
    rows = {run_key(r): r for r in resumed.rows} if resumed else {}
    return Plan(pretraining_runs(cfg), sweep_runs(cfg) + widened, cfg.select, rows)


def nothing(*args):
    """A hook not given."""


class Sweep:
    """The phases of a sweep and what each finished run leaves: its row, its grid's choice once
    the grid is complete, the settings' records through the hooks (see run_experiment)."""

    def __init__(self, cfg, plan, csv_out, backbones, hooks):
        self.cfg = cfg
        self.plan = plan
        self.csv_out = csv_out
        self.backbones = backbones  # backbone seed -> its tensors
        self.hooks = {name: hook or nothing for name, hook in hooks.items()}
        self.examined = set()  # (grid, its size): widened once
        pretraining = {run.seed for run in plan.pretraining} - backbones.keys()
        self.progress = Progress(len(pretraining), len(plan.todo()), max(cfg.workers, 1))

    def run(self, execute_all):
        """Pretraining, then rounds of target runs until no grid widens."""
        first = pretraining_rates(self.cfg)[0]  # a seed's pretraining grid is one job
        jobs = [(run, None) for run in self.plan.pretraining
                if run.seed not in self.backbones and run.learning_rate == first]
        for run, results, backbone, where, node in execute_all(jobs):
            self.pretrained(run.seed, results, backbone, where, node)
        self.widen()
        while todo := self.plan.todo():
            jobs = [(run, self.backbones[backbone_seed(self.cfg, run.seed)]) for run in todo]
            for run, result, _, where, node in execute_all(jobs):
                self.finished(run, result, where, node)
            self.widen()

    def widen(self):
        """Adds the runs --widen asks of each complete grid not yet examined at its size."""
        for group, grid in self.plan.grids().items():
            complete = all(run in self.plan.rows for run in grid)
            if (group, len(grid)) in self.examined or not complete:
                continue
            self.examined.add((group, len(grid)))
            rows = [self.plan.rows[run] for run in grid]
            select_rates(rows, self.cfg.select)
            new, line = widening(self.cfg, grid, rows)
            if new:
                self.hooks["on_widened"](new[0])  # before the runs: a resume runs them too
                logger.info(line)
                self.plan.runs += new
                self.progress.left["target run"] += len(new)
            elif line:
                logger.warning(line)

    def pretrained(self, seed, results, backbone, where, node):
        """Seed's pretraining grid is done: the backbone and row are the pick's."""
        results = results if isinstance(results, list) else [results]  # a stand-in's row
        for r in results:  # on a cluster: the node, before the rows
            self.hooks["on_node"](run_key(r), node)
        pick = next(r for r in results if r.selected)
        checkpoint = pretrain_checkpoint(self.cfg, seed, pick.learning_rate)
        self.backbones[seed] = backbone
        if not os.path.isfile(checkpoint):  # made on another node: kept for --resume
            save_backbone(backbone, checkpoint)
        # before the row: a resume that finds the row finds the digest
        rates = {r.learning_rate: r.val_loss for r in results}
        self.hooks["on_pretrained"](seed, checkpoint, rates if len(results) > 1 else None)
        self.plan.rows[run_key(pick)] = pick
        self.csv_out.append(pick)
        logger.info(self.progress.line(run_key(pick), pick, where))
        StopSignal.check()

    def finished(self, run, result, where, node):
        """A target run's row goes to the CSV as it finishes, `selected` false until its grid is
        complete; then the grid's choice is made and the CSV rewritten with it."""
        self.hooks["on_node"](run, node)
        self.plan.rows[run] = result
        grid = self.plan.grids()[selection_group(run, self.cfg.select)]
        result.selected = all(r in self.plan.rows for r in grid)
        if result.selected and len(grid) > 1:
            select_rates([self.plan.rows[r] for r in grid], self.cfg.select)
            self.csv_out.rewrite(self.plan.ordered())
        else:
            self.csv_out.append(result)
        logger.info(self.progress.line(run, result, where))
        # Free the finished run now: Lightning's reference cycles keep its tensors until the
        # cyclic collector runs. What was alive before the first run is frozen (run_experiment)
        with StopSignal.deferred():
            gc.collect()


def start_line(cfg, plan, backbones):
    """What a sweep is about to run, in one line."""
    todo = plan.todo()
    pretraining = [run for run in plan.pretraining if run.seed not in backbones]
    seed_list = sorted({run.seed for run in todo}) or [cfg.seed]
    rates = ", ".join(f"{r:g}" for r in cfg.lr_grid) or "each arm's own"
    where = f"{cfg.workers} workers" if cfg.workers > 1 else "this process"
    where = f"the Ray cluster at {cfg.cluster}" if cfg.cluster else where
    after = f"from --weights {cfg.weights}" if cfg.weights else (
        f"after {len(pretraining)} pretraining runs ({cfg.source}, {cfg.n_pretrain} images, "
        f"up to {cfg.pretrain_epochs} epochs)")
    return (f"Running {len(todo)} target runs {after} on {where}: {', '.join(cfg.targets)}; "
            f"n_train {', '.join(map(str, cfg.n_train))}; {', '.join(cfg.modes)}; "
            f"seeds {seed_list[0]}-{seed_list[-1]}; rates {rates}; up to {cfg.train_epochs} epochs")


def known_backbones(cfg, plan, resumed, borrowed, csv_out, on_pretrained):
    """Each backbone seed's tensors that exist already: --weights, or the backbones pretrained
    earlier or borrowed (--backbones-from: their rows and digests come here first)."""
    if cfg.weights:  # every pretrained arm starts from them, whatever its seed
        channels = tm.resolve_network(cfg).channels
        state = read_weights(cfg.backbone, cfg.weights, channels)
        return {backbone_seed(cfg, seed): state for seed in seeds(cfg)}
    checkpoints = {**(borrowed.checkpoints if borrowed else {}),
                   **(resumed.checkpoints if resumed else {})}
    for r in borrowed.rows if borrowed else []:
        if run_key(r) in plan.pretraining and run_key(r) not in plan.rows:
            (on_pretrained or nothing)(r.seed, borrowed.checkpoints[r.seed], None)
            csv_out.append(r)
            plan.rows[run_key(r)] = r
    return {run.seed: tm.read_backbone(checkpoints[run.seed])
            for run in plan.pretraining if run in plan.rows}


def run_experiment(cfg, csv_out, resumed=None, on_pretrained=None, on_node=None,
                   on_widened=None, borrowed=None):
    """The sweep's plan in phases, here or on Ray (--workers, --cluster): pretraining, the target
    runs, each round of rates that --widen adds; a resumed sweep's minus its rows. Rows go to the
    CSV as runs finish, in the plan's order at the end. `borrowed`: --backbones-from. Hooks,
    each before its row: on_pretrained(seed, checkpoint, rates: every pretraining rate's
    validation loss, or None), on a cluster on_node(run, node), on_widened(run) for the first
    seed's run of each rate --widen adds."""
    plan = make_plan(cfg, resumed)
    backbones = known_backbones(cfg, plan, resumed, borrowed, csv_out, on_pretrained)
    if resumed:
        done = len(plan.runs) - len(plan.todo())
        logger.info(f"Resuming {csv_out.path}: {done} of {len(plan.runs)} target runs and "
                    f"{len(backbones)} of {len(plan.pretraining)} pretraining runs done, skipped; "
                    f"{len(plan.runs) - done} target runs remain")
    logger.info(start_line(cfg, plan, backbones))
    # on_node: local workers run on this machine, which made_by records
    on_node = on_node if cfg.cluster else None
    hooks = {"on_pretrained": on_pretrained, "on_node": on_node, "on_widened": on_widened}
    sweep = Sweep(cfg, plan, csv_out, backbones, hooks)
    threads = run_threads(cfg)
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(threads or torch_threads)  # pretraining too: the same numbers
    # the libraries' objects, alive for good, stay out of each run's collection (finished())
    gc.collect()
    gc.freeze()
    try:
        # Ray starts first: a cluster that cannot be reached fails before pretraining
        on_ray = cfg.workers > 1 or cfg.cluster
        with RaySweep(cfg, threads, csv_out.path) if on_ray else contextlib.nullcontext() as ray:
            sweep.run(ray.run if ray else functools.partial(run_here, cfg))
    finally:
        gc.unfreeze()
        torch.set_num_threads(torch_threads)
    # grids completed by the rows of an earlier, interrupted invocation too
    for grid in plan.grids().values():
        select_rates([plan.rows[run] for run in grid], cfg.select)
    results = plan.ordered()
    csv_out.rewrite(results)
    return results
