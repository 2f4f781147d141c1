"""Real runs logged to TensorBoard, MLflow and W&B (offline), read back with
each tracker's own reader (tracker_logs.py) and compared with the run
directory: every number of every metrics.jsonl line at step = its round,
config.json as the parameters and summary.json as the summary. One
two-round simulation; one killed mid-run (SIGKILL to its process group)
and resumed, which must continue the same three tracker runs with no step
twice; and a comparison of two strategies, logged under one experiment and
then uploaded again with ``fedlora report --tracker``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from processes import describe, ours, stop
from runs import FEDLORA, _env, run_fedlora
from tracker_logs import float32, jsonl_rounds, mlflow_run, tensorboard_run, wandb_run

from fedlora.federation import checkpoint
from fedlora.federation.trackers.base import numbers

pytestmark = pytest.mark.e2e
ALL = "tensorboard,mlflow,wandb"
WAIT_S = 300  # the most a step may take on a loaded 2-core machine


def _settings(model: Path, dataset: Path, **extra) -> list[str]:
    settings = {"model": str(model), "dataset": str(dataset), "num-clients": 4,
                "clients-per-round": 2, "rounds": 2, "batch-size": 8, "local-steps": 1,
                "eval-examples": 40, "partition": "iid", "client-cpus": 1, "tracker": ALL,
                **extra}
    return [f"{key}={value}" for key, value in settings.items()]


def _start(tmp_path: Path, args: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen([*FEDLORA, *args], env=_env(tmp_path), start_new_session=True,
                            stdout=log.open("a"), stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)


def _finish(tmp_path: Path, args: list[str], log: Path, timeout: float = WAIT_S) -> None:
    """``fedlora ARGS`` to its end; nothing it started (W&B's service
    included) outlives it."""
    child = _start(tmp_path, args, log)
    home = _env(tmp_path)["FLWR_HOME"]
    try:
        assert child.wait(timeout=timeout) == 0, log.read_text()[-3000:]
        _, alive = psutil.wait_procs(ours(home), timeout=30)
        assert not alive, f"left running: {[describe(p) for p in alive]}"
    finally:
        stop([psutil.Process(child.pid), *ours(home)] if child.poll() is None else ours(home))


def check_logged(out: Path, tracker_dir: Path) -> dict:
    """Every tracker holds what the run directory holds; returns tracker.json."""
    expected = jsonl_rounds(out)
    config = json.loads((out / "config.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    state = json.loads((out / "tracker.json").read_text())
    assert {kind: entry["logged"] for kind, entry in state.items()} == dict.fromkeys(
        ("tensorboard", "mlflow", "wandb"), len(expected))

    rounds, logged_config, logged_summary = tensorboard_run(
        tracker_dir / "tensorboard" / state["tensorboard"]["id"])
    assert rounds == float32(expected)  # TensorBoard's scalars are float32
    assert logged_config == config and logged_summary == summary

    rounds, params, logged_summary, run = mlflow_run(
        f"sqlite:///{tracker_dir / 'mlflow.db'}", state["mlflow"]["id"])
    assert rounds == expected
    assert params == {key: str(value) for key, value in config.items()}
    assert logged_summary == numbers(summary) and run.info.status == "FINISHED"

    rounds, logged_config, logged_summary, runs = wandb_run(tracker_dir,
                                                            state["wandb"]["id"])
    assert rounds == expected and logged_config == config
    assert {key: logged_summary[f"summary/{key}"] for key in summary} == summary
    return state


def test_a_run_logs_each_round_to_every_tracker(tmp_path, tiny_bert, topic_dataset):
    out, log = tmp_path / "run", tmp_path / "run.log"
    _finish(tmp_path, ["simulate", "--set", *_settings(tiny_bert, topic_dataset),
                       "--out", str(out)], log)
    state = check_logged(out, out / "tracker")  # tracker-dir's default: in the run
    assert state["tensorboard"]["id"] == "run"  # the run directory's name
    [offline] = (out / "tracker" / "wandb").glob("offline-run-*")  # W&B, offline
    assert offline.name.endswith(state["wandb"]["id"])


def _told_all(out: Path) -> bool:
    """tracker.json says every tracker has had round 1."""
    try:
        state = json.loads((out / "tracker.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    return len(state) == 3 and all(entry["logged"] >= 1 for entry in state.values())


def test_a_killed_run_resumes_the_same_tracker_runs(tmp_path, tiny_bert, topic_dataset):
    """SIGKILL as soon as every tracker has been told of round 1 (W&B has
    likely not written it yet: its file is written each second), then
    ``--resume``; 8 rounds, as later ones take a fraction of a second and
    the kill must land before the end."""
    out, log, trackers_dir = tmp_path / "killed", tmp_path / "killed.log", tmp_path / "trackers"
    settings = _settings(tiny_bert, topic_dataset, rounds=8,
                         **{"tracker-dir": str(trackers_dir)})
    child = _start(tmp_path, ["simulate", "--set", *settings, "--out", str(out)], log)
    try:
        deadline = time.monotonic() + WAIT_S
        while not _told_all(out):
            assert child.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.01)
        os.killpg(child.pid, signal.SIGKILL)
        child.wait(timeout=WAIT_S)
    finally:
        stop(ours(_env(tmp_path)["FLWR_HOME"]))
    assert checkpoint.load(out).round < 8 and not (out / "summary.json").exists()
    before = {kind: entry["id"] for kind, entry in
              json.loads((out / "tracker.json").read_text()).items()}

    _finish(tmp_path, ["simulate", "--resume", str(out)], log)
    state = check_logged(out, trackers_dir)  # each step once (the readers assert it)
    assert {kind: entry["id"] for kind, entry in state.items()} == before
    assert [p.name for p in (trackers_dir / "tensorboard").iterdir()] == ["killed"]
    assert len(list((trackers_dir / "wandb").glob(f"offline-run-*-{before['wandb']}"))) == 2


COMPARISON = """
[base]
model = "{model}"
dataset = "{dataset}"
num-clients = 4
clients-per-round = 2
rounds = 2
local-steps = 1
batch-size = 8
eval-examples = 40
partition = "iid"
client-cpus = 1
tracker = "tensorboard,mlflow"

