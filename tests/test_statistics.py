"""The statistics results/PROTOCOL.md names before its sweeps: Wilcoxon's signed-rank test, Holm over the
primaries alone, two one-sided tests of equivalence, the smallest detectable difference, and the count of
collapsed and still-improving runs at every rate. On known numbers; no training."""

import json
import math

import pytest
import torch
from scipy import stats as scipy_stats

from sweeps import runs, stats, summary, tables


def row(target, mode, seed, acc, n_train=200, rate=1e-3, val_loss=0.3, selected=True, best_epoch=10,
        max_epochs=100):
    return runs.RunResult(target, mode, seed, n_train, best_epoch, 0.3, acc, rate, val_loss, selected, max_epochs)


def test_wilcoxon_and_equivalence_on_known_numbers():
    diffs = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, -0.5]
    assert stats.wilcoxon_p(diffs) == pytest.approx(scipy_stats.wilcoxon(diffs).pvalue)
    assert stats.wilcoxon_p(diffs) == pytest.approx(2 * 2 / 1024)  # exact: ranks summing to 1 or less, of 2^10
    assert math.isnan(stats.wilcoxon_p([0.0, 0.0, 0.0])) and math.isnan(stats.wilcoxon_p([1.0]))
    # equivalence within ±2: a mean of 0.1 with sd 1 over 10 pairs is inside; a mean of 1.5 is not shown
    near = [0.1 + d for d in (-1, 1) * 5]
    mean, se = sum(near) / 10, math.sqrt(sum((d - 0.1) ** 2 for d in near) / 9 / 10)
    expected = max(scipy_stats.t.sf((mean + 2) / se, 9), scipy_stats.t.sf((2 - mean) / se, 9))
    assert stats.tost_p(near, 2.0) == pytest.approx(expected) and stats.tost_p(near, 2.0) < 0.05
    assert stats.tost_p([1.5 + d for d in (-1, 1) * 5], 2.0) > 0.05
    # the smallest difference 10 pairs of sd 3 detect at 5% with 80% power: (t(0.975, 9) + t(0.8, 9)) sd / sqrt 10
    quantiles = scipy_stats.t.ppf(0.975, 9) + scipy_stats.t.ppf(0.8, 9)
    assert stats.detectable(3.0, 10) == pytest.approx(quantiles * 3 / math.sqrt(10)) == pytest.approx(2.984, abs=1e-3)


def test_holm_runs_over_the_primaries_alone_and_each_primary_gets_a_reading():
    results = []
    gains = {"even-odd": [5, 4, 6, 5, 3, 7, 4, 5, 6, 4], "digits-5-9": [0.1, -0.2, 0.3, 0.0, 0.2, -0.1, 0.1, 0.2,
                                                                       -0.3, 0.1],
             "fashion-mnist": [3, -4, 5, -2, 6, -1, 4, -3, 2, 1]}
    for target, points in gains.items():
        for seed, gain in enumerate(points, start=200):
            for n_train in (50, 200):
                results += [row(target, "from_scratch", seed, 0.80, n_train),
                            row(target, "finetuned", seed, 0.80 + gain / 100, n_train),
                            row(target, "frozen", seed, 0.80 + gain / 100, n_train)]
    table, power = tables.preregistered(results)
    rows = table.values.tolist()
    primaries = {r[0]: r for r in rows if r[2] == "finetuned − from_scratch (primary)"}
    assert set(primaries) == set(gains) and all(r[1] == "200" for r in primaries.values())
    wilcoxon = {target: stats.wilcoxon_p(points) for target, points in gains.items()}
    adjusted = dict(zip(wilcoxon, stats.holm(list(wilcoxon.values()))))
    for target, r in primaries.items():
        assert r[8] == tables.p_text(wilcoxon[target]) and r[9] == tables.p_text(adjusted[target])
    assert primaries["even-odd"][11] == "a finding: +4.9 points"
    assert primaries["digits-5-9"][11] == "no difference beyond ±2 points"
    assert primaries["fashion-mnist"][11] == "not shown either way"
    assert primaries["even-odd"][7] == "10 / 0 / 0" and primaries["even-odd"][5] == "+5.0"  # median of the ten
    # the other comparisons are exploratory: no Holm p, no claim
    others = [r for r in rows if "(primary)" not in r[2]]
    assert others and all(r[9] == "" and r[11] == "exploratory" for r in others)
    assert power.startswith("With 10 seeds and the primaries' paired sd of ")


