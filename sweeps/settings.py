"""A sweep's settings: the two protocols, the command line (the template's flags and the harness's), and
what follows from them (a seed's backbone, the torch threads, the rate --widen adds). Imported by every
module of the package; it imports only the template.

A sweep's settings are an argparse.Namespace, as the template's are: the template's functions take it
as their `args`. main() completes it once (complete()); after that only its `version` is set, at start.
"""

import argparse
import logging
import math
import os
import typing
import warnings
from collections.abc import Callable

import transfer_mnist as tm

# --protocol post (the default) is the blog post's: these values, each arm at its own rate.
POST = {"seeds": 1, "modes": ("finetuned", "from_scratch"), "lr_grid": (), "select": "seed", "shuffle": False,
        "pretrain_lr_grid": (), "backbone_per_seed": False, "disjoint": False, "stratify": False, "widen": False, "pretrain_epochs": 50,
        "pretrain_patience": None, "train_epochs": 500, "min_delta": 0.0}
# --protocol fair: results/PROTOCOL.md, for every one of these flags the command line does not give
FAIR = {
    "seeds": 5,  # an interval over seeds; with 2 or 3, t(0.975) is 12.7 or 4.3
    "modes": tuple(tm.ARMS),  # every arm
    # every arm at its best rate (Kornblith et al. 2019); a pick at an edge widens the grid (--widen)
    "lr_grid": (1e-4, 3e-4, 1e-3, 3e-3, 1e-2),
    # each seed at the rate its own validation loss picks, as a user with one labelled set picks it; the median
    # over seeds (pooled) was set more by the rule than by the data (results/PROTOCOL.md)
    "select": "seed",
    "backbone_per_seed": True,  # pretraining's noise in the intervals too
    "disjoint": True,  # no target image that pretraining learned with its digit label
    "stratify": True,  # 12 random validation images missed 3-5 of FashionMNIST's 10 classes
    "shuffle": True,  # a new order of batches every epoch, as any trainer but the post's does
    "widen": True,
    # pretraining to convergence: 50 epochs ended every backbone still improving (best at its last epoch); at
    # the rate of its lowest validation loss: in issue 35's probe, shuffled, 1e-3 and 3e-3 left a quarter to
    # a third fewer test errors than the post's 1e-4
    "pretrain_epochs": 400, "pretrain_patience": 10, "pretrain_lr_grid": (3e-4, 1e-3, 3e-3),
    # a ceiling: runs end on --patience. At 1000, 6 of 20 selected frozen runs on digits 5-9 were still improving
    "train_epochs": 3000,
    # a validation set fitted without error has a loss that falls towards 0 for ever: such runs reached the
    # ceiling by thousandths of a nat, far below its noise (seed 101 on even/odd at 50 labels: 14 of 20)
    "min_delta": 1e-3,
}
PROTOCOLS = {"post": POST, "fair": FAIR}
# The comparison results/PROTOCOL.md's sweeps answer first, named before any run: the others are exploratory
PRIMARY_ARM = "finetuned"
# results/PROTOCOL.md: the primaries at 200 labels (each target's largest n_train where a sweep has no 200),
# tested by Wilcoxon's signed-rank test with Holm over them; "no difference" only within this many points
PRIMARY_N_TRAIN = 200
EQUIVALENCE_MARGIN = 2.0
LR_BOUNDS = (1e-6, 1.0)  # --widen goes no further


def next_rate(ran: list[float], pick: float) -> float | None:
    """--widen: the rate beyond the lowest or highest of those `ran` where `pick` sits there, as far from it (in
    ratio) as its neighbour is, to one significant digit, at most to LR_BOUNDS; None where the pick is inside,
    at a bound, or the grid has one rate (no spacing)."""
    ran = sorted(set(ran))
    if len(ran) < 2 or ran[0] < pick < ran[-1]:
        return None
    low, high = LR_BOUNDS
    if pick == ran[0] and pick > low:
        rate = max(low, float(f"{pick * pick / ran[1]:.1g}"))
    elif pick == ran[-1] and pick < high:
        rate = min(high, float(f"{pick * pick / ran[-2]:.1g}"))
    else:
        return None
    return None if rate in ran else rate


