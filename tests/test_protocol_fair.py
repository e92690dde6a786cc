"""One command for an honest answer: --protocol fair, target subsets apart from pretraining's images, LP-FT's
best epoch over both stages, augmentation's own random stream, and warnings where the answer is fragile."""

import json
import logging

import torch
import torchvision
from conftest import sweep_settings
from test_ray import read_csv

import transfer_mnist as tm
from sweeps import cli, data, runs, selection, settings, summary
from sweeps.augment import Augment


def test_fair_sets_what_the_command_line_does_not_give():
    cfg, given = settings.parse(["--protocol", "fair", "--seeds", "2", "--no-disjoint"])
    assert given == {"protocol", "seeds", "disjoint"}
    assert (cfg.seeds, cfg.disjoint) == (2, False)  # given: kept
    assert cfg.modes == tuple(tm.ARMS) and cfg.lr_grid == (1e-4, 3e-4, 1e-3, 3e-3, 1e-2) and cfg.widen
    assert cfg.select == "seed" and cfg.backbone_per_seed and cfg.stratify and not cfg.augment  # PROTOCOL.md
    assert cfg.shuffle and cfg.pretrain_lr_grid == (3e-4, 1e-3, 3e-3)
    assert (cfg.pretrain_epochs, cfg.pretrain_patience, cfg.train_epochs) == (400, 10, 3000)
    post, given = settings.parse([])
    assert given == set() and (post.seeds, post.modes, post.lr_grid, post.select) == (1, ("finetuned", "from_scratch"), (), "seed")
    assert not post.backbone_per_seed and not post.disjoint and not post.stratify and not post.widen
    assert (post.pretrain_epochs, post.pretrain_patience, post.n_val) == (50, None, None)  # the template's defaults
    assert not post.shuffle and post.pretrain_lr_grid == ()  # the post's order, the post's pretraining rate
    assert post.n_train == (200,) and post.train_epochs == 500 and post.lr == tm.parse_args([]).lr


def test_a_fair_run_saves_and_prints_the_resolved_settings(tiny_args, tmp_path, caplog):
    args = tiny_args + ["--protocol", "fair", "--targets", "even-odd", "--seeds", "2", "--modes", "finetuned",
                        "from_scratch", "--lr-grid", "1e-3", "3e-3", "--results-csv", str(tmp_path / "r.csv")]
    with caplog.at_level(logging.INFO, logger="transfer_mnist"):
        assert cli.main(args) == 0
    saved = json.loads((tmp_path / "r.json").read_text())["config"]
    assert saved["protocol"] == "fair" and saved["select"] == "seed" and saved["disjoint"] is True
    assert saved["backbone_per_seed"] is True and saved["seeds"] == 2 and saved["lr_grid"] == [1e-3, 3e-3]
    settings = next(m for m in caplog.messages if m.startswith("Settings:"))
    assert "protocol=fair" in settings and "select=seed" in settings and "disjoint=True" in settings
    # the protocol's rules, but not one of results/PROTOCOL.md's sweeps: nothing was named before it
    assert ("Not a sweep of results/PROTOCOL.md: its rules apply, with no primary comparison; Holm's adjustment "
            "runs over every comparison") in caplog.messages
    assert [r["seed"] for r in read_csv(tmp_path / "r.csv") if r["mode"] == "pretrain"] == ["0", "1"]
    grids = json.loads((tmp_path / "r.json").read_text())["checkpoints"]  # each backbone of the best of 3 rates
    assert all(set(grids[seed]["pretraining val_loss by rate"]) == {"0.0003", "0.001", "0.003"} for seed in "01")
    start = next(m for m in caplog.messages if m.startswith("even-odd: 20 training + 5 validation images a run"))
    assert "seeds 0-1; per class even " in start and start.endswith(
        "pretraining saw 0 of the training and 0 of the validation images")


def test_disjoint_subsets_hold_no_image_that_pretraining_saw(tiny_data, monkeypatch):
    root, labels = tiny_data
    monkeypatch.setitem(tm.TARGETS, "digits-5-9", tm.Target(torchvision.datasets.MNIST, ("5", "6", "7", "8", "9"),
                                                            keep=lambda y: y >= 5, relabel=lambda y: y - 5))
    for target in ("even-odd", "digits-5-9"):
        overlap = {}
        for disjoint in (False, True):
            cfg = sweep_settings(["--data-dir", str(root), "--n-pretrain", "40", "--backbone-per-seed"]
                                 + ["--disjoint"] * disjoint)
            tm.read_split.cache_clear()
            positions = data.file_positions(target, str(root))
            overlap[disjoint] = 0
            for seed in range(5):
                subsets = data.draw_subset(target, 20, data.available_images(cfg, target, seed)[0], seed)
                seen = data.pretraining_images(cfg, seed)  # its own backbone's images: 40 + 10 of 300
                overlap[disjoint] += sum(int(torch.isin(positions[idx], seen).sum()) for idx in subsets)
        assert overlap[False] > 0 and overlap[True] == 0, (target, overlap)
    # FashionMNIST reads other files: nothing to keep apart
    cfg = sweep_settings(["--data-dir", str(root), "--n-pretrain", "40", "--disjoint"])
    assert len(data.available_images(cfg, "fashion-mnist", 0)[0]) == len(labels["FashionMNIST"]["train"])