def test_equal_differences_tie_in_wilcoxon_s_ranks_whatever_the_floats_say():
    # 0.9612 - 0.95 and 0.9712 - 0.96 are both 1.12 points, but not as floats (1.12000000000001, 1.11999999999999)
    pairs = [(0.9612, 0.95), (0.9712, 0.96), (0.98, 0.97), (0.9701, 0.96), (0.95, 0.94), (0.9655, 0.955),
             (0.9733, 0.96), (0.9588, 0.95), (0.93, 0.94), (0.969, 0.96)]
    results = [r for seed, (tuned, scratch) in enumerate(pairs, start=200)
               for r in (row("even-odd", "finetuned", seed, tuned), row("even-odd", "from_scratch", seed, scratch))]
    (primary,) = tables.preregistered(results)[0].values.tolist()
    exact = [1.12, 1.12, 1.0, 1.01, 1.0, 1.05, 1.33, 0.88, -1.0, 0.9]
    assert len(set(exact)) < len(exact)  # ties, which change the ranks and the test
    assert primary[8] == tables.p_text(scipy_stats.wilcoxon(exact).pvalue)


def test_collapsed_and_still_improving_runs_are_counted_at_every_rate_not_only_the_selected():
    results = [row("even-odd", "from_scratch", seed, 0.5, rate=3e-2, val_loss=0.69, selected=False)
               for seed in range(9)]  # 9 of 10 at chance (ln 2 = 0.693): collapsed
    results += [row("even-odd", "from_scratch", 9, 0.9, rate=3e-2, val_loss=0.2, selected=True, best_epoch=99)]
    table = tables.collapses(results)
    header, rows = list(table.columns), table.values.tolist()
    (only,) = rows
    assert dict(zip(header, only)) == {"target": "even-odd", "n_train": "200", "mode": "from_scratch",
                                       "learning rate": "0.03", "runs": "10", "collapsed (near chance)": "9 of 10",
                                       "still improving at the budget": "1 of 10", "selected": "1"}


def test_a_seed_selected_sweep_s_summary_names_wilcoxon_holm_and_the_equivalence_test(tmp_path):
    results = [row("even-odd", mode, seed, acc) for seed in range(200, 203)
               for mode, acc in (("from_scratch", 0.8), ("finetuned", 0.85 + 0.01 * seed % 3))]
    results += [row("even-odd", "from_scratch", 200, 0.5, rate=3e-2, val_loss=0.69, selected=False)]
    console = summary.write_summary(results, str(tmp_path / "r.md"), select="seed", protocol=True)
    text = (tmp_path / "r.md").read_text()
    assert "## The pre-registered comparisons (results/PROTOCOL.md)" in text
    assert all(word in text for word in ("Wilcoxon", "Holm", "equivalence", "primary", "Collapsed"))
    # each comparison once: no paired-t table in fractions beside the pre-registered one; the console shows
    # that test and the collapses
    assert "p (paired t)" not in text + console and "the ones to state as findings" not in text
    assert "Wilcoxon p" in console and "finetuned − from_scratch (primary)" in console
    assert "  from_scratch on even-odd at 200 labels, rate 0.03: 1 of 1 collapsed" in console.splitlines()
    assert "0 of" not in console.partition("Collapsed runs")[2].partition("\n\n")[0]  # only arms and rates that did
    pooled = summary.write_summary(results, str(tmp_path / "pooled.md"), select="pooled")
    text = (tmp_path / "pooled.md").read_text()  # earlier sweeps' reports as they were
    assert "pre-registered" not in text and "the ones to state as findings" in text and "Wilcoxon" not in pooled


