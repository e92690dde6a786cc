"""A robust answer: augmentation, a backbone per seed and pooled rate selection. Tiny data only."""

import argparse
import csv
import json
from pathlib import Path

import pytest
import torch
from conftest import template_args

import transfer_mnist as tm
from sweeps import cli, resume, runs, selection, summary
from sweeps.augment import Augment
from sweeps.data import TrainingBatches


def read_csv(path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def run(seed=0, learning_rate=1e-3, val_loss=0.3, mode="finetuned", n_train=200, test_acc=0.9) -> runs.RunResult:
    return runs.RunResult("even-odd", mode, seed, n_train, 10, 0.3, test_acc, learning_rate, val_loss, False, 500)


# ---- augmentation -------------------------------------------------------------------------
def test_augmentation_is_deterministic_per_seed_and_differs_between_images_and_epochs(tiny_data):
    root, _ = tiny_data
    images = tm.load_data("even-odd", 20, str(root), seed=0).train.images[:4]
    same = Augment(seed=3)
    first, again = same(images), Augment(seed=3)(images)
    assert torch.equal(first, again)  # a rerun gives the same numbers
    assert not torch.equal(first, Augment(seed=4)(images))  # another seed, other transforms
    assert not torch.equal(same(images), first)  # the next epoch draws new transforms
    assert first.shape == images.shape and not torch.equal(first, images)
    moved = (first - images).abs().flatten(1).sum(dim=1)
    assert (moved > 0).all()
    shifts = [torch.equal(first[i], first[j]) for i in range(4) for j in range(i)]
    assert not any(shifts)  # every image its own transform
    # the background stays background (border padding), and nothing is mirrored: the mean image moves little
    background = images.min()
    assert first.min() >= background - 1e-5


def test_augmentation_touches_training_batches_only_and_keeps_labels(tiny_data, tmp_path, monkeypatch):
    root, _ = tiny_data
    seen = {"train": [], "val": [], "test": []}
    step = tm.LitModule.step

    def recording(self, batch, stage):
        seen[stage].append((batch[0].clone(), batch[1].clone()))
        return step(self, batch, stage)

    monkeypatch.setattr(tm.LitModule, "step", recording)
    plain = tm.load_data("even-odd", 20, str(root), seed=0)
    data = tm.load_data("even-odd", 20, str(root), seed=0)
    data.train = TrainingBatches(data.train, 0, shuffle=False, augment=True)
    module = tm.LitModule(("even", "odd"), learning_rate=1e-3)
    tm.fit(module, data, "from_scratch", 0, 2, template_args(tmp_path, "--patience", "0"))
    (train_images, train_labels), second_epoch = seen["train"][0], seen["train"][1]
    assert torch.equal(train_labels, plain.train.labels[: len(train_labels)])  # labels kept
    assert not torch.equal(train_images, plain.train.images[: len(train_labels)])  # images transformed
    assert not torch.equal(second_epoch[0], train_images)  # new transforms each epoch
    assert torch.equal(seen["val"][0][0], plain.val.images) and torch.equal(seen["test"][0][0], plain.test.images)


def test_augment_changes_the_target_runs_and_not_the_default(tiny_args, tmp_path):
    common = tiny_args + ["--targets", "even-odd", "--modes", "finetuned"]
    assert cli.main(common + ["--results-csv", str(tmp_path / "plain.csv")]) == 0
    assert cli.main(common + ["--augment", "--results-csv", str(tmp_path / "a1.csv")]) == 0
    assert cli.main(common + ["--augment", "--results-csv", str(tmp_path / "a2.csv")]) == 0
    plain, augmented = read_csv(tmp_path / "plain.csv"), read_csv(tmp_path / "a1.csv")
    assert (tmp_path / "a1.csv").read_bytes() == (tmp_path / "a2.csv").read_bytes()
    assert plain[0] == augmented[0]  # pretraining is not augmented
    assert plain[1]["val_loss"] != augmented[1]["val_loss"]


# ---- a backbone per seed ------------------------------------------------------------------
def test_each_seed_pretrains_its_own_backbone_and_its_runs_start_from_it(tiny_args, tmp_path, monkeypatch):
    used = []  # (seed of the target run, first backbone tensor it started from)
    train = tm.train

    def recording(backbone, mode, data, args):
        used.append((args.seed, backbone["0.weight"].clone()))
        return train(backbone, mode, data, args)

    monkeypatch.setattr(tm, "train", recording)
    assert cli.main(tiny_args + ["--targets", "even-odd", "--modes", "finetuned", "from_scratch", "--seeds", "2",
                                "--backbone-per-seed", "--results-csv", str(tmp_path / "r.csv")]) == 0
    rows = read_csv(tmp_path / "r.csv")
    pretraining = [r for r in rows if r["mode"] == "pretrain"]
    assert [r["seed"] for r in pretraining] == ["0", "1"] and pretraining[0]["test_loss"] != pretraining[1]["test_loss"]
    for seed in (0, 1):
        checkpoint = tm.read_backbone(str(tmp_path / "logs" / "pretrain" / "version_0" / f"seed{seed}" / "checkpoints"
                                          / "best.ckpt"))
        assert all(torch.equal(weight, checkpoint["0.weight"]) for s, weight in used if s == seed)
    assert not torch.equal(used[0][1], used[-1][1])  # the seeds' backbones differ


# ---- pooled selection ---------------------------------------------------------------------
def test_mean_selection_marks_one_rate_per_group_the_lowest_mean_validation_loss():
    # per seed, seed 0 prefers 1e-3 and seed 1 prefers 1e-2; by the mean, 1e-3 has the lower (0.25 < 0.3)
    results = [run(0, 1e-3, 0.1), run(0, 1e-2, 0.2), run(1, 1e-3, 0.4), run(1, 1e-2, 0.4 - 0.01),
               run(0, 1e-3, 0.5, mode="from_scratch"), run(0, 1e-2, 0.4, mode="from_scratch")]
    selection.select_rates(results, "seed")
    assert [r.selected for r in results] == [True, False, False, True, False, True]
    selection.select_rates(results, "mean")
    assert [r.selected for r in results] == [True, False, True, False, False, True]
    (finetuned, _) = summary.budget_table(results).values.tolist()
    assert finetuned[4] == "0.001 ×2"


def test_report_select_mean_reproduces_the_run_s_markdown(tiny_args, tmp_path):
    args = tiny_args + ["--targets", "even-odd", "--modes", "finetuned", "from_scratch", "--seeds", "2",
                        "--lr-grid", "1e-3", "1e-2", "3e-2"]
    assert cli.main(args + ["--select", "mean", "--results-csv", str(tmp_path / "mean.csv")]) == 0
    markdown = (tmp_path / "mean.md").read_text()
    assert "one rate per (target, arm, n_train): the lowest mean validation loss over seeds" in markdown
    rows = read_csv(tmp_path / "mean.csv")
    for mode in ("finetuned", "from_scratch"):
        chosen = {r["learning_rate"] for r in rows if r["mode"] == mode and r["selected"] == "true"}
        assert len(chosen) == 1 and sum(r["selected"] == "true" for r in rows if r["mode"] == mode) == 2
    # re-analysed without training: per seed, then by the mean again, which gives the run's files byte for byte
    assert cli.main(["--report", str(tmp_path / "mean.csv"), "--select", "seed",
                    "--results-csv", str(tmp_path / "seed.csv")]) == 0
    assert "each seed's own validation loss" in (tmp_path / "seed.md").read_text()
    per_seed = selection.select_rates(runs.read_results([str(tmp_path / "seed.csv")]), "seed")
    assert [r.selected for r in per_seed] == [r["selected"] == "true" for r in read_csv(tmp_path / "seed.csv")]
    assert cli.main(["--report", str(tmp_path / "seed.csv"), "--select", "mean",
                    "--results-csv", str(tmp_path / "re.csv")]) == 0
    # seed.csv has no settings beside it: the report says so and what it assumed, and is otherwise the same
    warning = "- seed.csv has no settings beside it (seed.json): its planned seeds, sizes and rates are taken"
    lines = (tmp_path / "re.md").read_text().splitlines(keepends=True)
    assert sum(line.startswith(warning.replace("seed.csv", str(tmp_path / "seed.csv"))) for line in lines) == 1
    # nor can it say which backbone the runs trained, which the sweep's own summary opens with
    own = (tmp_path / "mean.md").read_text().replace("Backbone: lenet pretrained here on mnist.\n\n", "")
    assert "".join(line for line in lines if "seed.json" not in line) == own
    assert (tmp_path / "re.csv").read_bytes() == (tmp_path / "mean.csv").read_bytes()
    saved = json.loads((tmp_path / "mean.json").read_text())
    assert saved["format"] == resume.FORMAT and saved["config"]["select"] == "mean"


def test_settings_of_another_format_are_read_as_none_and_not_resumed(tmp_path, caplog):
    # results/*.json were migrated once to FORMAT; settings of an earlier version are not guessed at
    (tmp_path / "s.json").write_text(json.dumps({"format": 2, "config": {"select": "pooled"}}))
    assert resume.saved_settings(tmp_path / "s.csv") == {}
    assert "is in another format of settings (2, this code reads 3)" in caplog.text
    (tmp_path / "s.csv").write_text("target\n")
    with pytest.raises(tm.ExperimentError, match=r"cannot read the sweep's settings .*format 2, this code reads 3"):
        resume.resume_settings(argparse.Namespace(resume=str(tmp_path / "s.csv")), {"resume"})


def test_every_committed_sweep_s_settings_are_in_the_one_format():
    for path in Path("results").glob("*.json"):
        saved = json.loads(path.read_text())
        assert saved["format"] == resume.FORMAT and saved["weights"] is None, path
        assert {"backbone", "weights", "image_size", "shuffle", "pretrain_lr_grid"} <= saved["config"].keys()


def test_a_backbone_per_seed_sweep_resumes_with_its_backbones(tiny_args, tmp_path, monkeypatch):
    args = tiny_args + ["--targets", "even-odd", "--modes", "finetuned", "--seeds", "2", "--backbone-per-seed"]
    assert cli.main(args + ["--results-csv", str(tmp_path / "whole.csv")]) == 0
    pretrain, calls = tm.pretrain, []

    def stopped_at_the_second_seed(cfg, seed, *args):
        calls.append(seed)
        if seed == 1:
            raise KeyboardInterrupt
        return pretrain(cfg, seed, *args)

    monkeypatch.setattr(tm, "pretrain", stopped_at_the_second_seed)
    assert cli.main(args + ["--log-dir", str(tmp_path / "logs2"), "--results-csv", str(tmp_path / "r.csv")]) == 130
    monkeypatch.setattr(tm, "pretrain", lambda cfg, seed, *args: calls.append(seed) or pretrain(cfg, seed, *args))
    assert cli.main(["--resume", str(tmp_path / "r.csv")]) == 0
    assert calls == [0, 1, 1]  # seed 0's backbone was reused, seed 1's pretrained on resuming
    assert (tmp_path / "r.csv").read_bytes() == (tmp_path / "whole.csv").read_bytes()


def test_a_sweep_stopped_in_its_second_pretraining_resumes_elsewhere_with_another_log_dir(tiny_args, tmp_path,
                                                                                          monkeypatch):
    args = tiny_args + ["--targets", "even-odd", "--modes", "finetuned", "--seeds", "2", "--backbone-per-seed"]
    assert cli.main(args + ["--results-csv", str(tmp_path / "whole.csv")]) == 0
    pretrain = tm.pretrain

    def stopped_at_the_second_seed(cfg, seed, *rest):
        if seed == 1:
            raise KeyboardInterrupt
        return pretrain(cfg, seed, *rest)

    monkeypatch.setattr(tm, "pretrain", stopped_at_the_second_seed)
    assert cli.main(args + ["--log-dir", str(tmp_path / "logs2"), "--results-csv", str(tmp_path / "r.csv")]) == 130
    monkeypatch.setattr(tm, "pretrain", pretrain)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert cli.main(["--resume", str(tmp_path / "r.csv"), "--log-dir", "other"]) == 0
    assert (tmp_path / "r.csv").read_bytes() == (tmp_path / "whole.csv").read_bytes()
    checkpoints = json.loads((tmp_path / "r.json").read_text())["checkpoints"]
    second = tmp_path / checkpoints["1"]["path"]  # recorded where it was written, relative to the CSV
    assert second.resolve() == (tmp_path / "elsewhere" / "other" / "pretrain" / "version_0" / "seed1" / "checkpoints"
                                / "best.ckpt").resolve()
    assert checkpoints["1"]["sha256"] == resume.sha256(second.read_bytes())
    assert cli.main(["--resume", str(tmp_path / "r.csv")]) == 0  # and it resumes again, nothing left to run


def test_shuffled_batches_keep_each_image_with_its_label_in_a_new_seeded_order_every_epoch(tiny_data):
    root, _ = tiny_data
    plain = tm.load_data("mnist", 200, str(root), seed=0).train
    batches = TrainingBatches(plain, 3, shuffle=True, augment=False)
    first, second = [list(batches) for _ in range(2)]
    assert [len(y) for _, y in first] == [len(y) for _, y in plain] and len(batches) == len(plain)
    order = torch.cat([y for _, y in first])
    assert not torch.equal(order, plain.labels) and not torch.equal(order, torch.cat([y for _, y in second]))
    # every image with its own label: the pairs are the fixed order's, permuted
    pairs = {(float(x.sum()), int(y)) for images, labels in first for x, y in zip(images, labels)}
    assert pairs == {(float(x.sum()), int(y)) for x, y in zip(plain.images, plain.labels)}
    rerun = TrainingBatches(plain, 3, shuffle=True, augment=False)
    again = [list(rerun) for _ in range(2)]
    assert all(torch.equal(a[1], b[1]) for a, b in zip(first + second, again[0] + again[1]))  # seeded
    assert first[0][0].is_contiguous(memory_format=torch.channels_last)


def test_shuffle_reorders_pretraining_and_target_runs_and_the_post_keeps_its_order(tiny_args, tmp_path):
    # two batches a run (of 128): within a batch the order does not matter
    common = tiny_args + ["--targets", "even-odd", "--modes", "finetuned", "--n-pretrain", "200", "--n-train", "160"]
    assert cli.main(common + ["--results-csv", str(tmp_path / "post.csv")]) == 0
    assert cli.main(common + ["--shuffle", "--results-csv", str(tmp_path / "s1.csv")]) == 0
    assert cli.main(common + ["--shuffle", "--results-csv", str(tmp_path / "s2.csv")]) == 0
    post, shuffled = read_csv(tmp_path / "post.csv"), read_csv(tmp_path / "s1.csv")
    assert (tmp_path / "s1.csv").read_bytes() == (tmp_path / "s2.csv").read_bytes()  # the same seed, the same
    assert post[0]["val_loss"] != shuffled[0]["val_loss"] and post[1]["val_loss"] != shuffled[1]["val_loss"]
    assert json.loads((tmp_path / "s1.json").read_text())["config"]["shuffle"] is True