def test_disjoint_subsets_shrink_what_a_target_can_draw(tiny_args, capsys):
    # 300 tiny MNIST images, 50 of them pretraining's: 250 left, so at most 200 training images
    assert cli.main(tiny_args + ["--dry-run", "--targets", "even-odd", "--n-train", "210", "--modes", "finetuned"]) == 0
    capsys.readouterr()
    assert cli.main(tiny_args + ["--dry-run", "--disjoint", "--targets", "even-odd", "--n-train", "210",
                                "--modes", "finetuned"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: --n-train 210 and a quarter as many to validate do not fit the 250 images of even-odd "
                   "without the 50 images that pretraining used; use 4 to 200")


def test_lp_ft_keeps_the_head_stage_s_weights_when_fine_tuning_never_beats_them(tiny_args, tmp_path, monkeypatch):
    ends, fit = [], tm.fit

    def recording_fit(module, *args, **kwargs):
        out = fit(module, *args, **kwargs)
        ends.append({k: v.clone() for k, v in module.state_dict().items()})
        return out

    monkeypatch.setattr(tm, "fit", recording_fit)
    args = tiny_args + ["--targets", "even-odd", "--modes", "lp_ft", "--train-epochs", "10", "--patience", "0",
                        "--lr", "lp_ft=1e30", "--results-csv", str(tmp_path / "r.csv")]  # a rate that wrecks the backbone: NaN
    assert cli.main(args) == 0
    (row,) = [r for r in read_csv(tmp_path / "r.csv") if r["mode"] == "lp_ft"]
    assert int(row["best_epoch"]) <= 2  # an epoch of the head stage (the first fifth)
    head_stage, tested = ends[-2:]
    assert all(torch.equal(head_stage[k], tested[k]) for k in tested)  # tested with the head stage's weights


def test_augmentation_draws_from_a_stream_of_its_own():
    images = torch.randn(8, 1, 28, 28)
    first, again, other = Augment(0), Augment(0), Augment(1)
    assert torch.equal(first(images), again(images))  # every arm of a seed: the same transforms
    assert not torch.equal(first(images), other(images))
    weights_stream = torch.Generator().manual_seed(0)  # what seed_everything(0) starts the weights from
    own = torch.Generator().manual_seed(Augment(0).seed)
    assert not torch.equal(torch.rand(4, 8, generator=weights_stream), torch.rand(4, 8, generator=own))


def run(mode, seed, rate, val_loss, best_epoch=10, selected=True, max_epochs=100):
    return runs.RunResult("t", mode, seed, 20, best_epoch, 0.3, 0.9, rate, val_loss, selected, max_epochs)


def test_warnings_name_a_weak_backbone_late_runs_grid_edges_and_fixed_rates(tmp_path):
    weak = run("pretrain", 0, 1e-4, 0.5, best_epoch=5, max_epochs=5)
    fixed = [weak, run("finetuned", 0, 5e-5, 0.4, best_epoch=95), run("from_scratch", 0, 1e-4, 0.4)]
    warnings = summary.fragile(fixed)
    assert warnings[0].startswith("1 of 1 backbones (seed 0) were still improving when pretraining stopped: best "
                                  "validation loss at epoch 5 of 5 (test accuracy 0.9000)")
    assert "raise --pretrain-epochs" in warnings[0] and "weak" not in warnings[0]
    assert warnings[1] == ("finetuned: 1 of 1 selected runs were still improving in the last tenth of their epochs; "
                           "their test accuracy may be understated: raise --train-epochs")
    assert "--protocol fair" in warnings[2] and len(warnings) == 3
    grid = [run("finetuned", 0, rate, loss) for rate, loss in [(1e-4, 0.3), (1e-3, 0.4), (1e-2, 0.5)]]
    assert summary.fragile(selection.select_rates(grid)) == [
        "1 of 1 selected runs have their rate at an edge of the rates run: the best rate may lie beyond; widen "
        "--lr-grid (or --widen)"]
    assert summary.fragile(selection.select_rates(grid[1:])) == [
        "a grid of fewer than 3 rates cannot tell whether the best rate lies outside it"]
    # a pick at 1e-6, where --widen stops, is named so: widening more is not the advice
    bounded = [run("finetuned", 0, rate, loss) for rate, loss in [(1e-6, 0.3), (3e-6, 0.3), (9e-6, 0.4)]]
    assert summary.fragile(selection.select_rates(bounded, "seed")) == [
        "1 of 1 selected runs have their rate at 1e-06 or 1, where --widen stops: the rates beyond were not tried"]
    assert summary.budget_table(selection.select_rates(bounded, "seed")).values.tolist()[0][5] == "0 of 1"  # not 'at an edge'
    summary.write_summary(fixed, str(tmp_path / "r.md"))
    assert "## Warnings\n\n- 1 of 1 backbones (seed 0) were still improving" in (tmp_path / "r.md").read_text()


def test_the_console_ends_with_the_warnings(tiny_args, tmp_path, capsys):
    assert cli.main(tiny_args + ["--targets", "even-odd", "--results-csv", str(tmp_path / "r.csv")]) == 0
    out = capsys.readouterr().out
    assert "Warning: 1 of 1 backbones (seed 0) were still improving when pretraining stopped: best validation loss " \
           "at epoch 2 of 2" in out
    assert out.rstrip().splitlines()[-2].startswith("Warning: every arm ran at one fixed learning rate")


def test_a_selected_run_near_chance_on_validation_is_named():
    def selected(seed, val_loss):
        return runs.RunResult("even-odd", "from_scratch", seed, 200, 10, 0.5, 0.9, 1e-2, val_loss, True, 3000)
    # seed 103 of the even/odd redo: 0.6836 against ln 2 = 0.6931, 49.3% on test
    named = [w for w in summary.fragile([selected(103, 0.6836), selected(104, 0.60)]) if "than chance" in w]
    assert len(named) == 1 and named[0].startswith("even-odd/from_scratch n_train 200 seed 103 (lr 0.01), a selected "
                                                   "run, is no better than chance on validation (loss 0.6836")
