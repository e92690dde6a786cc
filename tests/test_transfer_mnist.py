"""The template, transfer_mnist.py, on tiny IDX files (see conftest.py): its data, model, training, and its
main(), the post's runs; no network needed. The harness's behaviour is in the other test files."""

import csv
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torchvision
import yaml
from conftest import template_args
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import transfer_mnist as tm
from sweeps import cli, runs, stats, summary, tables

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
# the five runs of a default invocation, as folders of version_0
RUNS = ["pretrain", "even-odd/finetuned/version_0/n20_seed0_lr5e-05",
        "even-odd/from_scratch/version_0/n20_seed0_lr0.0001",
        "fashion-mnist/finetuned/version_0/n20_seed0_lr5e-05",
        "fashion-mnist/from_scratch/version_0/n20_seed0_lr0.0001"]


def read_csv(path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def events(run_dir: Path) -> EventAccumulator:
    accumulator = EventAccumulator(str(run_dir))
    accumulator.Reload()
    return accumulator


def scalars(run_dir: Path, tag: str) -> list[float]:
    return [event.value for event in events(run_dir).Scalars(tag)]


def tensors_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def target_data(train, val, test, target="even-odd") -> tm.TargetData:
    return tm.TargetData(target, train, val, test)


# ---- data ---------------------------------------------------------------------------------
def test_backbone_maps_images_to_120_features_and_the_head_s_width_is_measured():
    assert tm.decapitated_lenet(1)(torch.zeros(3, 1, 28, 28)).shape == (3, 120)
    module = tm.LitModule(label_names=["even", "odd"], learning_rate=1e-3)
    assert module(torch.zeros(3, 1, 28, 28)).shape == (3, 2)
    assert module.classification_head[0].in_features == 120
    # 3 channels at 32x32: LeNet's last convolution leaves 2x2, so the head takes 480 features
    rgb = tm.LitModule(label_names=list("abcd"), learning_rate=1e-3, image_shape=(3, 32, 32))
    assert rgb.classification_head[0].in_features == 480 and rgb(torch.zeros(2, 3, 32, 32)).shape == (2, 4)


def test_measuring_the_head_s_width_draws_no_random_numbers():
    torch.manual_seed(0)
    tm.LitModule(["a", "b"], learning_rate=1e-3)
    after_module = torch.rand(1)
    torch.manual_seed(0)
    tm.decapitated_lenet(1), tm.classification_head(120, 2)
    assert torch.equal(torch.rand(1), after_module)


def test_even_odd_labels_are_digit_labels_mod_2(tiny_data):
    root, written = tiny_data
    digits = written["MNIST"]["train"]
    data = tm.load_data("even-odd", 20, str(root), seed=3)
    train_idx, val_idx = tm.draw_subset("even-odd", 20, len(digits), seed=3)
    assert data.target == "even-odd" and tm.TARGETS[data.target].label_names == ("even", "odd")
    assert torch.equal(data.train.labels, digits[train_idx] % 2)
    assert torch.equal(data.val.labels, digits[val_idx] % 2)
    assert torch.equal(data.test.labels, written["MNIST"]["t10k"] % 2)
    assert set(data.train.labels.tolist()) == {0, 1}


def test_fashion_labels_and_normalisation(tiny_data):
    root, written = tiny_data
    data = tm.load_data("fashion-mnist", 20, str(root), seed=0)
    assert tm.TARGETS["fashion-mnist"].label_names[9] == "Ankle boot"
    assert torch.equal(data.test.labels, written["FashionMNIST"]["t10k"])
    # normalised once with MNIST's statistics: the bright bar (255) maps to (1 - mean) / std
    (mean,), (std,) = tm.TARGETS["fashion-mnist"].mean, tm.TARGETS["fashion-mnist"].std
    assert (mean, std) == (0.1307, 0.3081)
    assert data.train.images.shape == (20, 1, 28, 28)
    assert data.train.images.max().item() == pytest.approx((1 - mean) / std)
    # exactly the arithmetic of the post's Normalize((0.1307,), (0.3081,)) on ToTensor()'s [0, 1]
    images, _ = tm.read_split("fashion-mnist", str(root), False)
    expected = (images.squeeze(-1).float() / 255 - 0.1307) / 0.3081
    assert torch.equal(data.test.images.squeeze(1), expected)
    assert data.test.images.is_contiguous(memory_format=torch.channels_last)


def test_subset_sizes_and_both_arms_share_one_subset(tiny_data):
    root, _ = tiny_data
    first = tm.load_data("fashion-mnist", 20, str(root), seed=5)
    second = tm.load_data("fashion-mnist", 20, str(root), seed=5)
    other_seed = tm.load_data("fashion-mnist", 20, str(root), seed=6)
    assert len(first.train.labels) == 20 and len(first.val.labels) == 5  # n_train / 0.8, split 80/20
    assert len(first.test.labels) == 60  # the whole test split
    assert [len(batch[1]) for batch in first.train] == [20]
    for a, b in ((first.train, second.train), (first.val, second.val), (first.test, second.test)):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(first.train.images, other_seed.train.images)
    train_idx, val_idx = tm.draw_subset("fashion-mnist", 20, 300, seed=5)
    assert not set(train_idx.tolist()) & set(val_idx.tolist())


def test_pretraining_subset_is_drawn_independently_of_even_odd(tiny_data):
    pre_train, _ = tm.draw_subset("mnist", 40, 300, seed=0)
    target_train, _ = tm.draw_subset("even-odd", 20, 300, seed=0)
    assert not torch.equal(pre_train[:20], target_train)


def test_loader_batches_cover_the_data_in_order():
    images, labels = torch.arange(300.0).reshape(300, 1, 1, 1), torch.arange(300)
    loader = tm.TensorLoader(images, labels, batch_size=128)
    batches = list(loader)
    assert len(loader) == len(batches) == 3
    assert [len(y) for _, y in batches] == [128, 128, 44]
    assert torch.equal(torch.cat([y for _, y in batches]), labels)


# ---- model and transfer -------------------------------------------------------------------
def test_transfer_copies_exactly_the_backbone_under_a_fresh_head(tmp_path):
    pretrained = tm.LitModule(tm.TARGETS["mnist"].label_names, learning_rate=1e-3)
    for p in pretrained.parameters():  # make every tensor distinguishable from a fresh init
        torch.nn.init.normal_(p)
    path = tmp_path / "pretrained.ckpt"
    torch.save({"state_dict": pretrained.state_dict()}, path)
    backbone = tm.read_backbone(str(path))
    assert backbone.keys() == pretrained.convnet.state_dict().keys()  # the backbone's, not the head's

    generator = torch.Generator().manual_seed(0)
    images, labels = torch.randn(8, 1, 28, 28, generator=generator), torch.randint(0, 2, (8,), generator=generator)
    loader = tm.TensorLoader(images, labels, 8)
    seen = {}
    fit = tm.fit

    def first_look(module, *args, **kwargs):  # the module as train() built it, before any training
        seen["backbone"] = {k: v.clone() for k, v in module.convnet.state_dict().items()}
        seen["head"] = {k: v.clone() for k, v in module.classification_head.state_dict().items()}
        return fit(module, *args, **kwargs)
    args = template_args(tmp_path / "logs", "--train-epochs", "1")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tm, "fit", first_look)
        tm.train(backbone, "finetuned", target_data(loader, loader, loader), args)
    torch.manual_seed(0)
    fresh = tm.LitModule(["even", "odd"], learning_rate=1e-3)
    assert tensors_equal(seen["backbone"], pretrained.convnet.state_dict())
    assert tensors_equal(seen["head"], fresh.classification_head.state_dict())


