"""``fedlora compare``: the statistics, the up-front checks, the summaries
written from finished run directories, which unfinished runs are resumed, and
one real comparison, interrupted and continued.

Only the last test starts simulations; the others replace the child runner
(``fedlora.commands.compare.run_child``) with one that fails the test if called, or
with a fake that writes a finished run directory.
"""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from processes import describe, ours, stop

from fedlora.commands import cli
from fedlora.commands import compare as cmp
from fedlora.commands.report import read_run
from fedlora.core.config import ConfigError, parse_set_option
from fedlora.strategies import resolve

LEAD_COLUMNS = ["group", "run", "seeds", "final_accuracy_mean", "final_accuracy_ci95",
                "best_accuracy_mean", "uplink_mb", "downlink_mb", "seconds_per_round_mean"]
T_975_2 = 4.302652729749464  # Student t quantile, 0.975, 2 degrees of freedom
BASE = "[base]\nnum-clients = 4\nclients-per-round = 2\nrounds = 2\n"
TWO_RUNS = BASE + """
[[run]]
label = "avg"
group = "plain"
strategy = "fedavg"

[[run]]
label = "ffa"
group = "frozen A"
strategy = "ffa"
lr = 0.01
"""


# --- statistics -----------------------------------------------------------------

def test_mean_ci95_known_values():
    mean, ci = cmp.mean_ci95([0.5, 0.6, 0.7])
    assert mean == pytest.approx(0.6)
    assert ci == pytest.approx(T_975_2 * 0.1 / math.sqrt(3))
    assert ci == pytest.approx(0.24841, abs=1e-5)
    mean, ci = cmp.mean_ci95([1.0, 3.0])  # s = √2, n = 2: t(0.975, 1) · √2 / √2
    assert mean == 2.0 and ci == pytest.approx(12.7062047)
    assert cmp.mean_ci95([0.4, 0.4, 0.4]) == (pytest.approx(0.4), 0.0)


def test_mean_ci95_undefined():
    mean, ci = cmp.mean_ci95([0.7])
    assert mean == 0.7 and math.isnan(ci)
    assert all(math.isnan(x) for x in cmp.mean_ci95([]))


# --- up-front checks ----------------------------------------------------------------

@pytest.mark.parametrize("text, seeds", [("3", [1, 2, 3]), ("1", [1]), ("1,5,9", [1, 5, 9]),
                                         (" 4 , 2", [4, 2])])
def test_parse_seeds(text, seeds):
    assert cmp.parse_seeds(text) == seeds


@pytest.mark.parametrize("text", ["0", "-2", "1,0", "1,1", "2,3,2", "a", "1.5", "1,,2", "7,", ""])
def test_bad_seeds(text):
    with pytest.raises(ConfigError, match="--seeds"):
        cmp.parse_seeds(text)