class ExperimentFailure(Exception):
    """A run failed for a reason outside the user's input (a worker killed, out of memory): exit status 1."""


def one_line(err: BaseException) -> str:
    """An exception as one line for the console."""
    if isinstance(err, OSError) and err.strerror:
        return f"{err.strerror}: {err.filename}" if err.filename else err.strerror
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def number(kind: type, low: float, high: float, what: str) -> Callable[[str], typing.Any]:
    """An argparse type: a `kind` from low to high, else the error says `what`."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = math.nan
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be {what}, not {text}")
        return value
    return parse


# the template's positive(int) says "invalid positive int value: '0'"; these keep the harness's messages
positive_int = number(int, 1, math.inf, "a positive whole number")
positive_float = number(float, math.ulp(0.0), math.nextafter(math.inf, 0), "a positive number")
non_negative_int = number(int, 0, math.inf, "0 or more")
non_negative_float = number(float, 0, math.nextafter(math.inf, 0), "0 or a positive number")
gpu_share = number(float, 0, 1, "a share of one GPU, from 0 to 1")


def arm_rate(text: str) -> tuple[str, float]:
    """--lr ARM=RATE, e.g. finetuned=1e-3."""
    arm, _, rate = text.partition("=")
    if arm not in tm.ARMS:
        raise argparse.ArgumentTypeError(f"unknown arm {arm!r} in {text!r}; choose from {', '.join(tm.ARMS)}")
    return arm, positive_float(rate)


def quiet_libraries() -> None:
    """Lightning's device banner and tips for every run: its warnings only; and the template's
    LIBRARY_WARNINGS, which are not for users. In the driver and in every Ray worker."""
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    for message in tm.LIBRARY_WARNINGS:
        warnings.filterwarnings("ignore", message=message)


def target_name(text: str) -> str:
    """A registered target, or a folder to read as an image-folder target (sweeps.folders)."""
    if text in tm.TARGETS or os.path.isdir(text):
        return text
    raise argparse.ArgumentTypeError(f"{text!r} is neither a registered target ({', '.join(tm.TARGETS)}) nor a folder")


def make_parser() -> argparse.ArgumentParser:
    """The template's flags, some of them widened (several --n-train,
    image folders, what a protocol sets), and the harness's. A flag that
    --protocol sets has no default here (SUPPRESS): parse() fills it in."""
    parser = argparse.ArgumentParser(
        prog="python -m sweeps", parents=[tm.make_parser()], conflict_handler="resolve",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="The transfer experiment of transfer_mnist.py over seeds, training-set "
                    "sizes and learning-rate grids, in one process or on Ray, with resume, "
                    "summaries over seeds and figures.")
    fair = ", ".join(f"--{name.replace('_', '-')} {shown(value)}" for name, value in FAIR.items())
    parser.add_argument("--protocol", choices=PROTOCOLS, default="post",
                        help="post: the blog post's protocol; fair: an honest comparison, with "
                             f"these settings unless the command line gives them: {fair}")
    add_template_flags(parser.add_argument)
    add_grid_flags(parser.add_argument)
    add_sweep_flags(parser.add_argument)
    return parser


BY_PROTOCOL = {"default": argparse.SUPPRESS}  # parse() sets what --protocol says


def add_template_flags(add: Callable) -> None:
    """The template's flags, widened: image folders, several sizes, what a
    protocol sets."""
    add("--source", type=target_name, default="mnist",
        help="registered target (or image folder) to pretrain the backbone on")
    add("--targets", nargs="+", type=target_name, default=("even-odd", "fashion-mnist"),
        help="registered targets, or folders of your own images laid out as "
             "FOLDER/train/<class>/* and FOLDER/test/<class>/*")
    add("--modes", nargs="+", choices=tm.ARMS, **BY_PROTOCOL,
        help=f"arms to run on every target (post: {shown(POST['modes'])}; fair: all)")
    add("--n-train", nargs="+", type=positive_int, default=(200,),
        help="training images per target run, plus a quarter as many for validation "
             "(--n-val); several sizes give a learning curve, e.g. 50 100 200 500")
    add("--pretrain-epochs", type=positive_int, **BY_PROTOCOL,
        help=f"epochs of pretraining at most (post: {POST['pretrain_epochs']}; fair: "
             f"{FAIR['pretrain_epochs']}, ended by --pretrain-patience)")
    add("--train-epochs", type=positive_int, **BY_PROTOCOL,
        help=f"epochs of a target run at most (post: {POST['train_epochs']}; fair: "
             f"{FAIR['train_epochs']}; --patience ends it earlier)")
    add("--patience", type=non_negative_int, default=100,
        help="stop a run this many epochs after its best validation loss; 0 never "
             "stops early (the post)")
    add("--min-delta", type=non_negative_float, **BY_PROTOCOL,
        help="a target run's validation loss must fall by more than this to count as "
             "an improvement for --patience; pretraining counts any (post: 0; fair: 0.001)")
    add("--pretrain-patience", type=non_negative_int, **BY_PROTOCOL,
        help="stop pretraining this many epochs after its best validation loss (post: "
             "None, --patience's; fair: 10)")
    add("--n-val", type=positive_int,
        help="validation images of a target run; None: a quarter of its n_train (12 at "
             "50), the post's")
    add("--stratify", action=argparse.BooleanOptionalAction, **BY_PROTOCOL,
        help="draw each target run's training and validation images class by class, in "
             "proportion, each class in validation at least once where --n-val allows "
             "(post: off; fair: on)")
    add("--disjoint", action=argparse.BooleanOptionalAction, **BY_PROTOCOL,
        help="draw each target's training and validation images only from those that its "
             "backbone was not pretrained on, where source and target read the same files "
             "(even-odd and mnist) (post: off; fair: on)")
    add("--lr", nargs="+", type=arm_rate, default=[], metavar="ARM=RATE",
        help="Adam's rate of an arm; [] keeps theirs: "
             + ", ".join(f"{name}={arm.learning_rate:g}" for name, arm in tm.ARMS.items()))
    add("--accelerator", default="auto", help="Lightning accelerator: auto, cpu, gpu, mps...")
    add("--devices", default="auto", help="Lightning devices; the experiment runs on one")
    add("--threads", type=positive_int,
        help="torch threads of every run, pretraining included; the same --threads gives "
             "the same numbers. None: torch's own in one process, the machine's cores "
             "divided by --workers with workers, 1 on a cluster")


def add_grid_flags(add: Callable) -> None:
    """The harness's flags of what it runs: seeds, subsets, grids."""
    add("--seeds", type=positive_int, **BY_PROTOCOL,
        help="repeat every target run for this many seeds, --seed upwards (post: 1; fair: 5)")
    add("--pretrain-seed", type=int,
        help="seed of pretraining, None: --seed; fix it to split the seeds of one sweep "
             "over machines, e.g. --seed 3 --seeds 2 --pretrain-seed 0")
    add("--backbone-per-seed", action=argparse.BooleanOptionalAction, **BY_PROTOCOL,
        help="pretrain one backbone per seed (pretraining seed s for the target runs of "
             "seed s) instead of one for the whole invocation (post: off; fair: on)")
    grid = FAIR["lr_grid"]
    add("--lr-grid", nargs="+", type=positive_float, metavar="LR", **BY_PROTOCOL,
        help="train every target run once per learning rate, the same grid for every arm, "
             "and select the rate with the lowest validation loss as --select says (post: "
             f"none, each arm at its own rate; fair: {shown(grid)}, which --widen extends "
             f"where a pick sits at an edge: {next_rate(grid, grid[0]):g} below, "
             f"{next_rate(grid, grid[-1]):g} above, and so on)")
    add("--pretrain-lr-grid", nargs="+", type=positive_float, metavar="LR", **BY_PROTOCOL,
        help="pretrain each backbone once per rate and keep the one of the lowest "
             "validation loss (post: none, --pretrain-lr alone; "
             f"fair: {shown(FAIR['pretrain_lr_grid'])})")
    add("--select", choices=("seed", "pooled", "mean"), **BY_PROTOCOL,
        help="how --lr-grid picks: seed: per seed the rate of its lowest validation loss, "
             "as results/PROTOCOL.md; pooled: one rate per (target, arm, n_train), the "
             "lowest median validation loss over seeds, which one collapsed seed cannot "
             "move; mean: the lowest mean, which one can (post: seed; fair: seed)")
    add("--widen", action=argparse.BooleanOptionalAction, **BY_PROTOCOL,
        help="a (target, arm, n_train) whose pick sits at the lowest or highest rate it "
             "ran gets the next rate beyond, on the grid's spacing, for every seed (with "
             "--select seed: a seed whose own pick sits there, for that seed alone), until "
             f"its pick is inside or {LR_BOUNDS[0]:g} or {LR_BOUNDS[1]:g} is reached "
             "(post: off; fair: on)")
    add("--backbones-from", metavar="CSV",
        help="reuse the backbones of the sweep whose results are in CSV, made with the "
             "same pretraining settings and seeds (checked with their digests), instead "
             "of pretraining")
    add("--shuffle", action=argparse.BooleanOptionalAction, **BY_PROTOCOL,
        help="train every run, pretraining too, on its training images in a new order "
             "every epoch, drawn from the run's seed (post: off, the post's fixed order; "
             "fair: on)")
    add("--augment", action="store_true",
        help="train the target runs on randomly shifted, rotated and scaled images (a new "
             "transform per image and epoch, drawn from the run's seed); never validation "
             "or test")


