"""``fedlora report``: the table's numbers against the runs' metrics, the two
plots, and the refusals (one line, exit 2, no report written).

The run directories are written by ``fedlora.federation.results.RunWriter``, as
``fedlora simulate`` writes them, with known round records: a real
simulation takes minutes here and would only make the numbers unknown.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from fedlora.commands import cli
from fedlora.commands import report as rep
from fedlora.core.metric import Metric
from fedlora.federation.results import RunWriter
from fedlora.strategies import resolve

# per run: (config overrides, round records); None = not evaluated that round
RUNS = {
    "avg/seed-1": ({}, [
        {"accuracy": 0.30, "uplink_bytes": 1_000_000, "downlink_bytes": 2_000_000,
         "seconds": 2.0, "clients": 2},
        {"accuracy": None, "uplink_bytes": 1_000_000, "downlink_bytes": 2_000_000,
         "seconds": 1.0, "clients": 2},
        {"accuracy": 0.70, "uplink_bytes": 1_000_000, "downlink_bytes": 2_000_000,
         "seconds": 4.0, "clients": 2},
        {"accuracy": 0.60, "uplink_bytes": 500_000, "downlink_bytes": 2_000_000,
         "seconds": 1.0, "clients": 1}]),
    "dp/seed-1": ({"dp": "local", "dp-target-epsilon": 8.0}, [
        {"accuracy": 0.25, "uplink_bytes": 123_456, "downlink_bytes": 654_321,
         "seconds": 0.5, "epsilon": 1.5, "clients": 2},
        {"accuracy": 0.40, "uplink_bytes": 123_456, "downlink_bytes": 654_321,
         "seconds": 0.7, "epsilon": 2.25, "clients": 2}]),
}
# what report.md must say for them (s/round: mean of the round seconds)
EXPECTED = {
    "avg/seed-1": ["4", "0.6000", "0.7000 (round 3)", "3,500,000", "8,000,000", "", "2.00"],
    "dp/seed-1": ["2", "0.4000", "0.4000 (round 2)", "246,912", "1,308,642", "2.25", "0.60"],
}
PNG = b"\x89PNG\r\n\x1a\n"


def write_run(directory: Path, overrides: dict, records: list[dict], finish=True) -> Path:
    """A run directory as ``fedlora simulate`` leaves it (no adapter)."""
    config = resolve({**overrides, "rounds": len(records), "out-dir": str(directory)})
    writer = RunWriter(directory, config)
    for number, record in enumerate(records, start=1):
        writer.add_round({"round": number, **record})
    if finish:
        writer.finish({"strategy": config["strategy"]})
    return directory


@pytest.fixture
def runs(tmp_path) -> list[Path]:
    return [write_run(tmp_path / "runs" / name, *RUNS[name]) for name in RUNS]


def _report(capsys, *args) -> tuple[int, str, str]:
    code = cli.main(["report", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _table(text: str) -> dict[str, list[str]]:
    """report.md's table: run label → its other cells."""
    rows = [line.strip("|").split("|") for line in text.splitlines()
            if line.startswith("| ") and not line.startswith("| run ")]
    return {cells[0].strip(): [cell.strip() for cell in cells[1:]] for cells in rows}


def test_table_from_the_runs_metrics(tmp_path, capsys, runs):
    out = tmp_path / "report"
    code, stdout, err = _report(capsys, *runs, "--out", out)
    assert code == 0, err
    text = (out / "report.md").read_text()
    assert _table(text) == EXPECTED
    assert stdout.startswith(text)
    assert stdout.splitlines()[-1] == (f"wrote report.md, accuracy_vs_round.png, "
                                       f"accuracy_vs_uplink.png in {out}")
    for run in runs:  # each label's full directory is listed
        assert f"`{run}`" in text
    for name in rep.PLOTS:
        assert (out / name).read_bytes()[:8] == PNG
        with Image.open(out / name) as image:
            image.verify()
    assert sorted(p.name for p in out.iterdir()) == sorted(["report.md", *rep.PLOTS])