@pytest.fixture
def no_child(monkeypatch):
    """Any attempt to start a simulation fails the test."""
    def forbidden(command, log, append=False):
        raise AssertionError(f"a simulation was started: {command}")

    monkeypatch.setattr(cmp.runs, "run_child", forbidden)


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "comparison.toml"
    path.write_text(text)
    return path


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    code = cli.main(["compare", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _run_table(label: str, extra: str = "", group: str = "g") -> str:
    return f'\n[[run]]\nlabel = "{label}"\ngroup = "{group}"\n{extra}\n'


BAD_PLANS = {
    "invalid TOML": ("[[run]\nlabel = 1\n", "not valid TOML"),
    "no runs": (BASE, "no [[run]] tables"),
    "stray table": (BASE + "[extra]\nx = 1\n" + _run_table("a"), "unknown table 'extra'"),
    "no label": (BASE + '[[run]]\ngroup = "g"\n', "[[run]] number 1: needs a label"),
    "no group": (BASE + '[[run]]\nlabel = "a"\n', "run 'a': needs a group"),
    "duplicate label": (BASE + _run_table("a") + _run_table("b") + _run_table("a"),
                        "run 'a': the label is used twice"),
    "label with slash": (BASE + _run_table("../up"), "run '../up': the label must be a plain"),
    "label with space": (BASE + _run_table("a b"), "run 'a b': the label must be a plain"),
    "hidden label": (BASE + _run_table(".a"), "run '.a': the label must be a plain"),
    "seed in a run": (BASE + _run_table("a", "seed = 3"), "run 'a': has a 'seed' key"),
    "out-dir in base": (BASE + 'out-dir = "x"\n' + _run_table("a"), "[base] has an 'out-dir'"),
    "typo in the last run": (BASE + _run_table("a") + _run_table("b") + _run_table("c", "lrr = 1"),
                             "run 'c': unknown config key 'lrr'"),
    "bad value in the last run": (BASE + _run_table("a") + _run_table("c", "clients-per-round = 9"),
                                  "run 'c': config key 'clients-per-round': 9 is more than"),
    "key for another strategy": (BASE + _run_table("a", "fair-steps = 3"),
                                 "run 'a': config key 'fair-steps' applies to strategy"),
}


@pytest.mark.parametrize("name", BAD_PLANS)
def test_bad_plan_fails_before_anything_runs(tmp_path, capsys, no_child, name):
    text, problem = BAD_PLANS[name]
    out = tmp_path / "out"
    code, stdout, err = _cli(capsys, _write(tmp_path, text), "--seeds", "2", "--out", out)
    assert code == 2 and stdout == ""
    assert err.startswith("fedlora: error: ") and err.count("\n") == 1, err
    assert problem in err, err
    assert not out.exists()


@pytest.mark.parametrize("args, problem", [
    (("--seeds", "2"), "[base] has 'seed = 7' and --seeds is given"),
    (("--seeds", "0"), "--seeds '0': seeds must be positive"),
    (("--seeds", "1,1"), "--seeds '1,1': a seed is listed twice"),
    (("--seeds", "x"), "--seeds 'x': expected a count"),
])
def test_bad_seeds_fail_before_anything_runs(tmp_path, capsys, no_child, args, problem):
    out = tmp_path / "out"
    path = _write(tmp_path, BASE + "seed = 7\n" + _run_table("a"))
    code, _, err = _cli(capsys, path, *args, "--out", out)
    assert code == 2 and problem in err and err.count("\n") == 1, err
    assert not out.exists()


def test_missing_comparison_file(tmp_path, capsys, no_child):
    code, _, err = _cli(capsys, tmp_path / "nope.toml", "--out", tmp_path / "out")
    assert code == 2 and "comparison file not found" in err and "nope.toml" in err


def test_default_seeds(tmp_path):
    assert cmp.load_plan(_write(tmp_path, BASE + _run_table("a")), None)[1] == [1]
    runs, seeds = cmp.load_plan(_write(tmp_path, BASE + "seed = 7\n" + _run_table("a")), None)
    assert seeds == [7] and "seed" not in runs[0].overrides
    assert cmp.load_plan(_write(tmp_path, BASE + _run_table("a")), "2")[1] == [1, 2]


def test_local_paths_made_absolute(tmp_path, monkeypatch, topic_dataset):
    monkeypatch.chdir(topic_dataset.parent)
    path = _write(tmp_path, BASE + f'dataset = "{topic_dataset.name}"\n' + _run_table("a"))
    runs, _ = cmp.load_plan(path, None)
    assert runs[0].overrides["dataset"] == str(topic_dataset)


# --- summaries from finished run directories -----------------------------------------

def fake_run(directory: Path, settings: dict, accuracies: list[float | None], seconds=2.0,
             uplink=1_000_000, residual: float | None = 0.5, epsilon: float | None = None):
    """A finished run directory as ``fedlora simulate`` leaves it (no adapter)."""
    directory.mkdir(parents=True, exist_ok=True)
    config = resolve(settings).to_dict() | {"out-dir": str(directory)}
    (directory / "config.json").write_text(json.dumps(config))
    rows = [{"round": i, "accuracy": acc, "uplink_bytes": uplink, "downlink_bytes": 2 * uplink,
             "epsilon": epsilon, "seconds": seconds, "agg_residual": residual}
            for i, acc in enumerate(accuracies, start=1)]
    (directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    evaluated = [a for a in accuracies if a is not None]
    (directory / "summary.json").write_text(json.dumps({
        "rounds": len(rows), "final_accuracy": evaluated[-1], "best_accuracy": max(evaluated),
        "uplink_bytes": uplink * len(rows), "downlink_bytes": 2 * uplink * len(rows),
        "seconds": seconds * len(rows), "epsilon": epsilon}))


# per seed: (accuracy per round, seconds per round)
CURVES = {"avg": {1: ([0.3, 0.5], 2.0), 2: ([0.4, 0.6], 4.0), 3: ([0.2, 0.7], 3.0)},
          "ffa": {1: ([0.5, 0.45], 1.0), 2: ([0.5, 0.55], 1.0), 3: ([0.6, 0.65], 1.0)}}


def _finished_comparison(tmp_path: Path, seeds="3") -> tuple[Path, Path]:
    path = _write(tmp_path, TWO_RUNS)
    out = tmp_path / "out"
    runs, seed_list = cmp.load_plan(path, seeds)
    for run in runs:
        for seed in seed_list:
            accuracies, seconds = CURVES[run.label][seed]
            fake_run(cmp.run_dir(out, run, seed), run.settings(seed), accuracies, seconds,
                     epsilon=None if run.label == "avg" else 2.0 + seed)
    return path, out


def _csv(out: Path) -> tuple[list[str], dict[str, dict[str, str]]]:
    with open(out / "summary.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    return rows[0], {row[1]: dict(zip(rows[0], row)) for row in rows[1:]}


def test_summaries_from_finished_runs(tmp_path, capsys, no_child):
    path, out = _finished_comparison(tmp_path)
    (out / "summary.csv").write_text("stale")
    code, stdout, err = _cli(capsys, path, "--seeds", "3", "--out", out)
    assert code == 0, err
    progress = [line for line in stdout.splitlines() if line.startswith("[")]
    assert progress[0] == "[1/6] avg seed 1: final acc 0.5000 (reused)"
    assert len(progress) == 6 and all(line.endswith("(reused)") for line in progress)

    header, rows = _csv(out)
    assert header[:len(LEAD_COLUMNS)] == LEAD_COLUMNS and list(rows) == ["avg", "ffa"]
    avg, ffa = rows["avg"], rows["ffa"]
    assert (avg["group"], avg["seeds"], avg["seed_list"]) == ("plain", "3", "1;2;3")
    assert float(avg["final_accuracy_mean"]) == pytest.approx(0.6)
    assert float(avg["final_accuracy_ci95"]) == pytest.approx(T_975_2 * 0.1 / math.sqrt(3),
                                                              rel=1e-5)
    assert float(avg["best_accuracy_mean"]) == pytest.approx(0.6)
    assert float(avg["uplink_mb"]) == pytest.approx(2.0)
    assert float(avg["downlink_mb"]) == pytest.approx(4.0)
    assert float(avg["seconds_per_round_mean"]) == pytest.approx(3.0)
    assert (float(avg["final_accuracy_min"]), float(avg["final_accuracy_max"])) == (0.5, 0.7)
    assert float(avg["agg_residual_mean"]) == pytest.approx(0.5) and avg["epsilon_mean"] == ""
    assert float(ffa["best_accuracy_mean"]) == pytest.approx((0.5 + 0.55 + 0.65) / 3, rel=1e-5)
    assert float(ffa["final_accuracy_mean"]) == pytest.approx(0.55)
    assert float(ffa["epsilon_mean"]) == pytest.approx(4.0)

    table = (out / "summary.md").read_text()
    assert "## plain" in table and "## frozen A" in table
    assert "| avg | 3 | 0.6000 ± 0.2484 | 0.6000 ± 0.2484 | 2.00 | 4.00 | 3.0 |" in table
    for name in ("accuracy_vs_round.png", "accuracy_vs_uplink.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _judged_by(out: Path, metric: str) -> None:
    """Turn the finished runs under ``out`` into runs judged by ``metric``
    (higher is better), as an instruction-tuning run's summary says."""
    for summary_path in out.rglob("summary.json"):
        summary = json.loads(summary_path.read_text())
        for key in ("final", "best"):
            summary[f"{key}_{metric}"] = summary.pop(f"{key}_accuracy")
        summary |= {"primary_metric": metric, "primary_direction": "higher"}
        summary_path.write_text(json.dumps(summary))
        rows_path = summary_path.parent / "metrics.jsonl"
        rows = [json.loads(line) for line in rows_path.read_text().splitlines()]
        rows = [{metric if k == "accuracy" else k: v for k, v in row.items()} for row in rows]
        rows_path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def test_summaries_of_runs_judged_by_exact_match(tmp_path, capsys, no_child):
    path, out = _finished_comparison(tmp_path)
    _judged_by(out, "exact_match")
    code, stdout, err = _cli(capsys, path, "--seeds", "3", "--out", out)
    assert code == 0, err
    assert "[1/6] avg seed 1: final exact_match 0.5000 (reused)" in stdout
    header, rows = _csv(out)
    assert "final_exact_match_mean" in header and "final_accuracy_mean" not in header
    assert float(rows["avg"]["final_exact_match_mean"]) == pytest.approx(0.6)
    table = (out / "summary.md").read_text()
    assert "| run | seeds | final exact_match | best exact_match |" in table


def test_one_seed_has_no_interval(tmp_path, capsys, no_child):
    path, out = _finished_comparison(tmp_path, seeds="1")
    code, _, err = _cli(capsys, path, "--seeds", "1", "--out", out)
    assert code == 0, err
    _, rows = _csv(out)
    assert rows["avg"]["seeds"] == "1" and rows["avg"]["seed_list"] == "1"
    assert rows["avg"]["final_accuracy_ci95"] == "" and rows["avg"]["best_accuracy_ci95"] == ""
    assert float(rows["avg"]["final_accuracy_mean"]) == 0.5
    assert "| avg | 1 | 0.5000 | 0.5000 |" in (out / "summary.md").read_text()


def test_curve_mean_and_band():
    results = {seed: ({}, [{"round": i + 1, "accuracy": acc, "uplink_bytes": 10**6 * seed}
                           for i, acc in enumerate(CURVES["avg"][seed][0])])
               for seed in (1, 2, 3)}
    xs, means, cis = cmp.curve(results, "round")
    assert xs == [1, 2] and means == pytest.approx([0.3, 0.6])
    assert cis[1] == pytest.approx(T_975_2 * 0.1 / math.sqrt(3))
    xs, _, _ = cmp.curve(results, "uplink")  # mean cumulative MB by each round
    assert xs == pytest.approx([2.0, 4.0])


def test_without_matplotlib_tables_are_still_written(tmp_path, capsys, no_child, monkeypatch):
    path, out = _finished_comparison(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails
    code, _, err = _cli(capsys, path, "--seeds", "3", "--out", out)
    assert code == 0
    assert err.count("\n") == 1 and "matplotlib is not installed" in err
    assert (out / "summary.csv").is_file() and (out / "summary.md").is_file()
    assert not (out / "accuracy_vs_round.png").exists()


def test_reused_run_must_match_the_comparison(tmp_path, capsys, no_child):
    path, out = _finished_comparison(tmp_path)
    path.write_text(TWO_RUNS.replace("lr = 0.01", "lr = 0.02"))
    code, _, err = _cli(capsys, path, "--seeds", "3", "--out", out)
    assert code == 2 and err.count("\n") == 1
    assert "ffa/seed-1: finished with lr = 0.01, but the comparison now says 0.02" in err


def _fake_child(calls: list, exit_code: int = 0, resume_code: int | None = None):
    """A stand-in for ``fedlora simulate``: reads its --set and --out (or
    --resume) and writes a finished run there (also when it "fails", as a run
    with no accepted update does). ``calls``: (label, seed, "fresh"|"resume");
    a resume exits ``resume_code`` (if given) without writing anything."""
    def run_child(command, log, append=False):
        resume = "--resume" in command
        out = Path(command[-1])
        if resume:
            settings = json.loads((out / "config.json").read_text())
        else:
            sets = command[command.index("--set") + 1:command.index("--out")]
            settings = dict(parse_set_option(item) for item in sets)
        calls.append((out.parent.name, settings["seed"], "resume" if resume else "fresh"))
        with open(log, "a" if append else "w") as handle:
            if resume and resume_code is not None:
                handle.write("fedlora: error: checkpoint.fedlora: checksum mismatch\n")
                return resume_code
            fake_run(out, settings, [0.5, 0.8])
            handle.write("round 1/2 ...\nfedlora: error: no client update was accepted\n")
        return exit_code
    return run_child


def _unfinish(out: Path, label: str, seed: int) -> Path:
    """A finished run made an interrupted one (no summary.json, a leftover)."""
    directory = out / label / f"seed-{seed}"
    (directory / "summary.json").unlink()
    (directory / "leftover").write_text("x")
    (out / label / f"seed-{seed}.log").write_text("round 1/2 of the first attempt\n")
    return directory


def test_unfinished_runs_resume_if_their_settings_match(tmp_path, capsys, monkeypatch):
    path, out = _finished_comparison(tmp_path)
    resumable = _unfinish(out, "avg", 2)
    edited = _unfinish(out, "ffa", 1)  # started before the TOML said lr = 0.01
    config = json.loads((edited / "config.json").read_text())
    (edited / "config.json").write_text(json.dumps(config | {"lr": 0.02}))
    (_unfinish(out, "ffa", 3) / "config.json").unlink()  # stopped before it was written
    calls = []
    monkeypatch.setattr(cmp.runs, "run_child", _fake_child(calls))
    code, stdout, err = _cli(capsys, path, "--seeds", "3", "--out", out)
    assert code == 0, err
    assert calls == [("avg", 2, "resume"), ("ffa", 1, "fresh"), ("ffa", 3, "fresh")]
    assert (resumable / "leftover").exists()  # kept: the resume goes on in that directory
    assert not (edited / "leftover").exists() and not (out / "ffa" / "seed-3" / "leftover").exists()
    assert (out / "avg" / "seed-2.log").read_text().startswith("round 1/2 of the first attempt\n")
    assert "first attempt" not in (out / "ffa" / "seed-1.log").read_text()
    progress = [line for line in stdout.splitlines() if line.startswith("[")]
    assert progress[1].startswith("[2/6] avg seed 2: final acc 0.8000 (resumed, ")
    assert progress[3].startswith("[4/6] ffa seed 1: final acc 0.8000 (")
    assert "resumed" not in progress[3] + progress[5] and stdout.count("(reused)") == 3
    assert json.loads((edited / "config.json").read_text())["lr"] == 0.01
    _, rows = _csv(out)
    assert float(rows["avg"]["final_accuracy_mean"]) == pytest.approx((0.5 + 0.8 + 0.7) / 3)


def test_a_refused_resume_runs_again_from_round_1(tmp_path, capsys, monkeypatch):
    path, out = _finished_comparison(tmp_path)
    directory = _unfinish(out, "avg", 2)
    calls = []
    monkeypatch.setattr(cmp.runs, "run_child", _fake_child(calls, resume_code=2))
    code, stdout, err = _cli(capsys, path, "--seeds", "3", "--out", out)
    assert code == 0, err
    assert calls == [("avg", 2, "resume"), ("avg", 2, "fresh")]
    assert not (directory / "leftover").exists()
    assert "[2/6] avg seed 2: final acc 0.8000 (" in stdout and "resumed" not in stdout
    log = (out / "avg" / "seed-2.log").read_text().splitlines()
    assert log[:4] == ["round 1/2 of the first attempt",
                       "fedlora: error: checkpoint.fedlora: checksum mismatch",
                       "fedlora compare: the resume was refused, so this run starts again "
                       "from round 1", "round 1/2 ..."]


def test_failed_run_stops_the_comparison(tmp_path, capsys, monkeypatch):
    path, out = _finished_comparison(tmp_path)
    (out / "summary.csv").write_text("from an earlier comparison")
    (out / "ffa" / "seed-1" / "summary.json").unlink()
    calls = []
    monkeypatch.setattr(cmp.runs, "run_child", _fake_child(calls, exit_code=1))
    code, stdout, err = _cli(capsys, path, "--seeds", "3", "--out", out)
    assert code == 1 and calls == [("ffa", 1, "resume")]
    assert err.count("\n") == 1 and err.startswith(
        "fedlora: error: run 'ffa' seed 1 failed with exit code 1: fedlora: error: no client")
    assert str(out / "ffa" / "seed-1.log") in err
    assert "[5/6]" not in stdout  # stopped there
    assert not (out / "ffa" / "seed-1" / "summary.json").exists()
    assert not any((out / name).exists() for name in cmp.OUTPUTS)


def test_help_lists_compare(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "compare" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["compare", "--help"])
    assert "--seeds N|LIST" in capsys.readouterr().out


# --- one real comparison ---------------------------------------------------------------

def _fedlora_compare(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, float]:
    """``fedlora compare`` as a user runs it; every process it started is gone
    when this returns (and the test fails if any was left)."""
    env = dict(os.environ, FLWR_HOME=str(tmp_path / "flwr-home"))
    started = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, "-m", "fedlora", "compare", *args], env=env,
                              capture_output=True, text=True, timeout=900,
                              stdin=subprocess.DEVNULL)
        _, alive = psutil.wait_procs(ours(env["FLWR_HOME"]), timeout=30)
        assert not alive, f"left running: {[describe(p) for p in alive]}"
    finally:
        stop(ours(env["FLWR_HOME"]))
    return done, time.perf_counter() - started


def _ctrl_c_after_round_1(tmp_path: Path, run: Path, *args: str
                          ) -> subprocess.CompletedProcess:
    """``fedlora compare`` in a process group of its own, sent SIGINT as a
    terminal's Ctrl-C is once ``run`` has its round-1 checkpoint; every
    process it started is gone when this returns."""
    from fedlora.federation.checkpoint import CHECKPOINT_FILE

    env = dict(os.environ, FLWR_HOME=str(tmp_path / "flwr-home"))
    command = [sys.executable, "-m", "fedlora", "compare", *args]
    try:
        child = subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
                                 start_new_session=True)
        deadline = time.monotonic() + 600
        while not (run / CHECKPOINT_FILE).exists():
            assert child.poll() is None and time.monotonic() < deadline, "no round 1"
            time.sleep(0.05)
        os.killpg(child.pid, signal.SIGINT)
        stdout, stderr = child.communicate(timeout=60)
        _, alive = psutil.wait_procs(ours(env["FLWR_HOME"]), timeout=30)
        assert not alive, f"left running: {[describe(p) for p in alive]}"
    finally:
        stop(ours(env["FLWR_HOME"]))
    return subprocess.CompletedProcess(command, child.returncode, stdout, stderr)


@pytest.mark.e2e
def test_real_comparison_stops_on_ctrl_c_and_resumes(tmp_path, tiny_bert, topic_dataset):
    """Ctrl-C after the first run's round 1 (SIGINT to the whole process
    group, as a terminal sends it; 8 rounds, as later ones take a fraction of
    a second and the run must not finish first); then the same command resumes that run
    and does the second; then once more, which only reuses."""
    path = _write(tmp_path, f"""
[base]
model = "{tiny_bert}"
dataset = "{topic_dataset}"
num-clients = 4
clients-per-round = 2
rounds = 8
local-steps = 1
batch-size = 8
eval-examples = 40
partition = "iid"
client-cpus = 1

[[run]]
label = "tiny"
group = "tiny BERT"
""")
    out = tmp_path / "out"
    args = [str(path), "--seeds", "2", "--out", str(out)]
    stopped = _ctrl_c_after_round_1(tmp_path, out / "tiny" / "seed-1", *args)
    log = (out / "tiny" / "seed-1.log").read_text()
    assert stopped.returncode == 130, stopped.stderr[-3000:] + log[-3000:]
    assert stopped.stderr.splitlines()[-1] == (
        f"fedlora: compare stopped by SIGINT: 0 of 2 runs finished in {out}; run the same "
        "command again to continue (an interrupted run resumes from its last round)")
    assert "stopped by SIGINT" in log and "round 8/8" not in log, log[-3000:]
    assert not (out / "tiny" / "seed-1" / "summary.json").exists()
    assert not (out / "tiny" / "seed-2").exists()  # not started
    assert not any((out / name).exists() for name in cmp.OUTPUTS)

    first, _ = _fedlora_compare(tmp_path, *args)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    lines = first.stdout.splitlines()
    assert lines[1].startswith("[1/2] tiny seed 1: final acc ") and "(resumed, " in lines[1]
    assert lines[2].startswith("[2/2] tiny seed 2: final acc ") and lines[2].endswith(" s)")
    assert "resumed" not in lines[2]
    assert not any(line.startswith("round ") for line in lines)  # in the logs instead
    assert "resuming" in (out / "tiny" / "seed-1.log").read_text()
    assert "round 8/8" in (out / "tiny" / "seed-2.log").read_text()
    _, metrics = read_run(out / "tiny" / "seed-1")
    assert [row["round"] for row in metrics] == list(range(1, 9))  # each round once
    header, rows = _csv(out)
    assert header[:len(LEAD_COLUMNS)] == LEAD_COLUMNS
    assert rows["tiny"]["seeds"] == "2" and rows["tiny"]["group"] == "tiny BERT"
    accuracies = [json.loads((out / "tiny" / f"seed-{s}" / "summary.json").read_text())
                  ["final_accuracy"] for s in (1, 2)]
    assert float(rows["tiny"]["final_accuracy_mean"]) == pytest.approx(
        sum(accuracies) / 2, abs=1e-6)
    assert (out / "accuracy_vs_round.png").is_file()

    finished = {s: (out / "tiny" / f"seed-{s}" / "summary.json").stat().st_mtime_ns
                for s in (1, 2)}
    again, seconds = _fedlora_compare(tmp_path, *args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("(reused)") == 2 and seconds < 120
    assert finished == {s: (out / "tiny" / f"seed-{s}" / "summary.json").stat().st_mtime_ns
                        for s in (1, 2)}


# --- trackers -------------------------------------------------------------------------

def test_each_run_is_tagged_and_all_share_one_tracker_store(tmp_path):
    path = _write(tmp_path, BASE + 'tracker = "mlflow"\ntracker-tags = "team=x"\n'
                  + _run_table("avg", group="plain, fast"))
    [run], _ = cmp.load_plan(path, "1")
    out = tmp_path / "out"
    tracked = run.tracked(1, out)
    assert tracked["tracker-tags"] == "team=x,label=avg,group=plain; fast,seed=1"
    assert tracked["tracker-dir"] == str(out / "tracker")
    assert tracked == {**run.settings(1), "tracker-tags": tracked["tracker-tags"],
                       "tracker-dir": tracked["tracker-dir"]}
    # without a tracker the tags are still recorded (a later upload uses them)
    [run], _ = cmp.load_plan(_write(tmp_path, BASE + _run_table("avg")), "1")
    assert run.tracked(2, out) == {**run.settings(2),
                                   "tracker-tags": "label=avg,group=g,seed=2"}


def test_the_tracker_keys_do_not_stop_a_finished_run_being_reused(tmp_path, no_child):
    directory = tmp_path / "avg" / "seed-1"
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(resolve({"rounds": 2}).to_json())
    cmp.runs.check_reusable(directory, {"rounds": 2, "tracker": "mlflow",
                                   "tracker-tags": "label=avg,seed=1"})
    with pytest.raises(ConfigError, match="finished with rounds = 2"):
        cmp.runs.check_reusable(directory, {"rounds": 3, "tracker": "mlflow"})


def test_a_tracker_that_cannot_start_fails_the_plan(tmp_path, capsys, no_child):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    path = _write(tmp_path, BASE + f'tracker = "mlflow"\ntracker-uri = "http://127.0.0.1:{port}"\n'
                  + _run_table("avg"))
    code, _, err = _cli(capsys, path, "--out", tmp_path / "out")
    assert code == 2 and err.count("\n") == 1
    assert "run 'avg': config key 'tracker-uri': cannot reach an MLflow server" in err
    assert not (tmp_path / "out").exists()
