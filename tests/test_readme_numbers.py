"""Every number in the README from the repository: the percent table, --report LABEL=CSV comparing sweeps,
and the README's results tables against what the script makes of results/ (offline, seconds)."""

import shlex
from pathlib import Path

import transfer_mnist as tm
from sweeps import cli, runs, tables

REPO = Path(__file__).resolve().parent.parent


def run(mode, seed, acc, target="t", n_train=20):
    return runs.RunResult(target, mode, seed, n_train, 10, 0.3, acc, 1e-3, 0.4, True, 100)


def test_the_percent_table_gives_means_and_paired_differences_in_points():
    rows = [run("finetuned", 0, 0.95), run("finetuned", 1, 0.93), run("from_scratch", 0, 0.90),
            run("from_scratch", 1, 0.86)]
    table = tables.percent_table(rows)
    assert list(table.columns) == ["target", "n_train", "finetuned", "from_scratch", "finetuned − from_scratch"]
    # differences 5 and 7 points: mean 6, sd 1.414, t(0.975, 1) = 12.706 -> half-width 12.7
    assert table.values.tolist() == [["t", "20", "94.0", "88.0", "+6.0 [-6.7, +18.7]"]]


def test_report_compares_sweeps_side_by_side(tiny_args, tmp_path, capsys):
    args = tiny_args + ["--targets", "even-odd", "--seeds", "2", "--modes", "finetuned", "from_scratch", "frozen"]
    assert cli.main(args + ["--results-csv", str(tmp_path / "a.csv")]) == 0
    assert cli.main(args + ["--augment", "--results-csv", str(tmp_path / "b.csv")]) == 0
    out = tmp_path / "cmp" / "both.csv"
    assert cli.main(["--report", f"plain={tmp_path / 'a.csv'}", f"augmented={tmp_path / 'b.csv'}",
                    "--results-csv", str(out)]) == 0
    compared = out.with_suffix(".md").read_text()
    a = runs.read_results([str(tmp_path / "a.csv")])
    (row,) = tables.percent_table(a, differences=["finetuned"]).values.tolist()
    assert "| plain | " + " | ".join(row) + " |" in compared  # each sweep's own numbers, labelled
    means, _, side_by_side = compared.partition("The paired differences")  # the means with the primary's alone
    assert "frozen − from_scratch" not in means and "| even-odd | 20 | frozen − from_scratch |" in side_by_side
    difference = row[-1]
    assert f"| even-odd | 20 | finetuned − from_scratch | {difference} | " in compared
    for label in ("plain", "augmented"):  # and each sweep's own summary and figure beside it
        assert out.with_name(f"both.{label}.md").is_file() and out.with_name(f"both.{label}.png").is_file()
    # sweeps of a user's: results/PROTOCOL.md's rules, Holm over all their comparisons, nothing primary
    plain, augmented = (out.with_name(f"both.{label}.md").read_text() for label in ("plain", "augmented"))
    assert "(primary)" not in plain and "Holm's adjustment over all 2 comparisons" in plain
    assert "(primary)" not in augmented and "pre-registered" not in plain + augmented
    assert "(primary)" not in (tmp_path / "b.md").read_text()  # as the sweep itself wrote it
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    capsys.readouterr()
    assert cli.main(["--report", f"plain={tmp_path / 'a.csv'}", str(tmp_path / "b.csv")]) == 2
    assert "LABEL=CSV for each" in capsys.readouterr().err


def readme_command() -> list[str]:
    """The command that README.md gives to rebuild its tables and figures from results/."""
    lines = [line for line in (REPO / "README.md").read_text().splitlines()
             if line.startswith("python -m sweeps --report ") and "results/" in line]
    assert len(lines) == 1, lines
    return shlex.split(lines[0].split("  #")[0])[3:]


def test_every_results_table_in_the_readme_is_what_the_script_makes_of_results(tmp_path):
    argv = readme_command()
    assert all(Path(REPO, arg.partition("=")[2]).is_file() for arg in argv[1:argv.index("--results-csv")])
    out = tmp_path / "readme.csv"
    argv[argv.index("--results-csv") + 1] = str(out)
    argv = [a if "=" not in a else f"{a.partition('=')[0]}={REPO / a.partition('=')[2]}" for a in argv]
    assert cli.main(argv) == 0
    made = "\n".join(path.read_text() for path in tmp_path.glob("readme*.md"))
    targets = {*tm.TARGETS, "mnist"}
    quoted = [line for line in (REPO / "README.md").read_text().splitlines() if line.startswith("| ")
              and targets & {cell.strip() for cell in line.strip("|").split("|")[:3]}]
    missing = [line for line in quoted if line not in made]
    assert not missing, missing
    # the first table is the comparison's table of means, whole: a row per sweep, target and n_train
    means = (tmp_path / "readme.md").read_text().partition("| sweep |")[2].partition("\n\n")[0].splitlines()[2:]
    assert means and set(means) <= set(quoted), set(means) - set(quoted)