[[run]]
label = "avg"
group = "LoRA, both factors"
strategy = "fedavg"

[[run]]
label = "ffa"
group = "frozen A"
strategy = "ffa"
"""


def test_a_comparison_logs_every_run_under_one_experiment_then_uploads(
        tmp_path, tiny_bert, topic_dataset):
    from mlflow.tracking import MlflowClient

    path, out = tmp_path / "cmp.toml", tmp_path / "cmp"
    path.write_text(COMPARISON.format(model=tiny_bert, dataset=topic_dataset))
    _finish(tmp_path, ["compare", str(path), "--out", str(out)], tmp_path / "cmp.log",
            timeout=2 * WAIT_S)  # two simulations
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'tracker' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("fedlora")  # beside MLflow's "Default"
    runs = {run.info.run_name: run for run in client.search_runs([experiment.experiment_id])}
    assert sorted(runs) == ["avg/seed-1", "ffa/seed-1"]
    for label, group, strategy in (("avg", "LoRA; both factors", "fedavg"),
                                   ("ffa", "frozen A", "ffa")):  # a comma would split tags
        run_dir = out / label / "seed-1"
        run = runs[f"{label}/seed-1"]
        assert {k: run.data.tags[k] for k in ("label", "group", "seed")} == {
            "label": label, "group": group, "seed": "1"}
        rounds, params, _, _ = mlflow_run(client.tracking_uri, run.info.run_id)
        assert rounds == jsonl_rounds(run_dir) and params["strategy"] == strategy
        tb_rounds, _, _ = tensorboard_run(out / "tracker" / "tensorboard" / label / "seed-1")
        assert tb_rounds == float32(jsonl_rounds(run_dir))

    # the same finished runs, uploaded after the fact to a tracker they never saw
    dirs = [str(out / label / "seed-1") for label in ("avg", "ffa")]
    untouched = {d: sorted(p.name for p in Path(d).iterdir()) for d in dirs}
    uploaded = run_fedlora(tmp_path, "report", *dirs, "--tracker", "wandb",
                           "--tracker-dir", str(tmp_path / "upload"))
    assert uploaded.returncode == 0, uploaded.stderr[-3000:]
    assert {d: sorted(p.name for p in Path(d).iterdir()) for d in dirs} == untouched
    names = {}
    for folder in (tmp_path / "upload" / "wandb").glob("offline-run-*"):
        rounds, config, summary, [run] = wandb_run(tmp_path / "upload",
                                                   folder.name.rsplit("-", 1)[1])
        names[run.display_name] = run
        run_dir = Path(config["out-dir"])
        assert rounds == jsonl_rounds(run_dir)
        saved = json.loads((run_dir / "config.json").read_text())
        assert config == {**saved, "tracker": "wandb", "tracker-dir": str(tmp_path / "upload")}
        assert summary["summary/final_accuracy"] == json.loads(
            (run_dir / "summary.json").read_text())["final_accuracy"]
    assert sorted(names) == ["avg/seed-1", "ffa/seed-1"]
    assert "label=avg" in names["avg/seed-1"].tags
