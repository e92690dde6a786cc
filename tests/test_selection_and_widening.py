"""An answer that survives scrutiny, the run-making side: stratified subsets, a pooled choice that one collapsed
seed cannot move, a grid that widens itself (and resumes and reports so), pretraining ended on its own
patience, another sweep's backbones reused, digits 0-4 -> 5-9. Tiny data; the widening runs are made by a
stand-in for execute() whose validation loss is lowest at 1e-3, so the walk of the grid is known."""

import argparse
import json
import math
import signal

import torch

import transfer_mnist as tm
from sweeps import cli, data, engine, resume, runs, selection, settings, start, stats, summary, tables
from sweeps.runs import RunResult
from sweeps.stop import StopSignal

# the earlier fair protocol's pooled widening (results/PROTOCOL.md's per seed: test_each_seed_widens_its_own_grid)
WIDEN = ["--protocol", "fair", "--select", "pooled", "--modes", "finetuned", "from_scratch", "--targets", "even-odd",
         "--seeds", "2",
         "--lr-grid", "0.3", "1.0"]


def valley(calls: list):
    """A stand-in for runs.execute: pretraining gives a fresh backbone, a target run a row whose validation
    loss is |log10(rate / 1e-3)|, the same for every seed and arm."""
    def execute(cfg, run, backbone):
        calls.append(run)
        loss = abs(math.log10(run.learning_rate / 1e-3))
        result = RunResult(run.target, run.mode, run.seed, run.n_train, 1, loss, 0.5 + 0.01 * run.seed,
                           run.learning_rate, loss, True, 3, 0.0)
        return (result, tm.decapitated_lenet(1).state_dict()) if run.mode == "pretrain" else (result, None)
    return execute


def read_rows(path) -> list[RunResult]:
    return runs.read_results([str(path)])


def test_stratified_subsets_hold_every_class_in_proportion_and_the_post_s_draw_is_unchanged(tiny_data):
    labels = torch.arange(1000) % 10  # ten classes, 100 images each
    labels[labels == 9] = 0  # class 0 twice as large; class 9 empty
    available = torch.arange(1000)
    train, val = data.draw_subset("t", 100, available, 3, n_val=12, strata=labels)
    assert len(train) == 100 and len(val) == 12 and not set(train.tolist()) & set(val.tolist())
    assert torch.bincount(labels[train], minlength=10).tolist() == [20, 10, 10, 10, 10, 10, 10, 10, 10, 0]
    assert (torch.bincount(labels[val], minlength=10)[:9] >= 1).all()  # every class there is, in validation
    again = data.draw_subset("t", 100, available, 3, n_val=12, strata=labels)
    assert all(torch.equal(a, b) for a, b in zip((train, val), again))  # every arm of a seed: the same images
    # the post's draw where neither --stratify nor --n-val is given; --n-val alone keeps its order
    post = cli.parse(["--data-dir", str(tiny_data[0])])[0]
    some = torch.arange(0, 1000, 3)  # a subset of the images (--disjoint's): positions in it are mapped back
    drawn = data.subset_draw(post, "even-odd")("even-odd", 100, some, 3)
    assert all(torch.equal(a, some[b]) for a, b in zip(drawn, tm.draw_subset("even-odd", 100, len(some), 3)))
    order = torch.cat(tm.draw_subset("t", 100, 1000, 3))
    assert torch.equal(torch.cat(data.draw_subset("t", 100, available, 3, n_val=25)), order)


def test_the_median_choice_is_not_moved_by_one_collapsed_seed():
    rows = [RunResult("t", "finetuned", seed, 50, 10, 0.3, 0.9, rate, loss, False, 500)
            for seed in range(5) for rate, loss in ((1e-3, 0.30 if seed != 4 else 0.6931), (1e-4, 0.36))]
    picks = {select: {r.learning_rate for r in selection.select_rates(rows, select) if r.selected}
             for select in ("mean", "pooled")}
    assert picks == {"mean": {1e-4}, "pooled": {1e-3}}  # the mean follows seed 4's collapse, the median does not