def test_transfer_rejects_a_checkpoint_that_does_not_fit(tmp_path):
    other = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3))
    path = tmp_path / "other.ckpt"
    torch.save({"state_dict": {f"convnet.{k}": v for k, v in other.state_dict().items()}}, path)
    loader = tm.TensorLoader(torch.zeros(4, 1, 28, 28), torch.zeros(4, dtype=torch.long), 4)
    with pytest.raises(RuntimeError, match="Missing key"):  # strict: every tensor, or none
        tm.train(tm.read_backbone(str(path)), "finetuned", target_data(loader, loader, loader),
                 template_args(tmp_path / "logs"))


def test_test_stage_uses_the_best_validation_weights(tmp_path):
    """Validation labels are the opposite of the training labels, so fitting the training set makes
    validation worse every epoch: the best epoch is early and the last one is the worst."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(64, 1, 28, 28, generator=generator)
    labels = torch.randint(0, 2, (64,), generator=generator)
    train = tm.TensorLoader(images, labels, 32)
    flipped = tm.TensorLoader(images, 1 - labels, 64)
    torch.manual_seed(0)
    module = tm.LitModule(["a", "b"], learning_rate=1e-2)
    _, result = tm.fit(module, target_data(train, flipped, flipped), "pretrain", 0, 8,
                                template_args(tmp_path))

    val = events(tmp_path / "pretrain" / "version_0").Scalars("ce_loss/val")
    val_losses = [event.value for event in val]
    assert len(val_losses) == 8 and val_losses[-1] > min(val_losses)  # the case is as intended
    assert [event.step for event in val] == list(range(1, 9))  # TensorBoard's step is the epoch, from 1
    best = min(val, key=lambda event: event.value)
    assert result.best_epoch == best.step < 8
    (test_point,) = events(tmp_path / "pretrain" / "version_0").Scalars("ce_loss/test")
    assert test_point.step == best.step  # the test metrics sit at the epoch whose weights they test
    # tested on the validation data itself: the test loss is the best epoch's validation loss
    assert result.test_loss == pytest.approx(min(val_losses), rel=1e-5) == pytest.approx(result.val_loss, rel=1e-5)
    assert result.test_loss < val_losses[-1]


def test_early_stopping_ends_the_run_and_keeps_the_same_best_weights(tmp_path):
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(64, 1, 28, 28, generator=generator)
    labels = torch.randint(0, 2, (64,), generator=generator)
    data = target_data(tm.TensorLoader(images, labels, 32), tm.TensorLoader(images, 1 - labels, 64),
                       tm.TensorLoader(images, 1 - labels, 64))
    outcomes = []
    for patience in (0, 3):
        torch.manual_seed(0)
        module = tm.LitModule(["a", "b"], learning_rate=1e-3)  # val loss rises steadily: one minimum
        args = template_args(tmp_path, "--patience", str(patience), version=f"p{patience}")
        trainer, result = tm.fit(module, data, "pretrain", 0, 12, args)
        outcomes.append((trainer.current_epoch, result))
    (full_epochs, result), (stopped_epochs, result_early) = outcomes
    assert full_epochs == 12 and stopped_epochs == result.best_epoch + 3 < 12  # stopped 3 epochs after the best
    assert result_early == result


def test_training_moves_weights_and_learns(tiny_data, tmp_path):
    root, _ = tiny_data
    data = tm.load_data("mnist", 200, str(root), seed=0)
    torch.manual_seed(0)
    module = tm.LitModule(tm.TARGETS["mnist"].label_names, learning_rate=3e-3)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    _, result = tm.fit(module, data, "pretrain", 0, 15, template_args(tmp_path))
    assert all(not torch.equal(before[k], v) for k, v in module.state_dict().items())
    assert result.test_acc > 0.5  # chance is 0.1


# ---- the whole experiment -----------------------------------------------------------------
def test_main_writes_five_runs_csv_and_hparams(tiny_args, tmp_path, capsys):
    assert tm.main(tiny_args) == 0
    logs = tmp_path / "logs"
    for run in RUNS:
        run_dir = logs / (run if "/" in run else f"{run}/version_0")
        assert list(run_dir.glob("events.out.tfevents.*")), run
        accumulator = events(run_dir)
        tags = accumulator.Tags()["scalars"]
        for metric in ("ce_loss", "accuracy"):
            for stage in ("train", "val", "test"):
                assert f"{metric}/{stage}" in tags
        assert "hp_metric" not in tags
        # the HPARAMS tab compares runs on these two metrics
        plugin = b"".join(accumulator.PluginTagToContent("hparams").values())
        for field in (b"accuracy/test", b"ce_loss/test", b"seed", b"n_train", b"mode", b"backbone"):
            assert field in plugin, (run, field)
    rows = read_csv(logs / "results_version_0.csv")
    assert list(rows[0]) == list(tm.RESULT_COLUMNS)
    assert [(r["target"], r["mode"]) for r in rows] == [
        ("mnist", "pretrain"), ("even-odd", "finetuned"), ("even-odd", "from_scratch"),
        ("fashion-mnist", "finetuned"), ("fashion-mnist", "from_scratch")]
    assert rows[0]["n_train"] == "40" and rows[1]["n_train"] == "20"
    assert all(0 <= float(r["test_acc"]) <= 1 and 1 <= int(r["best_epoch"]) <= 3 for r in rows[1:])
    out = capsys.readouterr().out
    # the run table: a line per run, with its best epoch and test accuracy
    table = [line for line in out.splitlines() if ": best epoch " in line]
    assert [line.split(":")[0] for line in table] == [f"{r['target']}/{r['mode']}" for r in rows]
    assert all(f"best epoch {r['best_epoch']}," in line and line.endswith(f"test accuracy {float(r['test_acc']):.4f}")
               for line, r in zip(table, rows))
    assert "Results: " in out and not list(logs.glob("*.md"))  # summaries are the harness's

    # a second invocation adds version_1 beside version_0; nothing is deleted
    assert tm.main(tiny_args + ["--targets", "even-odd"]) == 0
    assert (logs / "pretrain" / "version_0").is_dir() and (logs / "pretrain" / "version_1").is_dir()
    assert (logs / "even-odd" / "finetuned" / "version_1" / "n20_seed0_lr5e-05").is_dir()
    assert not (logs / "fashion-mnist" / "finetuned" / "version_1").exists()
    assert len(read_csv(logs / "results_version_1.csv")) == 3
    assert len(read_csv(logs / "results_version_0.csv")) == 5


def test_a_sweep_writes_its_markdown_and_only_overwrite_clears_the_folder(tiny_args, tmp_path, capsys):
    logs = tmp_path / "logs"
    assert cli.main(tiny_args) == 0
    out = capsys.readouterr().out
    # one seed, one size: one table of the runs, with their wall times, and no summary over seeds
    assert "best epoch" in out and "fashion-mnist  from_scratch" in out
    assert "paired difference" not in out and "95% CI" not in out and "n/a" not in out
    assert all(line.endswith(" s") for line in out.split("-----\n")[1].strip().splitlines()[:5])
    assert (logs / "results_version_0.md").read_text().startswith("# Test results\n")
    assert cli.main(tiny_args + ["--targets", "even-odd"]) == 0
    assert (logs / "results_version_1.csv").is_file()
    assert cli.main(tiny_args + ["--targets", "even-odd", "--overwrite"]) == 0
    assert sorted(p.name for p in (logs / "pretrain").iterdir()) == ["version_0"]
    assert not (logs / "results_version_1.csv").exists()


def test_same_seed_same_numbers(tiny_args, tmp_path):
    results = []
    for name in ("a.csv", "b.csv", "c.csv"):
        seed = "1" if name == "c.csv" else "0"
        assert tm.main(tiny_args + ["--seed", seed, "--results-csv", str(tmp_path / name)]) == 0
        results.append(read_csv(tmp_path / name))
    assert results[0] == results[1]
    assert [r["test_loss"] for r in results[0]] != [r["test_loss"] for r in results[2]]


def test_dry_run_runs_every_stage_and_leaves_no_logs(tiny_args, tmp_path, capsys):
    assert tm.main(tiny_args + ["--dry-run", "--results-csv", str(tmp_path / "dry.csv")]) == 0
    assert len(read_csv(tmp_path / "dry.csv")) == 5
    assert not (tmp_path / "logs").exists()
    assert "TensorBoard: tensorboard --logdir /tmp" in capsys.readouterr().out  # a temporary folder


# ---- bad input ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "extra, message",
    [
        (["--n-train", "3"], "even-odd: 3 images (+25% to validate) do not fit its 300; use 4 to 240"),
        (["--n-train", "250"], "even-odd: 250 images (+25% to validate) do not fit its 300"),
        (["--n-pretrain", "1000"], "mnist: 1000 images (+25% to validate) do not fit"),
    ],
)
def test_sizes_the_data_cannot_serve_exit_2(tiny_args, extra, message, capsys):
    assert tm.main(tiny_args + extra) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("extra", [["--targets", "cifar"], ["--train-epochs", "0"], ["--seed", "x"]])
def test_bad_flags_exit_2(tiny_args, extra):
    with pytest.raises(SystemExit) as exit_info:
        tm.main(tiny_args + extra)
    assert exit_info.value.code == 2


def test_missing_data_exits_2_with_one_clear_line(tmp_path, monkeypatch, capsys):
    # an address that refuses at once: no test ever reaches the real download servers
    monkeypatch.setattr(torchvision.datasets.MNIST, "mirrors", ["http://127.0.0.1:9/"])
    monkeypatch.setattr(torchvision.datasets.FashionMNIST, "mirrors", ["http://127.0.0.1:9/"])
    code = tm.main(["--data-dir", str(tmp_path / "empty"), "--log-dir", str(tmp_path / "logs")])
    captured = capsys.readouterr()
    assert code == 2
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in captured.out + captured.err
    # the source first: lenet takes its channels and size
    assert err.startswith(f"error: cannot read mnist in {tmp_path / 'empty'}: Error downloading")
    assert not list((tmp_path / "logs").glob("**/version_*"))


def test_overwrite_refuses_a_folder_it_did_not_write(tiny_args, tmp_path, capsys):
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "thesis.tex").write_text("precious")
    assert cli.main(tiny_args + ["--overwrite"]) == 2
    assert "--overwrite would delete" in capsys.readouterr().err
    assert (tmp_path / "logs" / "thesis.tex").read_text() == "precious"


def test_ctrl_c_stops_the_whole_experiment_and_keeps_finished_runs(tiny_args, tmp_path):
    results = tmp_path / "r.csv"
    args = [a if a != "3" else "100000" for a in tiny_args]  # target runs that would not end by themselves
    process = subprocess.Popen(
        [sys.executable, str(REPO / "transfer_mnist.py"), *args, "--results-csv", str(results)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
    )
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not (results.exists() and len(read_csv(results)) == 1):
        time.sleep(0.2)
    assert results.exists() and len(read_csv(results)) == 1, "pretraining did not finish in time"
    time.sleep(2)  # well inside the first target run
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=180)
    assert process.returncode != 0, err
    assert "Interrupted" in err and "Traceback" not in err, err
    assert [r["mode"] for r in read_csv(results)] == ["pretrain"]  # no run after the interrupted one
    assert (tmp_path / "logs" / "pretrain" / "version_0" / "checkpoints" / "best.ckpt").is_file()
    assert not (tmp_path / "logs" / "even-odd" / "from_scratch").exists()


@pytest.mark.skipif(not (SHARED_DATA / "MNIST" / "raw").is_dir(), reason="needs ../shared/data (the real files)")
def test_real_data_loads_offline_with_the_post_s_sizes():
    data = tm.load_data("fashion-mnist", 200, str(SHARED_DATA), seed=0)
    assert (len(data.train.labels), len(data.val.labels), len(data.test.labels)) == (200, 50, 10_000)
    pretraining = tm.load_data("mnist", 10_000, str(SHARED_DATA), seed=0)
    assert (len(pretraining.train.labels), len(pretraining.val.labels)) == (10_000, 2_500)


# ---- seeds, frozen arm, learning curves ---------------------------------------------------
def test_mean_and_95_percent_interval_on_known_numbers():
    ci = summary.MeanCI.of([1.0, 2.0, 3.0, 4.0, 5.0])
    assert (ci.n, ci.mean) == (5, 3.0)
    assert ci.sd == pytest.approx(1.581139, abs=1e-6)  # sqrt(2.5)
    half_width = 2.776445 * 1.581139 / 5**0.5  # t(0.975, 4) = 2.776445 (tables: 2.776)
    assert (ci.low, ci.high) == (pytest.approx(3 - half_width), pytest.approx(3 + half_width))
    assert ci.p == pytest.approx(0.013236, abs=1e-6)  # t = 3 / (1.581139 / sqrt 5) = 4.2426, 4 df, two-sided
    assert stats.t_975(1) == pytest.approx(12.7062, abs=1e-4) and stats.t_975(30) == pytest.approx(2.0423, abs=1e-4)
    assert stats.t_975(40) == pytest.approx(2.021075, abs=1e-4) and stats.t_975(120) == pytest.approx(1.979930, abs=1e-4)
    single = summary.MeanCI.of([0.5])
    assert single.mean == 0.5 and all(v != v for v in (single.sd, single.low, single.high, single.p))  # nan


def test_holm_adjusts_step_down_and_leaves_missing_p_values_out():
    adjusted = stats.holm([0.01, 0.04, 0.03, math.nan])  # 3 * 0.01; 2 * 0.03; 1 * 0.04, raised to 0.06
    assert adjusted[:3] == pytest.approx([0.03, 0.06, 0.06]) and math.isnan(adjusted[3])
    assert stats.holm([0.5, 0.6]) == [1.0, 1.0]  # at most 1


def test_paired_difference_is_taken_seed_by_seed():
    def run(mode, seed, acc, loss):
        return runs.RunResult("even-odd", mode, seed, 200, 10, loss, acc, 1e-4, 0.3, True, 500)
    results = [run("finetuned", 0, 0.90, 0.3), run("from_scratch", 0, 0.80, 0.5),
               run("finetuned", 1, 0.80, 0.4), run("from_scratch", 1, 0.75, 0.6),
               run("finetuned", 2, 0.85, 0.2), run("from_scratch", 2, 0.80, 0.5)]
    arms, differences = (table.values.tolist() for table in tables.summarize(results))
    assert [row[2] for row in arms] == ["finetuned", "from_scratch"]
    assert arms[0][4:6] == ["0.8500 ± 0.0500", "[0.7258, 0.9742]"]  # 0.85 ± 4.303 * 0.05 / sqrt(3)
    # differences 0.10, 0.05, 0.05: mean 0.0667, sd 0.0289, half-width 4.303 * 0.0289 / sqrt(3) = 0.0717
    (row,) = differences
    mean, sd = 0.2 / 3, (0.05**2 / 3) ** 0.5
    half_width = 4.302653 * sd / 3**0.5  # t(0.975, 2)
    assert row[2:6] == ["finetuned - from_scratch", "3", f"{mean:.4f} ± {sd:.4f}",
                        f"[{mean - half_width:.4f}, {mean + half_width:.4f}]"]
    assert row[5] == "[-0.0050, 0.1384]"
    assert row[6:8] == ["0.057", "0.057"]  # t = 4.0 on 2 df; Holm over one comparison leaves it
    assert row[8] == "-0.2333 ± 0.0577"


def test_frozen_arm_trains_the_head_only(tiny_data, tmp_path):
    root, _ = tiny_data
    data = tm.load_data("fashion-mnist", 40, str(root), seed=0)
    torch.manual_seed(0)
    module = tm.LitModule(tm.TARGETS["fashion-mnist"].label_names, learning_rate=1e-2, train_backbone=False)
    optimizer = module.configure_optimizers()
    head_params = sum(p.numel() for p in module.classification_head.parameters())
    assert sum(p.numel() for group in optimizer.param_groups for p in group["params"]) == head_params
    backbone_before = {k: v.clone() for k, v in module.convnet.state_dict().items()}
    head_before = {k: v.clone() for k, v in module.classification_head.state_dict().items()}
    tm.fit(module, data, "frozen", 0, 5, template_args(tmp_path))
    assert tensors_equal(module.convnet.state_dict(), backbone_before)
    assert all(not torch.equal(head_before[k], v) for k, v in module.classification_head.state_dict().items())
    # hparams.yaml loads as plain YAML; TensorBoard's HPARAMS name the backbone
    run = tmp_path / "fashion-mnist" / "frozen" / "version_0" / "n40_seed0_lr0.001"
    assert yaml.safe_load((run / "hparams.yaml").read_text())["train_backbone"] is False
    plugin = b"".join(events(run).PluginTagToContent("hparams").values())
    # the backbone, its weights (none: pretrained here) and the input it takes
    assert b"lenet" in plugin and b"1x28x28" in plugin and b"weights" in plugin


def test_seeds_sizes_and_arms(tiny_args, tmp_path, monkeypatch):
    drawn = {}  # (n_train, seed) -> training images of every run of that size and seed
    train = tm.train

    def recording_train(backbone, mode, data, args):
        drawn.setdefault((len(data.train.labels), args.seed), []).append(data.train.images)
        return train(backbone, mode, data, args)

    monkeypatch.setattr(tm, "train", recording_train)
    args = tiny_args + ["--targets", "even-odd", "--seeds", "3", "--seed", "4", "--n-train", "8", "20",
                        "--modes", "finetuned", "from_scratch", "frozen"]
    assert cli.main(args) == 0
    logs = tmp_path / "logs"
    rows = read_csv(logs / "results_version_0.csv")
    assert len(rows) == 1 + 2 * 3 * 3  # pretrain + sizes x seeds x arms
    assert {(r["n_train"], r["seed"]) for r in rows[1:]} == {(n, s) for n in ("8", "20") for s in ("4", "5", "6")}
    for key, images in drawn.items():
        # the three arms draw the same subset
        assert len(images) == 3 and all(torch.equal(images[0], other) for other in images[1:]), key
    for n_train in (8, 20):
        firsts = [drawn[(n_train, seed)][0] for seed in (4, 5, 6)]
        assert not torch.equal(firsts[0], firsts[1]) and not torch.equal(firsts[1], firsts[2])  # seeds differ

    summary = (logs / "results_version_0.md").read_text()
    assert "| even-odd | 20 | frozen | 3 |" in summary and "| even-odd | 8 | frozen − from_scratch | 3 |" in summary
    for mode in ("finetuned", "from_scratch", "frozen"):
        curve = events(logs / "learning_curve" / mode / "version_0")
        points = curve.Scalars("even-odd/test_accuracy")
        assert [p.step for p in points] == [8, 20]
        mean_acc = sum(float(r["test_acc"]) for r in rows if r["mode"] == mode and r["n_train"] == "20") / 3
        assert points[1].value == pytest.approx(mean_acc, rel=1e-5)
    assert (logs / "even-odd" / "frozen" / "version_0" / "n8_seed6_lr0.001").is_dir()
