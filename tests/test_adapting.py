"""Adapting the experiment: registering targets and arms, image folders, settings, and the errors
and files a user meets at the edges. Tiny data only (see conftest.py); no network."""

import csv
import errno
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
import torchvision
from conftest import REPO, sweep_settings, write_image_folder

import transfer_mnist as tm
from sweeps import cli, folders, runs


def read_csv(path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


def modules_trained(monkeypatch) -> list[dict]:
    """Record, for every module that fit_and_test() trains, its learning rate as the optimizer gets it."""
    made, fit_and_test = [], tm.fit

    def recording(module, *args, **kwargs):
        counts = {"trainable_params": sum(p.numel() for p in module.parameters() if p.requires_grad),
                  "total_params": sum(p.numel() for p in module.parameters())}
        made.append({"learning_rate": module.hparams.learning_rate, "counts": counts,
                     "optimizer_lr": module.configure_optimizers().param_groups[0]["lr"]})
        return fit_and_test(module, *args, **kwargs)

    monkeypatch.setattr(tm, "fit", recording)
    return made


# ---- one entry per target and per arm -----------------------------------------------------
def high_digits(labels: torch.Tensor) -> torch.Tensor:
    return labels - 5


def test_a_target_registered_at_run_time_runs_end_to_end(tiny_data, tiny_args, tmp_path, monkeypatch):
    root, written = tiny_data
    monkeypatch.setitem(tm.TARGETS, "digits-5-9", tm.Target(
        torchvision.datasets.MNIST, ("5", "6", "7", "8", "9"), relabel=high_digits, keep=lambda y: y >= 5))
    data = tm.load_data("digits-5-9", 20, str(root), seed=0)
    digits = written["MNIST"]["t10k"]
    assert torch.equal(data.test.labels, digits[digits >= 5] - 5)
    assert set(data.train.labels.tolist()) <= set(range(5))

    assert cli.main(tiny_args + ["--targets", "digits-5-9", "--results-csv", str(tmp_path / "r.csv")]) == 0
    rows = read_csv(tmp_path / "r.csv")
    assert [(r["target"], r["mode"]) for r in rows] == [
        ("mnist", "pretrain"), ("digits-5-9", "finetuned"), ("digits-5-9", "from_scratch")]
    checkpoint = next((tmp_path / "logs" / "pretrain").glob("version_0/checkpoints/best.ckpt"))
    assert (tmp_path / "logs" / "digits-5-9" / "finetuned" / "version_0" / "n20_seed0_lr5e-05").is_dir()
    assert torch.load(checkpoint, weights_only=True)["state_dict"]["classification_head.2.weight"].shape[0] == 10


def test_an_arm_registered_at_run_time_is_a_mode(tiny_args, tmp_path, monkeypatch):
    monkeypatch.setitem(tm.ARMS, "frozen_fast", tm.Arm(learning_rate=3e-2, pretrained=True, train_backbone=False))
    made = modules_trained(monkeypatch)
    args = tiny_args + ["--targets", "even-odd", "--modes", "frozen_fast", "--results-csv", str(tmp_path / "r.csv")]
    assert cli.main(args) == 0
    assert [r["mode"] for r in read_csv(tmp_path / "r.csv")] == ["pretrain", "frozen_fast"]
    learning_rate, counts = made[1]["learning_rate"], made[1]["counts"]
    head = sum(p.numel() for p in tm.classification_head(120, 2).parameters())
    assert learning_rate == 3e-2 and counts["trainable_params"] == head < counts["total_params"]


def is_even(labels: torch.Tensor) -> torch.Tensor:
    return labels % 2 == 0  # bool, not class indices: a slip a copier makes


def odd_labels(labels: torch.Tensor) -> torch.Tensor:
    return labels % 2  # class indices where a mask was wanted


@pytest.mark.parametrize("target, message", [
    # MNIST's ten digits under two label names, without a relabel
    (tm.Target(torchvision.datasets.MNIST, ("even", "odd")), "relabel gave torch.int64, not 0 to 1"),
    (tm.Target(torchvision.datasets.MNIST, ("even", "odd"), relabel=is_even), "relabel gave torch.bool, not 0 to 1"),
    (tm.Target(torchvision.datasets.MNIST, ("even", "odd"), keep=odd_labels), "keep must give a bool per label"),
])
@pytest.mark.parametrize("main", [tm.main, cli.main])
def test_labels_a_target_cannot_use_stop_before_training_naming_it(tiny_args, tmp_path, monkeypatch, capsys,
                                                                   target, message, main):
    monkeypatch.setitem(tm.TARGETS, "parity-typo", target)
    assert main(tiny_args + ["--targets", "parity-typo"]) == 2
    err = one_error_line(capsys)
    assert err.startswith("error: target parity-typo: ") and message in err and "fix TARGETS" in err
    assert not list((tmp_path / "logs").glob("**/events.*"))  # nothing trained


# ---- your own images ----------------------------------------------------------------------
def test_an_image_folder_is_read_at_the_source_s_channels_and_size_with_its_class_names(image_folder):
    name = folders.register_image_folder(str(image_folder), 1, (28, 28))  # an MNIST source's
    assert name == "shapes" and tm.TARGETS[name].label_names == ("bar", "box", "disc")  # sorted, as ImageFolder
    images, labels = tm.read_split(name, "unused", train=True)
    assert images.shape == (48, 28, 28, 1) and images.dtype == torch.uint8
    assert labels.tolist() == [0] * 16 + [1] * 16 + [2] * 16
    # the bright patch of "box" (class index 1, drawn in rows 4-11 of 40) stays near the top once resized
    box = images[labels == 1].float().mean(0)
    assert box[3:8].mean() > 150 and box[20:].mean() < 60
    train = tm.load_data(name, 20, "unused", seed=0).train
    assert train.images.shape == (20, 1, 28, 28)
    assert train.images.max().item() == pytest.approx((1 - 0.1307) / 0.3081)  # normalised alike
    # read for an RGB source of 40x40 (a folder of the PNGs themselves), it keeps its colours and size
    name = folders.register_image_folder(str(image_folder), *folders.folder_shape(str(image_folder)))
    images, _ = tm.read_split(name, "unused", train=True)
    assert images.shape == (48, 40, 40, 3) and tm.load_data(name, 20, "unused", 0).train.images.shape == (20, 3, 40, 40)


def test_a_source_folder_of_rgb_images_pretrains_and_its_targets_take_its_shape(tiny_args, tmp_path):
    source = write_image_folder(tmp_path / "colours", classes=("red", "green", "blue"))
    target = write_image_folder(tmp_path / "pairs", classes=("one", "two"))
    args = tiny_args + ["--source", str(source), "--targets", str(target), "--n-pretrain", "20", "--n-train", "12",
                        "--results-csv", str(tmp_path / "r.csv")]
    assert cli.main(args) == 0
    assert [(r["target"], r["mode"]) for r in read_csv(tmp_path / "r.csv")] == [
        ("colours", "pretrain"), ("pairs", "finetuned"), ("pairs", "from_scratch")]
    assert tm.read_split("pairs", "unused", True)[0].shape[1:] == (40, 40, 3)


def test_an_image_folder_target_runs_every_arm(tiny_args, image_folder, tmp_path):
    args = tiny_args + ["--targets", str(image_folder), "even-odd", "--modes", "finetuned", "from_scratch", "frozen",
                        "--seeds", "2", "--results-csv", str(tmp_path / "r.csv")]
    assert cli.main(args) == 0
    rows = read_csv(tmp_path / "r.csv")
    shapes = [(r["mode"], r["seed"]) for r in rows if r["target"] == "shapes"]
    assert shapes == [(mode, seed) for seed in "01" for mode in ("finetuned", "from_scratch", "frozen")]
    assert (tmp_path / "logs" / "shapes" / "frozen" / "version_0" / "n20_seed1_lr0.001").is_dir()
    # each seed picks its own rate: compared by results/PROTOCOL.md's rules, in points, once
    assert "| shapes | 20 | frozen − from_scratch | 2 |" in (tmp_path / "r.md").read_text()


@pytest.mark.parametrize("damage, message", [
    (lambda root: os.rename(root / "test", root / "testing"), "has no test/ subfolder"),
    (lambda root: [p.unlink() for p in (root / "train").glob("*/*.png")], "Found no valid file"),
    (lambda root: os.rename(root / "test" / "bar", root / "test" / "stick"), "different classes (bar, stick)"),
    (lambda root: None, "--n-train 40 and a quarter as many to validate do not fit the 48 images of {root}"),
])
def test_image_folder_errors_name_the_folder(tiny_args, image_folder, damage, message, capsys):
    damage(image_folder)
    assert cli.main(tiny_args + ["--targets", str(image_folder), "--n-train", "40"]) == 2
    err = one_error_line(capsys)
    assert message.format(root=image_folder) in err and str(image_folder) in err


def test_an_image_folder_cannot_shadow_a_registered_target(tiny_args, tmp_path, capsys):
    folder = write_image_folder(tmp_path / "even-odd")
    assert cli.main(tiny_args + ["--targets", str(folder)]) == 2
    assert "named like the registered target even-odd" in one_error_line(capsys)


# ---- one place per setting ----------------------------------------------------------------
def test_both_command_lines_default_to_the_post_s_protocol():
    template, sweep = tm.parse_args([]), sweep_settings([])
    post = {"n_pretrain": 10_000, "pretrain_epochs": 50, "pretrain_lr": 1e-4, "train_epochs": 500, "patience": 100,
            "seed": 0, "source": "mnist", "log_dir": "pretraining_logs", "data_dir": "data", "min_delta": 0.0}
    assert {name: getattr(template, name) for name in post} == post == {name: getattr(sweep, name) for name in post}
    assert sweep.disjoint is False and not hasattr(template, "disjoint")  # the harness's alone
    assert (template.n_train, template.targets, template.modes) == (200, ["even-odd", "fashion-mnist"],
                                                                   ["finetuned", "from_scratch"])
    assert (sweep.n_train, sweep.targets, sweep.modes) == ((200,), ("even-odd", "fashion-mnist"),
                                                          ("finetuned", "from_scratch"))
    assert template.lr == sweep.lr == {name: arm.learning_rate for name, arm in tm.ARMS.items()}  # the post's rates
    assert template.lr == {"finetuned": 5e-5, "from_scratch": 1e-4, "frozen": 1e-3, "lp_ft": 5e-5}
    parsed = sweep_settings(["--n-train", "50", "100", "50", "--seeds", "3", "--dry-run", "--modes", "frozen"])
    assert (parsed.n_train, parsed.seeds, parsed.dry_run, parsed.modes) == ((50, 100), 3, True, ("frozen",))


def test_the_template_points_harness_flags_to_the_harness(capsys):
    for flag in (["--protocol", "fair"], ["--seeds", "5"], ["--lr-grid", "1e-3"], ["--workers", "2"], ["--report", "x"]):
        with pytest.raises(SystemExit) as exit_info:
            tm.parse_args(flag + ["--n-train", "50"])
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
        assert err.endswith(f"python -m sweeps {' '.join(flag)} --n-train 50") and f"{flag[0]} is no flag" in err


def test_lr_sets_one_arm_and_keeps_the_others():
    cfg = sweep_settings(["--lr", "finetuned=1e-3", "frozen=2e-2"])
    assert cfg.lr == {"finetuned": 1e-3, "from_scratch": 1e-4, "frozen": 2e-2, "lp_ft": 5e-5}
    assert tm.parse_args([]).lr == {name: arm.learning_rate for name, arm in tm.ARMS.items()}  # one place: ARMS


@pytest.mark.parametrize("value", ["bogus=1e-3", "finetuned=-1e-3", "finetuned=0", "finetuned=fast", "finetuned",
                                   "finetuned=nan"])
def test_lr_refuses_unknown_arms_and_rates_that_are_not_positive(value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        sweep_settings(["--lr", value])
    assert exit_info.value.code == 2 and "--lr" in capsys.readouterr().err


def test_the_arm_trains_at_the_rate_given_on_the_command_line(tiny_args, tmp_path, monkeypatch):
    made = modules_trained(monkeypatch)
    assert cli.main(tiny_args + ["--targets", "even-odd", "--lr", "finetuned=1e-3", "--pretrain-lr", "2e-4"]) == 0
    assert [m["optimizer_lr"] for m in made] == [2e-4, 1e-3, 1e-4]  # pretrain, finetuned (given), from_scratch


# ---- the layout: the template alone, the harness's runs without its reporting ---------------
REPORTING = ["sweeps.summary", "sweeps.figures", "sweeps.cli"]


@pytest.mark.slow  # an end-to-end run
def test_the_sweep_engine_runs_without_the_reporting_modules(tiny_data, tmp_path):
    root, _ = tiny_data
    script = f"""
import sys
for name in {REPORTING!r}:
    sys.modules[name] = None  # importing it now fails
from sweeps import engine, runs, settings
cfg, _ = settings.parse(["--data-dir", {str(root)!r}, "--log-dir", {str(tmp_path)!r}, "--n-pretrain", "40",
                         "--n-train", "20", "--seeds", "2", "--pretrain-epochs", "1", "--train-epochs", "2",
                         "--accelerator", "cpu"])
results = engine.run_experiment(cfg, runs.ResultsCsv({str(tmp_path / "r.csv")!r}))
print(len(results))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-1] == str(1 + 2 * 2 * 2) == str(len(read_csv(tmp_path / "r.csv")))


def without_packages(tmp_path: Path, *names: str) -> Path:
    """A folder that holds what this interpreter's site-packages holds, but the packages `names` (and their
    metadata): Python with it in the place of site-packages (-S) runs as if they were not installed."""
    site = tmp_path / "site-packages"
    site.mkdir()
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if entry.name.split("-")[0].split(".")[0] not in names:
            (site / entry.name).symlink_to(entry)
    return site


@pytest.mark.slow  # an end-to-end run
def test_the_template_runs_without_ray_matplotlib_or_the_harness(tiny_data, tmp_path):
    root, _ = tiny_data
    site = without_packages(tmp_path, "ray", "matplotlib", "mpl_toolkits")
    script = f"""
import runpy, sys
sys.path.insert(0, {str(site)!r})
sys.modules["sweeps"] = None  # not even on the path: the template imports nothing of it
for name in ("ray", "matplotlib"):
    __import__("importlib.util").util.find_spec(name) is None or sys.exit(name + " is installed")
sys.argv = ["transfer_mnist.py", "--data-dir", {str(root)!r}, "--log-dir", {str(tmp_path / "logs")!r},
            "--n-pretrain", "40", "--n-train", "20", "--pretrain-epochs", "2", "--train-epochs", "3",
            "--results-csv", {str(tmp_path / "r.csv")!r}]
runpy.run_path({str(REPO / "transfer_mnist.py")!r}, run_name="__main__")
"""
    done = subprocess.run([sys.executable, "-S", "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = read_csv(tmp_path / "r.csv")
    assert [(r["target"], r["mode"]) for r in rows] == [("mnist", "pretrain"), ("even-odd", "finetuned"),
        ("even-odd", "from_scratch"), ("fashion-mnist", "finetuned"), ("fashion-mnist", "from_scratch")]
    assert "Results: " in done.stdout


# ---- errors, and nothing left behind ------------------------------------------------------
def test_a_log_dir_that_is_a_file_or_cannot_be_created_exits_2(tiny_args, tmp_path, capsys):
    (tmp_path / "afile").write_text("mine")
    for log_dir, reason in ((tmp_path / "afile", "is a file"), (tmp_path / "afile" / "logs", "cannot be created"),
                            (Path("/proc/no-such/logs"), "cannot be created")):
        assert cli.main(tiny_args + ["--log-dir", str(log_dir)]) == 2
        err = one_error_line(capsys)
        assert f"--log-dir {log_dir}" in err and reason in err
    assert (tmp_path / "afile").read_text() == "mine"


def test_a_results_csv_that_cannot_be_written_exits_2_and_leaves_nothing(tiny_args, tmp_path, capsys):
    for path, reason in ((tmp_path, "is a folder"), (Path("/dev/full"), "No space left on device"),
                         (tmp_path / "new" / "r.csv" / "x.csv", "cannot be written")):
        if path.name == "x.csv":
            (tmp_path / "new").mkdir()
            (tmp_path / "new" / "r.csv").write_text("")
        assert cli.main(tiny_args + ["--log-dir", str(tmp_path / "fresh" / "logs"), "--results-csv", str(path)]) == 2
        err = one_error_line(capsys)
        assert f"--results-csv {path}" in err and reason in err
        assert not (tmp_path / "fresh").exists()  # the log folder this start made is gone again


def test_a_full_disk_mid_run_keeps_the_finished_rows(tiny_args, tmp_path, monkeypatch, capsys):
    train, calls = tm.train, []

    def train_until_the_disk_fills(*args, **kwargs):
        calls.append(args)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "logs" / "events"))
        return train(*args, **kwargs)

    monkeypatch.setattr(tm, "train", train_until_the_disk_fills)
    csv_path = tmp_path / "r.csv"
    assert cli.main(tiny_args + ["--results-csv", str(csv_path)]) == 1
    err = one_error_line(capsys)
    assert "No space left on device" in err and str(csv_path) in err
    rows = read_csv(csv_path)
    assert [(r["target"], r["mode"]) for r in rows] == [("mnist", "pretrain"), ("even-odd", "finetuned")]


def test_a_half_written_row_is_cut_when_the_disk_fills(tmp_path, monkeypatch):
    out = runs.ResultsCsv(str(tmp_path / "r.csv"))
    out.append(tm.RunResult("even-odd", "finetuned", 0, 200, 12, 0.25, 0.9, 1e-4, 0.3, True, 500))
    before = (tmp_path / "r.csv").read_bytes()

    class FullDisk:  # writes 5 bytes, then the disk is full
        def __init__(self, f):
            self.f, self.written = f, False

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def seek(self, *args):
            return self.f.seek(*args)

        def truncate(self, size):
            return self.f.truncate(size)

        def write(self, data):
            if self.written:
                raise OSError(errno.ENOSPC, "No space left on device")
            self.written = True
            return self.f.write(data[:5])

    real_open = open
    monkeypatch.setattr("builtins.open", lambda *a, **k: FullDisk(real_open(*a, **k)))
    with pytest.raises(OSError):
        out.append(tm.RunResult("even-odd", "from_scratch", 0, 200, 7, 0.5, 0.8, 1e-4, 0.4, True, 500))
    monkeypatch.undo()
    assert (tmp_path / "r.csv").read_bytes() == before


def test_a_truncated_raw_file_is_named_as_damaged(tiny_data, tiny_args, tmp_path, capsys):
    root, _ = tiny_data
    damaged = tmp_path / "data"
    for name in ("MNIST", "FashionMNIST"):
        (damaged / name / "raw").mkdir(parents=True)
        for file in (root / name / "raw").iterdir():
            (damaged / name / "raw" / file.name).write_bytes(file.read_bytes())
    images = damaged / "MNIST" / "raw" / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:5000])
    assert cli.main(tiny_args + ["--data-dir", str(damaged)]) == 2
    err = one_error_line(capsys)
    assert f"train-images-idx3-ubyte or train-labels-idx1-ubyte in {images.parent} is damaged" in err
    assert "delete it to download it again" in err
    assert "could not be downloaded" not in err
    assert not (tmp_path / "logs").exists()


def test_a_failed_start_removes_the_data_folders_it_made(tmp_path, monkeypatch, capsys):
    # an address that refuses at once: no test reaches the real download servers
    monkeypatch.setattr(torchvision.datasets.MNIST, "mirrors", ["http://127.0.0.1:9/"])
    monkeypatch.setattr(torchvision.datasets.FashionMNIST, "mirrors", ["http://127.0.0.1:9/"])
    (tmp_path / "data").mkdir()
    assert cli.main(["--data-dir", str(tmp_path / "data" / "new"), "--log-dir", str(tmp_path / "logs")]) == 2
    assert "MNIST is not in" in one_error_line(capsys)
    assert sorted(os.listdir(tmp_path)) == ["data"] and not os.listdir(tmp_path / "data")


# ---- console and files --------------------------------------------------------------------
def test_epochs_count_from_1_in_log_lines_csv_and_tensorboard(tiny_args, tmp_path, caplog):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    caplog.set_level("INFO", logger="transfer_mnist")
    assert cli.main(tiny_args + ["--targets", "even-odd", "--modes", "from_scratch", "--train-epochs", "4"]) == 0
    (row,) = [r for r in read_csv(tmp_path / "logs" / "results_version_0.csv") if r["mode"] == "from_scratch"]
    accumulator = EventAccumulator(str(tmp_path / "logs" / "even-odd" / "from_scratch" / "version_0" /
                                       "n20_seed0_lr0.0001"))
    accumulator.Reload()
    val = accumulator.Scalars("ce_loss/val")
    assert [e.step for e in val] == [1, 2, 3, 4] and [e.step for e in accumulator.Scalars("ce_loss/train")] == [1, 2, 3, 4]
    best = min(val, key=lambda e: e.value)
    assert int(row["best_epoch"]) == best.step == accumulator.Scalars("accuracy/test")[0].step
    (done,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("[2/2] even-odd/from_scratch: ")]
    assert f"best epoch {best.step}, test loss" in done and done.endswith(" elapsed; done")


def test_csv_numbers_carry_no_float32_noise(tiny_args, tmp_path):
    assert cli.main(tiny_args + ["--targets", "even-odd"]) == 0
    for row in read_csv(tmp_path / "logs" / "results_version_0.csv"):
        for column in ("test_loss", "test_acc"):
            assert len(row[column].lstrip("0.").replace(".", "").split("e")[0]) <= 6, row[column]
            assert float(row[column]) == pytest.approx(float(row[column]), rel=1e-6)


# ---- a registry entry serves the template and the harness ---------------------------------
ZEROS = ('TARGETS["zeros"] = Target(torchvision.datasets.MNIST, ("other", "zero"), relabel=lambda labels: '
         '(labels == 0).long())\n')


def check_zeros(csv_path: Path, seeds: int) -> None:
    rows = read_csv(csv_path)
    assert [(r["target"], r["mode"], r["seed"]) for r in rows if r["mode"] != "pretrain"] == [
        ("zeros", mode, str(seed)) for seed in range(seeds) for mode in ("finetuned", "from_scratch")]


@pytest.mark.slow  # an end-to-end run
def test_a_target_added_to_the_template_runs_in_the_template_and_in_the_sweeps(tiny_data, tmp_path):
    root, _ = tiny_data
    clone = tmp_path / "clone"
    shutil.copytree(REPO / "sweeps", clone / "sweeps", ignore=shutil.ignore_patterns("__pycache__"))
    template = (REPO / "transfer_mnist.py").read_text()
    registries = template.index("\n\n@dataclasses.dataclass(frozen=True)\nclass Arm")
    (clone / "transfer_mnist.py").write_text(template[:registries] + "\n" + ZEROS + template[registries:])
    common = ["--data-dir", str(root), "--n-pretrain", "40", "--n-train", "20", "--pretrain-epochs", "1",
              "--train-epochs", "2", "--targets", "zeros"]
    env = {**os.environ, "PYTHONPATH": str(clone)}  # the clone's template, not the repository's
    done = subprocess.run([sys.executable, "transfer_mnist.py", *common, "--log-dir", "a", "--results-csv", "a.csv"],
                          capture_output=True, text=True, cwd=clone, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    check_zeros(clone / "a.csv", seeds=1)
    # in one process: that a registry entry reaches Ray's workers is test_resume_and_stop's (a lambda target read once each)
    done = subprocess.run([sys.executable, "-m", "sweeps", *common, "--seeds", "2", "--log-dir", "b", "--results-csv",
                           "b.csv"], capture_output=True, text=True, cwd=clone, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    check_zeros(clone / "b.csv", seeds=2)
    assert "zeros: MNIST, 2 classes (other, zero)" in done.stderr


@pytest.mark.slow  # an end-to-end run
def test_a_target_registered_in_a_user_s_script_runs_in_the_sweeps(tiny_data, tmp_path):
    """In one process; on Ray's workers a registration made at run time travels by value (test_resume_and_stop)."""
    root, _ = tiny_data
    script = tmp_path / "my_sweep.py"
    script.write_text("import sys\n\nimport torchvision\n\nfrom transfer_mnist import TARGETS, Target\n"
                      f"from sweeps.cli import main\n\n{ZEROS}\nsys.exit(main())\n")
    done = subprocess.run([sys.executable, str(script), "--data-dir", str(root), "--n-pretrain", "40", "--n-train", "20",
                           "--pretrain-epochs", "1", "--train-epochs", "2", "--accelerator", "cpu", "--targets",
                           "zeros", "--seeds", "2", "--results-csv", "r.csv"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    check_zeros(tmp_path / "r.csv", seeds=2)