def test_a_rate_whose_runs_were_still_improving_at_their_ceiling_is_no_candidate():
    def grid(late_seeds: dict[float, int]) -> list[RunResult]:  # rate -> how many of its 10 seeds ended late
        return [RunResult("t", "frozen", seed, 50, 2900 if seed < late else 100, 0.5, 0.8, rate, 0.1 * rate / 1e-3,
                          False, 3000) for rate, late in late_seeds.items() for seed in range(10)]
    picked = lambda rows: {r.learning_rate for r in selection.select_rates(rows, "pooled") if r.selected}  # noqa: E731
    # 3e-5's median loss is the lowest, but half its runs hit the ceiling still improving: it has not shown its loss
    assert picked(grid({3e-5: 5, 1e-4: 2, 3e-4: 0, 1e-3: 0})) == {3e-4}
    assert picked(grid({1e-4: 1, 3e-4: 0})) == {1e-4}  # one run in ten (10%) may be late
    assert picked(grid({1e-4: 10, 3e-4: 10})) == {1e-4}  # where no rate settled, every rate is a candidate
    # per seed (results/PROTOCOL.md), the lowest validation loss among the rates that seed ran, late or not
    rows = grid({1e-4: 2, 3e-4: 0})
    assert [r.selected for r in selection.select_rates(rows, "seed") if r.seed in (0, 5)] == [True, True, False, False]


def test_a_rate_that_settled_by_diverging_is_no_candidate():
    def rate(lr: float, loss: float, late: int) -> list[RunResult]:  # even/odd: guessing's loss is ln 2 = 0.693
        return [RunResult("even-odd", "finetuned", seed, 50, 20 if seed < late else 5, loss, 0.5, lr, loss, False, 20)
                for seed in range(3)]
    picked = lambda rows: {r.learning_rate for r in selection.select_rates(rows, "pooled") if r.selected}  # noqa: E731
    # 1.0 diverged early (settled, loss 18), 0.3 is still improving and near chance: neither qualifies, so
    # the lower loss wins instead of the only rate that settled
    assert picked(rate(1.0, 18.0, 0) + rate(0.3, 0.9, 1)) == {0.3}
    assert picked(rate(1.0, 0.4, 0) + rate(0.3, 0.2, 1)) == {1.0}  # a settled rate that learned still wins
    # a pick that learned nothing does not stop the walk below it, though it did not settle
    assert not selection.learned(rate(0.3, 0.9, 1), "pooled") and selection.learned(rate(0.3, 0.6, 1), "pooled")


def stalls_below(calls: list, low: float):
    """A stand-in for runs.execute whose validation loss falls with the rate, every run below `low` still
    improving at its last epoch (3 of 3), as a slow rate under a fixed ceiling is."""
    def execute(cfg, run, backbone):
        calls.append(run)
        result = RunResult(run.target, run.mode, run.seed, run.n_train, 3 if run.learning_rate < low else 1,
                           run.learning_rate, 0.5, run.learning_rate, run.learning_rate, True, 3, 0.0)
        return (result, tm.decapitated_lenet(1).state_dict()) if run.mode == "pretrain" else (result, None)
    return execute