def add_sweep_flags(add: Callable) -> None:
    """The harness's flags of where and how it runs, resumes, reports."""
    add("--overwrite", action="store_true",
        help="delete the log folder first, instead of adding a new version beside the "
             "earlier ones, and replace the rows of an earlier sweep at --results-csv")
    add("--workers", type=positive_int, default=1,
        help="target runs side by side on a local Ray instance (1: all in this process, "
             "no Ray); each run's numbers depend on --threads, not on this")
    add("--cluster", metavar="ADDRESS",
        help="run the target runs on a running Ray cluster: auto (the one `ray start` "
             "runs on this machine), or host:port as `ray start --head` prints it")
    add("--gpus-per-run", type=gpu_share,
        help="share of a GPU that each target run asks Ray for, so that several runs "
             "share one GPU; None: 1/--workers on a GPU accelerator, else 0")
    add("--resume", metavar="CSV",
        help="continue the sweep whose results are in CSV with its saved settings (CSV's "
             ".json): skip its finished runs and its pretraining")
    add("--report", nargs="+", metavar="CSV", default=(),
        help="no training: rebuild the summary, its Markdown and the figure from results "
             "CSVs, merged; written beside the first CSV, or beside --results-csv (which "
             "then gets the merged rows). LABEL=CSV ... compares sweeps side by side (a "
             "label on several CSVs merges them)")