def test_the_table_agrees_with_summary_json(runs):
    """The summary fedlora simulate wrote and the report's numbers, read
    from metrics.jsonl, are the same."""
    for run in runs:
        summary, rows = rep.read_run(run)
        stats = rep.stats(rows)
        assert stats.final_accuracy == summary["final_accuracy"]
        assert stats.best_accuracy == summary["best_accuracy"]
        assert (stats.uplink_bytes, stats.downlink_bytes) == (summary["uplink_bytes"],
                                                              summary["downlink_bytes"])
        assert stats.epsilon == summary["epsilon"]
        assert stats.seconds_per_round == pytest.approx(summary["seconds"] / summary["rounds"])


def test_curve_points(runs):
    curve = rep.run_curve("avg", rep.read_run(runs[0])[1])
    assert curve.rounds == [1, 3, 4]  # round 2 was not evaluated
    assert curve.uplink_mb == pytest.approx([1.0, 3.0, 3.5])  # cumulative, round 2 included
    assert curve.accuracy == [0.3, 0.7, 0.6] and curve.band is None


@pytest.mark.parametrize("paths, names", [
    (["a/runs/x/seed-1"], ["seed-1"]),
    (["a/x/seed-1", "a/y/seed-1", "a/y/seed-2"], ["x/seed-1", "y/seed-1", "y/seed-2"]),
    (["p/x/s", "q/x/s"], ["p/x/s", "q/x/s"]),
])
def test_short_unique_labels(paths, names):
    assert rep.labels([Path(p) for p in paths]) == names


def _malformed(run: Path) -> str:
    with (run / "metrics.jsonl").open("a") as handle:
        handle.write('{"round": 3, "accur\n')
    return f"{run / 'metrics.jsonl'}: line 3 is not valid JSON"


def _bad_number(run: Path) -> str:
    path = run / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows[1]["uplink_bytes"] = "lots"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return f"{path}: line 2: 'uplink_bytes' is 'lots', not a number"


def _cut_short(run: Path) -> str:
    path = run / "metrics.jsonl"
    path.write_text(path.read_text().splitlines(keepends=True)[0])
    return f"{path}: holds 1 rounds, but summary.json says 2"


def _no_metrics(run: Path) -> str:
    (run / "metrics.jsonl").unlink()
    return f"{run / 'metrics.jsonl'}: missing"


def _bad_summary(run: Path) -> str:
    (run / "summary.json").write_text('{"rounds": ')
    return f"{run / 'summary.json'}: not valid JSON"


BREAKS = {"malformed line": _malformed, "not a number": _bad_number,
          "cut short": _cut_short, "no metrics": _no_metrics, "bad summary": _bad_summary}


@pytest.mark.parametrize("name", BREAKS)
def test_a_broken_run_is_refused_and_nothing_is_written(tmp_path, capsys, runs, name):
    problem = BREAKS[name](runs[1])  # the last one: the first was read already
    out = tmp_path / "report"
    code, stdout, err = _report(capsys, *runs, "--out", out)
    assert (code, stdout) == (2, "")
    assert err.startswith(f"fedlora: error: {problem}") and err.count("\n") == 1, err
    assert not out.exists()


def test_an_unfinished_run_is_refused(tmp_path, capsys, runs):
    """A run still going (or stopped): config.json and rounds, no summary.json."""
    unfinished = write_run(tmp_path / "runs" / "going", *RUNS["dp/seed-1"], finish=False)
    out = tmp_path / "report"
    code, stdout, err = _report(capsys, *runs, unfinished, "--out", out)
    assert (code, stdout) == (2, "")
    assert err == f"fedlora: error: {unfinished}: not a finished run (no summary.json)\n"
    assert not out.exists()


@pytest.mark.parametrize("problem", ["missing", "twice", "out is a file"])
def test_bad_arguments_are_refused(tmp_path, capsys, runs, problem):
    out = tmp_path / "report"
    args, line = {
        "missing": ([*runs, tmp_path / "nope"], f"{tmp_path / 'nope'}: no such run directory"),
        "twice": ([*runs, runs[0]], f"{runs[0]}: the run directory is given twice"),
        "out is a file": (runs, f"--out {out}: exists and is not a directory"),
    }[problem]
    if problem == "out is a file":
        out.write_text("x")
    code, stdout, err = _report(capsys, *args, "--out", out)
    assert (code, stdout, err) == (2, "", f"fedlora: error: {line}\n")
    assert problem == "out is a file" or not out.exists()