def test_the_grid_widens_below_until_a_rate_no_longer_settles(tiny_args, tmp_path, monkeypatch, caplog):
    calls = []
    monkeypatch.setattr(engine, "execute", stalls_below(calls, 0.1))
    assert cli.main(tiny_args + WIDEN + ["--results-csv", str(tmp_path / "r.csv")]) == 0
    rows = [r for r in read_rows(tmp_path / "r.csv") if r.mode != "pretrain"]
    assert sorted({r.learning_rate for r in rows}) == [0.09, 0.3, 1.0]  # 0.09 ran, was late, and the walk ended
    assert {r.learning_rate for r in rows if r.selected} == {0.3}
    # no rate settles: the lowest loss is chosen, and the grid is not widened below it
    monkeypatch.setattr(engine, "execute", stalls_below(calls, 10.0))
    assert cli.main(tiny_args + WIDEN + ["--log-dir", str(tmp_path / "l2"), "--results-csv", str(tmp_path / "s.csv")]) == 0
    rows = [r for r in read_rows(tmp_path / "s.csv") if r.mode != "pretrain"]
    assert sorted({r.learning_rate for r in rows}) == [0.3, 1.0] and {r.learning_rate for r in rows if r.selected} == {0.3}
    assert "not widened below 0.3, where 2 of 2 runs were still improving" in caplog.text

    # 0.3 and 1 near chance, still improving: a pick that learned nothing does not stop the walk below it
    def diverges_above(cfg, run, backbone):
        high = run.learning_rate >= 0.3
        loss = 0.9 + run.learning_rate if high else 0.1 + 0.1 * abs(math.log10(run.learning_rate / 0.03))
        result = RunResult(run.target, run.mode, run.seed, run.n_train, 3 if high else 1, loss, 0.5,
                           run.learning_rate, loss, True, 3, 0.0)
        return (result, tm.decapitated_lenet(1).state_dict()) if run.mode == "pretrain" else (result, None)
    monkeypatch.setattr(engine, "execute", diverges_above)
    assert cli.main(tiny_args + WIDEN + ["--log-dir", str(tmp_path / "l3"), "--results-csv", str(tmp_path / "d.csv")]) == 0
    rows = [r for r in read_rows(tmp_path / "d.csv") if r.mode != "pretrain"]
    assert sorted({r.learning_rate for r in rows}) == [0.01, 0.03, 0.09, 0.3, 1.0]
    assert {r.learning_rate for r in rows if r.selected} == {0.03}


def test_next_rate_steps_past_an_edge_on_the_grid_s_spacing_up_to_the_bounds():
    assert settings.next_rate([0.3, 1.0], 0.3) == 0.09
    assert settings.next_rate([1e-4, 3e-4, 1e-3], 1e-3) == 0.003
    assert settings.next_rate([1e-4, 3e-4, 1e-3], 3e-4) is None  # inside
    assert settings.next_rate([0.3, 1.0], 1.0) is None and settings.next_rate([2e-6, 1e-5], 2e-6) == 1e-6  # bounds
    assert settings.next_rate([1e-3], 1e-3) is None  # one rate: no spacing to step by


def stopped_at_a_widened_rate(n: int, argv: list[str], monkeypatch) -> None:
    """Run the sweep of argv and stop it (Ctrl-C) as the n-th rate that --widen adds is recorded."""
    original, recorded = resume.record_widened, []

    def stop_at_the_nth(*args, **kwargs):
        recorded.append(args)
        original(*args, **kwargs)
        if len(recorded) == n:
            StopSignal.received = signal.SIGINT
            raise KeyboardInterrupt
    monkeypatch.setattr(cli, "record_widened", stop_at_the_nth)
    assert cli.main(argv) == 130
    monkeypatch.setattr(cli, "record_widened", original)