def shown(value) -> str:
    """A setting as a command line would give it."""
    if isinstance(value, tuple):
        return " ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    return "on" if value is True else "off" if value is False else str(value)


def parse(argv: list[str] | None = None) -> tuple[argparse.Namespace, set[str]]:
    """The settings of the command line, completed, and the names of the flags it gives (what --resume
    compares with a sweep's saved settings): parsed again with every default None, a flag left out is None."""
    parser = make_parser()
    cfg = parser.parse_args(argv)  # --help and every error as the user meets them
    for name, value in PROTOCOLS[cfg.protocol].items():  # what the protocol sets, where the command line does not
        if not hasattr(cfg, name):
            setattr(cfg, name, value)
    parser.set_defaults(**dict.fromkeys(vars(cfg)))
    given = {name for name, value in vars(parser.parse_args(argv)).items() if value is not None}
    if cfg.weights:  # nothing is pretrained: the protocol's pretraining settings fall away
        cfg.backbone_per_seed, cfg.pretrain_lr_grid = False, ()
    return complete(cfg), given


# What pretrains a backbone here: with --weights, nothing is pretrained, and these are refused
PRETRAINING_FLAGS = ("backbones_from", "backbone_per_seed", "pretrain_lr_grid")
# ... and these, which the post's protocol sets, do not apply (the start's Settings line leaves them out)
PRETRAINING_SETTINGS = (*PRETRAINING_FLAGS, "source", "n_pretrain", "pretrain_epochs", "pretrain_lr",
                        "pretrain_patience", "pretrain_seed")