def test_the_primaries_sit_at_200_labels_and_a_sweep_of_500_labels_alone_has_none(tmp_path):
    def sweep(*sizes):
        return [row("even-odd", mode, seed, acc + 0.01 * (seed % 3), n_train)
                for n_train in sizes for seed in range(200, 205)
                for mode, acc in (("from_scratch", 0.8), ("finetuned", 0.86))]

    def marked(results, select="seed", protocol=True):
        summary.write_summary(results, str(tmp_path / "s.md"), select=select, protocol=protocol)
        text = (tmp_path / "s.md").read_text()
        return ([r[1] for r in tables.preregistered(results, protocol=protocol)[0].values.tolist() if "(primary)" in r[2]],
                [r[1] for r in tables.summarize(results, protocol=protocol)[1].values.tolist() if "(primary)" in r[2]], text)

    # results/PROTOCOL.md: 200 labels, also beside 500; both tables mark the same row
    assert marked(sweep(50, 200, 500))[:2] == (["200"], ["200"])
    # its 500-label sweeps are exploratory: no primary, no Holm p, no claim word
    pre, paired, text = marked(sweep(500))
    assert pre == paired == [] and "A sweep of more than 200 labels only has no primaries" in text
    assert "a finding" not in text and "(primary)" not in text
    assert marked(sweep(20))[:2] == (["20"], ["20"])  # a small run of the same question: its largest size
    # only results/PROTOCOL.md's own sweeps have primaries: not earlier sweeps, nor a user's
    for select in ("pooled", "seed"):
        pre, paired, text = marked(sweep(200, 500), select=select, protocol=False)
        assert pre == paired == [] and "(primary)" not in text and "pre-registered" not in text


def test_each_backbone_is_pretrained_at_every_rate_of_its_grid_and_the_lowest_validation_loss_is_kept(
        tiny_args, tmp_path, monkeypatch):
    import csv as csv_module

    import transfer_mnist as tm
    from sweeps import cli

    used = []
    train = tm.train

    def recording(backbone, mode, data, args):
        used.append((args.seed, {k: v.clone() for k, v in backbone.items()}))
        return train(backbone, mode, data, args)

    monkeypatch.setattr(tm, "train", recording)
    args = tiny_args + ["--targets", "even-odd", "--modes", "finetuned", "--seeds", "2", "--backbone-per-seed",
                        "--pretrain-lr-grid", "1e-5", "1e-2", "--shuffle", "--results-csv", str(tmp_path / "r.csv")]
    assert cli.main(args) == 0
    with open(tmp_path / "r.csv", newline="") as f:
        rows = list(csv_module.DictReader(f))
    pretraining = [r for r in rows if r["mode"] == "pretrain"]  # a row per backbone: the pick's
    settings = json.loads((tmp_path / "r.json").read_text())
    assert [r["seed"] for r in pretraining] == ["0", "1"] and all(r["selected"] == "true" for r in pretraining)
    for r in pretraining:
        recorded = settings["checkpoints"][r["seed"]]
        grid = recorded["pretraining val_loss by rate"]  # every rate's, saved with the backbone
        assert set(grid) == {"1e-05", "0.01"} and r["learning_rate"] == min(grid, key=grid.get)
        assert float(r["val_loss"]) == pytest.approx(grid[r["learning_rate"]], rel=1e-5)
        checkpoint = tmp_path / "logs" / "pretrain" / "version_0" / f"seed{r['seed']}_lr{float(r['learning_rate']):g}"
        assert recorded["path"].endswith(f"seed{r['seed']}_lr{float(r['learning_rate']):g}/checkpoints/best.ckpt")
        kept = tm.read_backbone(str(checkpoint / "checkpoints" / "best.ckpt"))
        assert all(torch.equal(backbone[k], kept[k]) for s, backbone in used if s == int(r["seed"]) for k in kept)
