"""A fair answer: the learning-rate grid selected on validation data, the two-stage LP-FT arm, the
figure, and --report. Tiny data only (see conftest.py)."""

import csv

import pytest
import torch
from conftest import sweep_settings
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import transfer_mnist as tm
from sweeps import cli, figures, runs, selection, summary, tables


def read_csv(path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def run(target="even-odd", mode="finetuned", seed=0, n_train=200, best_epoch=10, test_loss=0.5, test_acc=0.8,
        learning_rate=1e-4, val_loss=0.4, selected=True, max_epochs=100) -> runs.RunResult:
    return runs.RunResult(target, mode, seed, n_train, best_epoch, test_loss, test_acc, learning_rate, val_loss,
                        selected, max_epochs)


# ---- the learning-rate grid ---------------------------------------------------------------
def test_the_rate_is_selected_on_validation_loss_never_on_test():
    # the rate with the best test accuracy has the worse validation loss: validation decides
    grid = [run(learning_rate=1e-4, val_loss=0.30, test_acc=0.70), run(learning_rate=1e-3, val_loss=0.35, test_acc=0.95),
            run(seed=1, learning_rate=1e-4, val_loss=0.40, test_acc=0.90), run(seed=1, learning_rate=1e-3, val_loss=0.20, test_acc=0.60)]
    selection.select_rates(grid)
    assert [r.selected for r in grid] == [True, False, False, True]
    (arm,) = [row for row in tables.summarize(grid)[0].values.tolist() if row[2] == "finetuned"]
    assert arm[4].startswith("0.6500 ± ")  # the mean of the selected runs' test accuracy: (0.70 + 0.60) / 2
    tie = selection.select_rates([run(learning_rate=1e-3, val_loss=0.3), run(learning_rate=1e-4, val_loss=0.3)])
    assert [r.selected for r in tie] == [False, True]  # a tie goes to the lower rate


def test_a_grid_trains_every_rate_and_selects_one_per_run(tiny_args, tmp_path):
    args = tiny_args + ["--targets", "even-odd", "--modes", "finetuned", "from_scratch", "--seeds", "2",
                        "--lr-grid", "1e-4", "3e-2", "--results-csv", str(tmp_path / "r.csv")]
    assert cli.main(args) == 0
    rows = read_csv(tmp_path / "r.csv")
    assert list(rows[0])[:10] == ["target", "mode", "seed", "n_train", "best_epoch", "test_loss", "test_acc",
                                  "learning_rate", "val_loss", "selected"]
    groups = {}
    for r in rows[1:]:
        groups.setdefault((r["mode"], r["seed"]), []).append(r)
    assert len(groups) == 4 and all(sorted(float(r["learning_rate"]) for r in g) == [1e-4, 3e-2] for g in groups.values())
    for g in groups.values():
        (chosen,) = [r for r in g if r["selected"] == "true"]
        assert float(chosen["val_loss"]) == min(float(r["val_loss"]) for r in g)
    assert (tmp_path / "logs" / "even-odd" / "finetuned" / "version_0" / "n20_seed1_lr0.03").is_dir()
    summary = (tmp_path / "r.md").read_text()
    assert "| even-odd | finetuned | 2 |" in summary and "of 2 |" in summary  # rates chosen, edges, late bests


def test_the_budget_table_counts_rates_edges_and_runs_still_improving():
    results = selection.select_rates([
        run(seed=0, learning_rate=1e-4, val_loss=0.2), run(seed=0, learning_rate=1e-3, val_loss=0.3),
        run(seed=0, learning_rate=1e-2, val_loss=0.4),
        *(run(seed=1, learning_rate=rate, val_loss=loss, best_epoch=95) for rate, loss in ((1e-4, 0.4), (1e-3, 0.1),
                                                                                            (1e-2, 0.4))),
        run(mode="from_scratch", learning_rate=3e-4, best_epoch=100)])
    rows = {row[1]: row for row in summary.budget_table(results).values.tolist()}
    # seed 0 chose the grid's lowest rate (an edge); seed 1 the middle, every rate of its still improving at 95 of 100
    assert rows["finetuned"][2:] == ["2", "0.0001, 0.001, 0.01", "0.0001 ×1, 0.001 ×1", "1 of 2", "1 of 2"]
    assert rows["from_scratch"][2:] == ["1", "0.0003", "0.0003 ×1", "no grid", "1 of 1"]


def test_lr_grid_refuses_rates_that_are_not_positive(capsys):
    with pytest.raises(SystemExit) as exit_info:
        sweep_settings(["--lr-grid", "1e-3", "-1"])
    assert exit_info.value.code == 2 and "--lr-grid" in capsys.readouterr().err


@pytest.mark.parametrize("flag, value, said", [
    ("--min-delta", "inf", "must be 0 or more, not inf"),
    ("--min-delta", "nan", "must be 0 or more, not nan"),
    ("--patience", "-1", "must be 0 or more, not -1"),
    ("--gpus-per-run", "1.5", "must be from 0 to 1, not 1.5"),
])
def test_flags_with_a_range_refuse_values_outside_it_in_one_line(flag, value, said, capsys):
    with pytest.raises(SystemExit) as exit_info:
        sweep_settings([flag, value])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_info.value.code == 2 and err.endswith(f"argument {flag}: {said}")


# ---- LP-FT: the head first, then every weight --------------------------------------------
def test_lp_ft_trains_the_head_on_a_frozen_backbone_then_everything(tiny_args, tmp_path, monkeypatch):
    stages = []  # per fit: (run, epochs it may run, state before, state after, trainable names)
    fit = tm.fit

    def recording_fit(module, data, mode, seed, budget, args, test=True):
        before = {k: v.clone() for k, v in module.state_dict().items()}
        trainable = {name for name, p in module.named_parameters() if p.requires_grad}
        out = fit(module, data, mode, seed, budget, args, test)
        stages.append((f"{data.target}/{mode}", budget - module.epochs_before * test, before,
                       {k: v.clone() for k, v in module.state_dict().items()}, trainable))
        return out

    monkeypatch.setattr(tm, "fit", recording_fit)
    args = tiny_args + ["--targets", "even-odd", "--modes", "lp_ft", "--train-epochs", "10", "--patience", "0",
                        "--lr", "lp_ft=3e-3", "--results-csv", str(tmp_path / "r.csv")]
    assert cli.main(args) == 0
    (head_epochs, head_start, head_end, head_trainable), (rest, tune_start, tune_end, tune_trainable) = \
        [stage[1:] for stage in stages if stage[0] == "even-odd/lp_ft"]
    assert (head_epochs, rest) == (2, 8)  # a fifth of the 10-epoch budget for the head, the rest for everything
    backbone = [k for k in head_start if k.startswith("convnet.")]
    head = [k for k in head_start if k.startswith("classification_head.")]
    assert head_trainable == {f"classification_head.{k}" for k in tm.classification_head(120, 2).state_dict()}
    assert all(torch.equal(head_start[k], head_end[k]) for k in backbone)  # stage 1: backbone bit-identical
    assert all(not torch.equal(head_start[k], head_end[k]) for k in head)  # and the head learnt
    assert all(torch.equal(head_end[k], tune_start[k]) for k in head_end)  # stage 2 starts where stage 1 ended
    assert tune_trainable == set(dict(tm.LitModule(["a", "b"], learning_rate=1.0).named_parameters()))
    assert all(not torch.equal(tune_start[k], tune_end[k]) for k in backbone)  # stage 2 moves the backbone
    (row,) = [r for r in read_csv(tmp_path / "r.csv") if r["mode"] == "lp_ft"]
    assert float(row["learning_rate"]) == 3e-3 and 3 <= int(row["best_epoch"]) <= 10  # counted across stages
    accumulator = EventAccumulator(str(tmp_path / "logs" / "even-odd" / "lp_ft" / "version_0" / "n20_seed0_lr0.003"))
    accumulator.Reload()
    assert [e.step for e in accumulator.Scalars("ce_loss/val")] == list(range(1, 11))  # one curve, both stages


def test_lp_ft_is_paired_with_from_scratch(tiny_args, tmp_path):
    args = tiny_args + ["--targets", "even-odd", "--modes", "lp_ft", "from_scratch", "finetuned", "--seeds", "2",
                        "--results-csv", str(tmp_path / "r.csv")]
    assert cli.main(args) == 0
    summary = (tmp_path / "r.md").read_text()
    assert "| even-odd | 20 | lp_ft − from_scratch | 2 |" in summary
    # not a sweep of results/PROTOCOL.md: nothing is primary
    assert "| even-odd | 20 | finetuned − from_scratch | 2 |" in summary and "(primary)" not in summary


# ---- --report and the figure --------------------------------------------------------------
def test_report_rebuilds_the_markdown_byte_for_byte_and_merges_seed_ranges(tiny_args, tmp_path):
    common = tiny_args + ["--targets", "even-odd", "--modes", "finetuned", "from_scratch", "--lr-grid", "1e-3", "1e-2"]
    assert cli.main(common + ["--seeds", "2", "--results-csv", str(tmp_path / "both.csv")]) == 0
    assert cli.main(["--report", str(tmp_path / "both.csv"), "--results-csv", str(tmp_path / "rebuilt.csv")]) == 0
    assert (tmp_path / "rebuilt.md").read_bytes() == (tmp_path / "both.md").read_bytes()
    assert (tmp_path / "rebuilt.csv").read_bytes() == (tmp_path / "both.csv").read_bytes()

    # the same two seeds run as two invocations (two machines, say), merged
    assert cli.main(common + ["--seed", "0", "--results-csv", str(tmp_path / "a.csv")]) == 0
    assert cli.main(common + ["--seed", "1", "--pretrain-seed", "0", "--results-csv", str(tmp_path / "b.csv")]) == 0
    assert cli.main(["--report", str(tmp_path / "a.csv"), str(tmp_path / "b.csv"),
                    "--results-csv", str(tmp_path / "merged.csv")]) == 0
    assert (tmp_path / "merged.md").read_bytes() == (tmp_path / "both.md").read_bytes()
    assert len(read_csv(tmp_path / "merged.csv")) == 1 + 2 * 2 * 2  # one pretrain row, seeds x arms x rates

    # without --results-csv the output goes beside the first CSV
    (tmp_path / "a.md").unlink()
    assert cli.main(["--report", str(tmp_path / "a.csv")]) == 0
    assert (tmp_path / "a.md").is_file() and (tmp_path / "a.png").is_file()


def test_report_refuses_conflicting_rows_and_files_that_are_not_results(tiny_args, tmp_path, capsys):
    assert cli.main(tiny_args + ["--targets", "even-odd", "--results-csv", str(tmp_path / "r.csv")]) == 0
    rows = read_csv(tmp_path / "r.csv")
    rows[1]["test_acc"] = str(float(rows[1]["test_acc"]) / 2)
    with open(tmp_path / "bad.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (tmp_path / "notes.csv").write_text("a,b\n1,2\n")
    capsys.readouterr()
    for files, message in (([tmp_path / "r.csv", tmp_path / "bad.csv"], "same run (even-odd/finetuned n_train"),
                           ([tmp_path / "notes.csv"], "is not a results CSV of this script"),
                           ([tmp_path / "missing.csv"], "cannot be read")):
        assert cli.main(["--report", *map(str, files), "--results-csv", str(tmp_path / "m.csv")]) == 2
        captured = capsys.readouterr()
        assert "Traceback" not in captured.err and len(captured.err.strip().splitlines()) == 1
        assert message in captured.err
    # the same file twice is the same rows, not a conflict
    assert cli.main(["--report", str(tmp_path / "r.csv"), str(tmp_path / "r.csv"), "--results-csv",
                    str(tmp_path / "twice.csv")]) == 0
    assert (tmp_path / "twice.csv").read_bytes() == (tmp_path / "r.csv").read_bytes()


def test_the_figure_shows_the_summary_s_numbers():
    results = [run(n_train=n, seed=s, mode=mode, test_acc=acc)
               for n, s, mode, acc in [(50, 0, "finetuned", 0.8), (50, 1, "finetuned", 0.9), (50, 0, "from_scratch", 0.7),
                                       (50, 1, "from_scratch", 0.6), (200, 0, "finetuned", 0.95), (200, 1, "finetuned", 0.93),
                                       (200, 0, "from_scratch", 0.85), (200, 1, "from_scratch", 0.8)]]
    points = figures.curve_points(results)
    arms = {(row[1], row[2]): row for row in tables.summarize(results)[0].values.tolist()}
    for mode, curve in points["even-odd"].items():
        assert [n for n, _ in curve] == [50, 200]
        for n, ci in curve:
            assert arms[(str(n), mode)][4] == f"{ci.mean:.4f} ± {ci.sd:.4f}"
            assert arms[(str(n), mode)][5] == f"[{ci.low:.4f}, {ci.high:.4f}]"
    figure = figures.draw_figure(results)
    ax, below = figure.axes
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert list(lines["finetuned"].get_ydata()) == pytest.approx([85.0, 94.0])
    assert len(ax.collections) == 2  # one 95% band per arm
    # below, the answer: finetuned minus from_scratch, paired by seed, at each size
    compared = tables.comparisons(tables.arm_runs(results)).set_index(["n_train", "mode"]).acc
    (errorbar,) = below.containers
    assert list(errorbar.lines[0].get_ydata()) == pytest.approx(
        [100 * compared[n, "finetuned"].mean for n in (50, 200)])


def test_a_run_writes_the_figure_beside_the_csv_and_into_tensorboard(tiny_args, tmp_path):
    assert cli.main(tiny_args + ["--targets", "even-odd", "--results-csv", str(tmp_path / "r.csv")]) == 0
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    accumulator = EventAccumulator(str(tmp_path / "logs" / "figure" / "version_0"))
    accumulator.Reload()
    assert accumulator.Tags()["images"] == ["test_accuracy"]