def check_weights(cfg: argparse.Namespace, given: set[str]) -> None:
    """--weights with a flag of pretraining on the command line: one of them is a mistake."""
    clash = [name for name in PRETRAINING_FLAGS if name in given]
    if cfg.weights and clash:
        flag = clash[0].replace("_", "-")
        raise tm.ExperimentError(f"--weights {cfg.weights} starts every pretrained arm from those weights: "
                                 f"nothing is pretrained, so --{flag} has no use; drop one of them")


# results/PROTOCOL.md's sweeps, as its commands make them: only these have pre-registered primaries
PROTOCOL_SETTINGS = {"protocol": "fair", "seed": 200, "seeds": 10, "select": "seed", "backbone": "lenet",
                     "weights": None}
PROTOCOL_TARGETS = {"mnist": {"even-odd", "fashion-mnist"}, "digits-0-4": {"digits-5-9"}}


def protocol_sweep(config: dict) -> bool:
    """Whether a sweep's settings are those of one of results/PROTOCOL.md's commands."""
    config = {"backbone": "lenet", "weights": None, **config}  # settings saved before --backbone
    targets = set(config.get("targets") or ())
    return all(config.get(name) == value for name, value in PROTOCOL_SETTINGS.items()) \
        and bool(targets) and targets <= PROTOCOL_TARGETS.get(config.get("source"), set())


def complete(cfg: argparse.Namespace) -> argparse.Namespace:
    """Lists as tuples in their order, repeats dropped; every arm's rate, --lr's where it gives one."""
    for name, value in vars(cfg).items():
        if isinstance(value, list):
            setattr(cfg, name, tuple(dict.fromkeys(value)))
    cfg.lr = {**{name: arm.learning_rate for name, arm in tm.ARMS.items()}, **dict(cfg.lr)}
    if not hasattr(cfg, "version"):
        cfg.version = "version_0"  # set at start: the log version that all runs of this invocation share
    return cfg


def backbone_seed(cfg: argparse.Namespace, seed: int) -> int:
    """The pretraining seed of the backbone that the target runs of `seed` start from."""
    if cfg.backbone_per_seed:
        return seed
    return cfg.seed if cfg.pretrain_seed is None else cfg.pretrain_seed


def seeds(cfg: argparse.Namespace) -> range:
    return range(cfg.seed, cfg.seed + cfg.seeds)


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def run_threads(cfg: argparse.Namespace) -> int | None:
    """Torch threads of every run, pretraining included: --threads; else the machine's cores shared out among
    --workers; 1 per run on a cluster; in one process, torch's own choice (None)."""
    if cfg.threads:
        return cfg.threads
    if cfg.workers > 1:
        return max(1, available_cores() // cfg.workers)
    return 1 if cfg.cluster else None