def test_an_old_report_stays_whole_after_a_refusal(tmp_path, capsys, runs):
    out = tmp_path / "report"
    assert _report(capsys, *runs, "--out", out)[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    _malformed(runs[0])
    assert _report(capsys, *runs, "--out", out)[0] == 2
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no temporary files


def test_without_matplotlib_the_table_is_written(tmp_path, capsys, runs, monkeypatch):
    out = tmp_path / "report"
    out.mkdir()
    (out / "accuracy_vs_round.png").write_bytes(PNG)  # an earlier report's
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails
    code, stdout, err = _report(capsys, *runs, "--out", out)
    assert code == 0
    assert err.count("\n") == 1 and "matplotlib is not installed" in err
    assert stdout.splitlines()[-1] == f"wrote report.md in {out}"
    assert [p.name for p in out.iterdir()] == ["report.md"]


@pytest.mark.e2e
def test_no_command_imports_matplotlib():
    """It is slow to import; only drawing needs it."""
    code = ("import sys, fedlora.commands.cli, fedlora.commands.report, fedlora.commands.compare; "
            "sys.exit('matplotlib' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_help_lists_report(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert ("report a table and accuracy plots for any set of finished runs"
            in " ".join(capsys.readouterr().out.split()))
    with pytest.raises(SystemExit):
        cli.main(["report", "--help"])
    usage = " ".join(capsys.readouterr().out.split())
    assert usage.startswith("usage: fedlora report [-h] [--out OUT] [--tracker KIND[,KIND]] "
                            "[--tracker-dir DIR] [--tracker-uri URI] [--tracker-project NAME] "
                            "RUN_DIR [RUN_DIR ...]")


# --- runs judged by another primary metric ------------------------------------------

SFT = ("eval_loss", "perplexity", "token_accuracy")


def write_sft_run(directory: Path, perplexities: list[float | None]) -> Path:
    """An instruction-tuning run without generation: judged by perplexity,
    where lower is better."""
    config = resolve({"rounds": len(perplexities), "out-dir": str(directory)})
    writer = RunWriter(directory, config)
    for number, value in enumerate(perplexities, start=1):
        writer.add_round({"round": number, "perplexity": value, "uplink_bytes": 10,
                          "downlink_bytes": 20, "seconds": 1.0, "clients": 2}, SFT)
    writer.finish({}, SFT, Metric("perplexity", higher_is_better=False))
    return directory


def test_the_primary_metric_and_its_direction_come_from_the_summary(tmp_path, capsys):
    run = write_sft_run(tmp_path / "sft", [9.0, 4.0, None, 5.0])
    summary, rows = rep.read_run(run)
    assert (summary["primary_metric"], summary["primary_direction"]) == ("perplexity", "lower")
    assert (summary["final_perplexity"], summary["best_perplexity"]) == (5.0, 4.0)
    assert list(rows[0])[:5] == ["round", *SFT, "train_loss"] and "accuracy" not in rows[0]
    out = tmp_path / "report"
    code, stdout, err = _report(capsys, run, "--out", out)
    assert code == 0, err
    assert "| final perplexity | best perplexity |" in stdout
    assert "best perplexity: the lowest, with its round" in stdout
    assert _table(stdout)["sft"][:3] == ["4", "5.0000", "4.0000 (round 2)"]


def test_runs_judged_by_different_metrics_are_refused(tmp_path, capsys, runs):
    sft = write_sft_run(tmp_path / "sft", [9.0, 4.0])
    code, stdout, err = _report(capsys, *runs, sft, "--out", tmp_path / "report")
    assert (code, stdout) == (2, "")
    names = rep.labels([*runs, sft])
    assert err == ("fedlora: error: runs judged by different primary metrics cannot be "
                   f"compared: accuracy: {names[0]}, {names[1]}; perplexity: {names[2]}\n")