def test_a_grid_at_an_edge_widens_for_every_seed_resumes_and_reports_so(tiny_args, tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(engine, "execute", valley(calls))
    whole = tmp_path / "whole.csv"
    assert cli.main(tiny_args + WIDEN + ["--results-csv", str(whole)]) == 0
    rows = read_rows(whole)
    walked = [1.0, 0.3, 0.09, 0.03, 0.01, 0.003, 0.0009, 0.0003]  # 0.0009 beats both neighbours
    for mode in ("finetuned", "from_scratch"):
        for seed in (0, 1):
            assert [r.learning_rate for r in rows if (r.mode, r.seed) == (mode, seed)] == [0.3, 1.0, *walked[2:]]
    assert {r.learning_rate for r in rows if r.selected and r.mode != "pretrain"} == {0.0009}
    saved = json.loads(whole.with_suffix(".json").read_text())
    assert [entry[3] for entry in saved["widened"] if entry[1] == "finetuned"] == walked[2:]
    assert "learning rates run" in whole.with_suffix(".md").read_text()

    # stopped as the fourth widened rate is recorded: --resume runs what was recorded and widens on
    part = tmp_path / "part.csv"
    stopped_at_a_widened_rate(4, tiny_args + WIDEN + ["--log-dir", str(tmp_path / "logs2"), "--results-csv",
                                                       str(part)], monkeypatch)
    assert cli.main(["--resume", str(part)]) == 0
    assert part.read_bytes() == whole.read_bytes()
    # --report knows the widened rates: the same selection from the rows and the saved settings
    capsys.readouterr()
    assert cli.main(["--report", str(whole), "--results-csv", str(tmp_path / "again.csv")]) == 0
    assert (tmp_path / "again.csv").read_bytes() == whole.read_bytes()
    assert "incomplete" not in capsys.readouterr().out


def test_each_seed_widens_its_own_grid_with_select_seed_resumes_and_reports_so(tiny_args, tmp_path, monkeypatch):
    """Per seed (results/PROTOCOL.md): each seed's pick is its own lowest validation loss, and a seed whose
    pick sits at an edge of the rates it ran gets the next rate for itself alone, until its pick is inside."""
    calls = []

    def valleys(cfg, run, backbone):  # seed 0's best rate is 1e-3, seed 1's 1e-1
        calls.append(run)
        loss = abs(math.log10(run.learning_rate / (1e-3 if run.seed == 0 else 1e-1)))
        result = RunResult(run.target, run.mode, run.seed, run.n_train, 1, loss, 0.5, run.learning_rate, loss, True,
                           3, 0.0)
        return (result, tm.decapitated_lenet(1).state_dict()) if run.mode == "pretrain" else (result, None)

    monkeypatch.setattr(engine, "execute", valleys)
    args = tiny_args + ["--targets", "even-odd", "--modes", "finetuned", "--seeds", "2", "--lr-grid", "0.3", "1",
                        "--select", "seed", "--widen"]
    whole = tmp_path / "whole.csv"
    assert cli.main(args + ["--results-csv", str(whole)]) == 0
    rows = read_rows(whole)
    ran = {seed: [r.learning_rate for r in rows if r.seed == seed and r.mode == "finetuned"] for seed in (0, 1)}
    assert ran[1] == [0.3, 1.0, 0.09, 0.03]  # 0.09 beats 0.3 and 0.03: inside
    assert ran[0] == [0.3, 1.0, 0.09, 0.03, 0.01, 0.003, 0.0009, 0.0003]
    assert {r.seed: r.learning_rate for r in rows if r.selected and r.mode == "finetuned"} == {0: 0.0009, 1: 0.09}
    saved = json.loads(whole.with_suffix(".json").read_text())
    assert [entry[4] for entry in saved["widened"]].count(1) == 2  # seed 1's two rates, recorded for it alone
    part = tmp_path / "part.csv"
    stopped_at_a_widened_rate(3, args + ["--log-dir", str(tmp_path / "logs2"), "--results-csv", str(part)],
                              monkeypatch)
    assert cli.main(["--resume", str(part)]) == 0
    assert part.read_bytes() == whole.read_bytes()
    assert cli.main(["--report", str(whole), "--results-csv", str(tmp_path / "again.csv")]) == 0
    assert (tmp_path / "again.csv").read_bytes() == whole.read_bytes()


def test_pretraining_ends_on_its_own_patience_and_a_sweep_borrows_another_s_backbones(tiny_args, tmp_path,
                                                                                      monkeypatch, capsys):
    patience = []
    pretrain = tm.pretrain
    monkeypatch.setattr(tm, "pretrain", lambda args, *rest: patience.append((args.patience, args.min_delta))
                        or pretrain(args, *rest))
    grid = ["--modes", "finetuned", "--lr-grid", "1e-3", "--seeds", "2", "--backbone-per-seed", "--targets", "even-odd"]
    first = tmp_path / "first.csv"
    assert cli.main(tiny_args + grid + ["--pretrain-patience", "1", "--min-delta", "0.5", "--results-csv",
                                        str(first)]) == 0
    assert patience == [(1, 0.0), (1, 0.0)]  # --min-delta is the target runs' alone
    patience = [p for p, _ in patience]
    assert cli.main(tiny_args + grid + ["--pretrain-patience", "1", "--min-delta", "0.5", "--backbones-from",
                                        str(first), "--log-dir", str(tmp_path / "logs2"), "--results-csv",
                                        str(tmp_path / "second.csv")]) == 0
    assert patience == [1, 1]  # nothing pretrained again
    theirs, ours = (json.loads((tmp_path / name).read_text()) for name in ("first.json", "second.json"))
    assert [c["sha256"] for c in ours["checkpoints"].values()] == [c["sha256"] for c in theirs["checkpoints"].values()]
    assert read_rows(tmp_path / "second.csv") == read_rows(first)  # the same backbones, the same rows
    # a sweep that would pretrain otherwise may not borrow them
    capsys.readouterr()
    assert cli.main(tiny_args + grid + ["--pretrain-patience", "2", "--backbones-from", str(first), "--log-dir",
                                        str(tmp_path / "logs3"), "--results-csv", str(tmp_path / "third.csv")]) == 2
    assert f"error: --backbones-from {first}: its backbones were pretrained otherwise (pretraining patience 1, " \
           f"here 2)" in capsys.readouterr().err
    assert not (tmp_path / "third.csv").exists()


def test_min_delta_ends_a_run_whose_validation_loss_only_creeps_down(tmp_path):
    torch.manual_seed(0)
    batch = tm.TensorLoader(torch.randn(32, 1, 28, 28), torch.randint(0, 2, (32,)), 32)
    loaders = tm.TargetData("t", batch, batch, batch)

    def epochs(min_delta: float) -> tuple[int, int]:
        """Epochs run and the best epoch, validated on the training images: a loss that falls every epoch."""
        args = argparse.Namespace(log_dir=str(tmp_path), version=f"d{min_delta}", patience=3, min_delta=min_delta,
                                  dry_run=False, accelerator="cpu", devices=1)
        torch.manual_seed(0)
        module = tm.LitModule(("a", "b"), 1e-3)
        trainer, _ = tm.fit(module, loaders, "pretrain", 0, 20, args, test=False)
        return trainer.current_epoch, module.best_epoch

    assert epochs(0.0) == (20, 20)  # every fall counts: it runs to the ceiling
    assert epochs(10.0) == (4, 4)  # no fall of 10 nats: it stops 3 epochs after the first, with the lowest loss


def test_digits_0_4_to_5_9_is_a_transfer_to_new_classes(tiny_data):
    root, _ = tiny_data
    source_labels, source_positions = tm.read_split("digits-0-4", str(root), True)[1], \
        data.file_positions("digits-0-4", str(root))
    labels, positions = tm.read_split("digits-5-9", str(root), True)[1], data.file_positions("digits-5-9", str(root))
    digits = tm.read_split("mnist", str(root), True)[1]
    assert torch.equal(labels, digits[positions] - 5) and set(labels.tolist()) <= set(range(5))
    assert set(digits[source_positions].tolist()) <= set(range(5)) and torch.equal(source_labels,
                                                                                   digits[source_positions])
    assert tm.TARGETS["digits-5-9"].label_names == ("5", "6", "7", "8", "9")


def test_too_few_validation_images_of_a_class_are_named_at_the_start(tiny_args):
    cfg = cli.parse(tiny_args + ["--targets", "fashion-mnist", "--n-train", "20", "--stratify"])[0]
    lines, warnings = start.describe_subsets(cfg)
    assert len(warnings) == 1 and warnings[0].startswith("Warning: fashion-mnist at n_train 20: ") \
        and "fewer than 2 validation images in some seed" in warnings[0] and warnings[0].endswith("--n-val")
    cfg = cli.parse(tiny_args + ["--targets", "even-odd", "--n-train", "20", "--n-val", "10", "--stratify"])[0]
    lines, warnings = start.describe_subsets(cfg)
    assert warnings == [] and "20 training + 10 validation images a run" in lines[0]


# ---- the report a reviewer asks for ------------------------------------------------------
def row(mode, seed, acc, rate=1e-3, val_loss=0.3, best_epoch=50, selected=True, target="even-odd", n_train=50):
    return RunResult(target, mode, seed, n_train, best_epoch, 0.4, acc, rate, val_loss, selected, 1000)


def test_the_summary_gives_p_values_holm_the_primary_comparison_and_a_sensitivity_bound(tmp_path):
    results = []
    for seed in range(5):
        results += [row("finetuned", seed, 0.90 + 0.01 * seed), row("frozen", seed, 0.85 + 0.004 * seed),
                    row("from_scratch", seed, 0.80, rate=1e-3), row("from_scratch", seed, 0.86 + 0.001 * seed, rate=1e-2,
                                                                   val_loss=0.5, selected=False)]
    text = summary.write_summary(results, str(tmp_path / "s.md"), "pooled")
    markdown = (tmp_path / "s.md").read_text()
    arms, differences = (table.values.tolist() for table in tables.summarize(results))
    finetuned, frozen = differences
    p_finetuned = stats.MeanCI.of([0.10 + 0.01 * s for s in range(5)]).p
    p_frozen = stats.MeanCI.of([0.05 + 0.004 * s for s in range(5)]).p
    # an earlier sweep, not one of results/PROTOCOL.md's: Holm over every comparison, none primary
    assert finetuned[2] == "finetuned - from_scratch" and frozen[2] == "frozen - from_scratch"
    holm = sorted([p_frozen * 2, max(p_frozen * 2, p_finetuned)]) if p_frozen < p_finetuned else None
    assert holm is not None  # frozen's steadier lead has the smaller p: it is multiplied by 2, finetuned's by 1
    assert finetuned[6:8] == [tables.p_text(p_finetuned), tables.p_text(holm[1])]
    assert frozen[6:8] == [tables.p_text(p_frozen), tables.p_text(holm[0])]
    assert "(primary)" not in markdown and "over the 2 comparisons of this table" in markdown and "Holm p" in text
    # against from_scratch at 1e-2 (not chosen): finetuned leads by 0.04 + 0.009 * seed, 5.8 points on average
    table = tables.sensitivity_table(results)
    header, (sensitive, _) = list(table.columns), table.values.tolist()
    assert header[3:] == ["from_scratch at 0.001", "from_scratch at 0.01",
                          "bound: from_scratch at its best rate on the test set"]
    assert sensitive[3].startswith("+12.0 [") and sensitive[4].startswith("+5.8 [")
    assert sensitive[5].startswith("+5.8 [") and sensitive[5].endswith("(at 0.01)")  # the test set picks 0.01
    assert "## Sensitivity to the baseline's rate" in markdown and "a bound" in markdown


def test_warnings_name_a_collapsed_run_and_lp_ft_rows_tested_on_their_head_stage():
    results = [row("from_scratch", 4, 0.493, val_loss=0.6927), row("finetuned", 4, 0.9),
               row("lp_ft", 0, 0.9, best_epoch=150), row("lp_ft", 1, 0.9, best_epoch=600)]
    warnings = summary.fragile(results)
    assert any(w.startswith("even-odd/from_scratch n_train 50 seed 4 (lr 0.001), a selected run, is no better than "
                            "chance on validation (loss 0.6927; guessing gives 0.6931)") for w in warnings)
    assert "lp_ft: 1 of 2 selected runs were tested on their head stage (best epoch within it" in " ".join(warnings)
    arms = tables.summarize(results)[0].values.tolist()
    assert [r[2] for r in arms if r[2].startswith("lp_ft")] == ["lp_ft (1 of 2 tested on the head stage)"]


def test_a_comparison_gives_the_change_of_each_lead_paired_by_seed():
    before = [row(mode, seed, acc + (0.05 if mode == "finetuned" else 0)) for seed, acc in enumerate((0.8, 0.82, 0.84))
              for mode in ("finetuned", "from_scratch")]
    after = [row(mode, seed, acc + (0.03 + 0.01 * seed if mode == "finetuned" else 0))
             for seed, acc in enumerate((0.7, 0.72, 0.74)) for mode in ("finetuned", "from_scratch")]
    (change,) = tables.change_table({"overlapping": before, "fair": after, "one seed": after[:2]}).values.tolist()
    assert change[:5] == ["even-odd", "50", "finetuned − from_scratch", "fair − overlapping", "3"]
    assert change[5].startswith("-1.0 [")  # leads 5, 5, 5 then 3, 4, 5 points


def test_a_sweep_with_no_complete_group_yet_still_gets_its_figure():
    from sweeps import figures

    unselected = [row("finetuned", 0, 0.9, selected=False)]  # its grid half done: nothing selected
    figure = figures.draw_figure(unselected)
    assert "no complete (target, arm, n_train) yet" in figure.texts[0].get_text() and not figure.axes
