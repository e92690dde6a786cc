"""What a user sees first: the default run's figure, intervals that stay in range, the edge count,
threads, and label mistakes caught before training. Tiny data only (see conftest.py)."""

import csv
import logging
import math

import torch
import torchvision

import transfer_mnist as tm
from sweeps import cli, figures, runs, selection, summary, tables


def read_csv(path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def run(target="even-odd", mode="finetuned", seed=0, n_train=200, test_acc=0.9, test_loss=0.3, learning_rate=1e-4,
        val_loss=0.3, best_epoch=10) -> runs.RunResult:
    return runs.RunResult(target, mode, seed, n_train, best_epoch, test_loss, test_acc, learning_rate, val_loss, True, 500)


def default_run_results() -> list[runs.RunResult]:
    """The rows of `python -m sweeps`: one seed, one size, the post's two arms on two targets."""
    return [run("mnist", "pretrain", n_train=10000, test_acc=0.9755),
            run("even-odd", "finetuned", test_acc=0.9459), run("even-odd", "from_scratch", test_acc=0.8594),
            run("fashion-mnist", "finetuned", test_acc=0.6820), run("fashion-mnist", "from_scratch", test_acc=0.6917)]


def test_one_seed_draws_points_without_any_interval():
    for results in (default_run_results(),  # one size: arms side by side
                    [run(n_train=n, mode=m, test_acc=a) for n, m, a in
                     [(50, "finetuned", 0.8), (200, "finetuned", 0.9), (50, "from_scratch", 0.7), (200, "from_scratch", 0.8)]]):
        figure = figures.draw_figure(results)
        assert figure.get_suptitle() == "1 seed, no interval"
        for ax in figure.axes:
            assert len(ax.collections) == 0 and len(ax.containers) == 0  # no band, no error bar
            assert all(not math.isnan(y) for line in ax.get_lines() for y in line.get_ydata())
        points = {line.get_label(): list(line.get_ydata()) for line in figure.axes[0].get_lines()}
        assert points.keys() == {"finetuned", "from_scratch"}


def test_intervals_stay_within_what_the_metric_can_reach_in_tables_and_figure():
    # two seeds, accuracies near 100% and losses near 0: the raw t-interval leaves [0, 1] and [0, inf)
    results = [run(seed=0, test_acc=0.83, test_loss=0.9), run(seed=1, test_acc=0.999, test_loss=0.01),
               run(seed=0, mode="from_scratch", test_acc=0.99, test_loss=0.05),
               run(seed=1, mode="from_scratch", test_acc=0.5, test_loss=1.2)]
    arms, differences = (table.values.tolist() for table in tables.summarize(results))
    finetuned = arms[0]
    assert finetuned[5] == "[0.0000, 1.0000]" and finetuned[7].startswith("[0.0000, ")
    assert differences[0][5].startswith("[-1.0000, ") and differences[0][5].endswith(", 1.0000]")
    ax, below = figures.draw_figure(results).axes
    (errorbars, _) = ax.containers
    segments = [segment for collection in ax.collections for segment in collection.get_segments()]
    assert min(y for segment in segments for _, y in segment) >= 0 and max(y for s in segments for _, y in s) <= 100
    ((_, ci),) = figures.curve_points(results)["even-odd"]["finetuned"]
    assert (100 * ci.low, 100 * ci.high) == (0.0, 100.0)  # the same numbers as the table
    assert len(errorbars) == 3


def test_the_markdown_warns_that_two_or_three_seeds_give_wide_intervals(tmp_path):
    results = [run(seed=s, mode=m, test_acc=0.8 + 0.01 * s) for s in (0, 1) for m in ("finetuned", "from_scratch")]
    text = summary.write_summary(results, str(tmp_path / "two.md"))
    assert "Intervals from 2 seeds are wide" in (tmp_path / "two.md").read_text() and "are wide" in text
    five = [run(seed=s, mode=m, test_acc=0.8 + 0.01 * s) for s in range(5) for m in ("finetuned", "from_scratch")]
    summary.write_summary(five, str(tmp_path / "five.md"))
    assert "are wide" not in (tmp_path / "five.md").read_text()


def test_the_edge_count_needs_a_grid_of_three_rates():
    two = selection.select_rates([run(seed=s, learning_rate=lr, val_loss=v) for s in (0, 1)
                           for lr, v in ((1e-4, 0.2), (1e-3, 0.3))])
    (row,) = summary.budget_table(two).values.tolist()
    assert row[5] == "n/a: a grid of 2 rates is all edges"
    three = selection.select_rates([run(seed=s, learning_rate=lr, val_loss=v) for s, best in ((0, 1e-3), (1, 1e-2))
                             for lr, v in ((1e-4, 0.3), (1e-3, 0.2 if best == 1e-3 else 0.4), (1e-2, 0.1 if best == 1e-2 else 0.5))])
    (row,) = summary.budget_table(three).values.tolist()
    assert row[5] == "1 of 2"  # seed 0 chose the middle rate, seed 1 the top
    (row,) = summary.budget_table([run()]).values.tolist()
    assert row[5] == "no grid"


def test_threads_apply_to_pretraining_too(tiny_args, tmp_path, monkeypatch):
    seen, pretrain, train = {}, tm.pretrain, tm.train

    def recording_pretrain(cfg, seed, *args):
        seen["pretrain"] = torch.get_num_threads()
        return pretrain(cfg, seed, *args)

    def recording_train(*args, **kwargs):
        seen["train"] = torch.get_num_threads()
        return train(*args, **kwargs)

    monkeypatch.setattr(tm, "pretrain", recording_pretrain)
    monkeypatch.setattr(tm, "train", recording_train)
    before = torch.get_num_threads()
    assert cli.main(tiny_args + ["--targets", "even-odd", "--modes", "finetuned", "--threads", "1"]) == 0
    assert seen == {"pretrain": 1, "train": 1} and torch.get_num_threads() == before


def parity_as_bool(labels):
    return labels % 2 == 1


def parity_as_float(labels):
    return (labels % 2).float()


def odd_as_float_mask(labels):
    return (labels % 2).float()


def test_labels_that_are_not_class_indices_stop_before_training_naming_the_target(tiny_args, tmp_path, monkeypatch,
                                                                                   capsys):
    for target, what in ((tm.Target(torchvision.datasets.MNIST, ("even", "odd"), relabel=parity_as_bool), "bool"),
                         (tm.Target(torchvision.datasets.MNIST, ("even", "odd"), relabel=parity_as_float), "float32"),
                         (tm.Target(torchvision.datasets.MNIST, tuple("0123456789"), keep=odd_as_float_mask), "keep")):
        monkeypatch.setitem(tm.TARGETS, "parity", target)
        log_dir = tmp_path / "logs"
        assert cli.main(tiny_args + ["--targets", "parity", "--log-dir", str(log_dir)]) == 2
        captured = capsys.readouterr()
        err = captured.err.strip()
        assert "Traceback" not in captured.out + captured.err and len(err.splitlines()) == 1, err
        assert err.startswith("error: target parity: ") and what in err, err
        assert not log_dir.exists()


def test_the_console_names_each_target_s_dataset_and_classes(tiny_args, caplog):
    with caplog.at_level(logging.INFO, logger="transfer_mnist"):
        assert cli.main(tiny_args + ["--targets", "even-odd", "fashion-mnist", "--modes", "finetuned"]) == 0
    assert "even-odd: MNIST, 2 classes (even, odd)" in caplog.messages
    assert "mnist: MNIST, 10 classes (0 - zero, 1 - one, 2 - two, 3 - three, 4 - four, 5 - five, 6 - six, " \
           "7 - seven, 8 - eight, 9 - nine)" in caplog.messages
    assert any(m.startswith("fashion-mnist: FashionMNIST, 10 classes (T-shirt/top, Trouser,") for m in caplog.messages)


def test_a_start_that_fails_after_the_outputs_exist_leaves_nothing_behind(tiny_args, tmp_path, monkeypatch, capsys):
    def cannot_start(*args):
        raise tm.ExperimentError("the workers cannot receive the targets")

    monkeypatch.setattr(tm, "pretrain", cannot_start)
    assert cli.main(tiny_args + ["--log-dir", str(tmp_path / "logs"), "--results-csv", str(tmp_path / "out" / "r.csv")]) == 2
    assert capsys.readouterr().err.strip() == "error: the workers cannot receive the targets"
    assert not (tmp_path / "logs").exists() and not (tmp_path / "out").exists()
