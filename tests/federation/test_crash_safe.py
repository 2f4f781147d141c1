"""Crash-safe runs with real processes: a ``fedlora simulate`` whose whole
process group is SIGKILLed in the middle of round 3 of 4, then resumed with
``--resume``, ends with rounds 1..4 once each and an adapter byte-equal to
an uninterrupted run's; so do the clients' DP budgets. SIGINT and SIGTERM
end a run within 10 s (exit 130, 143) with every process it started gone,
and one line saying how to resume.

"In the middle of round 3" is observed, not timed: the kill comes as soon
as the first client has saved its round-3 state (``clients/<p>/state-3-*``)
and the test then asserts the checkpoint still says round 2. Eight clients
per round on two workers make a round four waves long, so the kill lands
while the other clients of the round are still training.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from processes import ours, stop
from runs import FEDLORA, _env

from fedlora.federation import checkpoint

pytestmark = pytest.mark.e2e

ADAPTER = Path("adapter") / "adapter_model.safetensors"
WAIT_S = 300  # the most a step of these tests may take on a loaded 2-core machine
POLL_S = 0.01


def _settings(model: Path, dataset: Path, **extra) -> list[str]:
    settings = {"model": str(model), "dataset": str(dataset), "num-clients": 8,
                "clients-per-round": 8, "rounds": 4, "batch-size": 8, "lr": 0.005,
                "client-cpus": 1, "seed": 3, **extra}
    return [f"{key}={value}" for key, value in settings.items()]


def _start(tmp_path: Path, args: list[str], log: Path) -> subprocess.Popen:
    """``fedlora ARGS`` as the leader of its own process group."""
    return subprocess.Popen([*FEDLORA, *args], env=_env(tmp_path), start_new_session=True,
                            stdout=log.open("a"), stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)


def _finish(tmp_path: Path, args: list[str], log: Path) -> None:
    child = _start(tmp_path, args, log)
    try:
        assert child.wait(timeout=WAIT_S) == 0, log.read_text()[-3000:]
    finally:
        stop([psutil.Process(child.pid), *ours(_env(tmp_path)["FLWR_HOME"])]
             if child.poll() is None else ours(_env(tmp_path)["FLWR_HOME"]))


def _await(condition, child: subprocess.Popen, log: Path, what: str) -> None:
    """Poll ``condition`` until it holds; fail if the run ends or stalls first."""
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if child.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"never saw {what}:\n{log.read_text()[-3000:]}")
        time.sleep(POLL_S)


def _saved_in_round(out: Path, server_round: int) -> bool:
    return any((out / "clients").glob(f"*/state-{server_round}-*.pb"))


def _rounds(out: Path) -> list[int]:
    return [json.loads(line)["round"] for line in (out / "metrics.jsonl").read_text()
            .splitlines()]


def _kill_in_round_3_then_resume(tmp_path: Path, settings: list[str]) -> Path:
    """SIGKILL the run's whole process group once round 3 is under way, then
    ``--resume`` it to the end; returns its run directory."""
    out, log = tmp_path / "killed", tmp_path / "killed.log"
    child = _start(tmp_path, ["simulate", "--set", *settings, "--out", str(out)], log)
    try:
        _await(lambda: _saved_in_round(out, 3), child, log, "a client's round-3 state")
        os.killpg(child.pid, signal.SIGKILL)
        child.wait(timeout=WAIT_S)
    finally:
        stop(ours(_env(tmp_path)["FLWR_HOME"]))  # Ray's own processes, in their groups
    assert checkpoint.load(out).round == 2, "the kill was meant to land in round 3"
    assert not (out / "summary.json").exists()
    _finish(tmp_path, ["simulate", "--resume", str(out)], log)
    assert _rounds(out) == [1, 2, 3, 4]
    return out


@pytest.mark.parametrize("name, extra", [
    # server Adam moments (strategy state) and error-feedback residuals (client state)
    ("cellm", {"strategy": "cellm", "cellm-error-feedback": "true",
               "cellm-server-optimizer": "adam", "cellm-server-lr": 0.01,
               "local-epochs": 20}),
    # FedAvg with local DP: each client's accountant history is its state, and the
    # budget (ε ≤ 3.3) makes clients decline in the last round
    ("fedavg-local-dp", {"dp": "local", "dp-seeded-noise": "true",
                         "dp-noise-multiplier": 2.0, "dp-target-epsilon": 3.3,
                         "local-epochs": 3}),
])
def test_a_killed_run_resumes_to_the_same_bytes(tmp_path, tiny_bert, topic_dataset,
                                                name, extra):
    settings = _settings(tiny_bert, topic_dataset, **extra)
    whole = tmp_path / "whole"
    _finish(tmp_path, ["simulate", "--set", *settings, "--out", str(whole)],
            tmp_path / "whole.log")
    resumed = _kill_in_round_3_then_resume(tmp_path, settings)
    assert (resumed / ADAPTER).read_bytes() == (whole / ADAPTER).read_bytes()
    summary = json.loads((resumed / "summary.json").read_text())
    uninterrupted = json.loads((whole / "summary.json").read_text())
    assert summary["epsilon_per_client"] == uninterrupted["epsilon_per_client"]
    assert summary["client_updates"] == uninterrupted["client_updates"]
    if extra.get("dp") == "local":
        spent = summary["epsilon_per_client"].values()
        assert spent and all(0 < eps <= 3.3 for eps in spent)
        last = json.loads((resumed / "metrics.jsonl").read_text().splitlines()[-1])
        assert last["declined"] > 0  # the budget was reached after the resume


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_stops_the_run_and_everything_it_started(tmp_path, tiny_bert,
                                                          topic_dataset, signum, code):
    out, log = tmp_path / "run", tmp_path / "run.log"
    settings = _settings(tiny_bert, topic_dataset, **{"local-epochs": 20})
    child = _start(tmp_path, ["simulate", "--set", *settings, "--out", str(out)], log)
    try:
        # round 1 checkpointed: the run is in round 2 (FedAvg clients keep no state)
        _await(lambda: (out / checkpoint.CHECKPOINT_FILE).is_file(), child, log,
               "round 1's checkpoint")
        tree = psutil.Process(child.pid).children(recursive=True)
        assert any(p.name() == "raylet" for p in tree)  # Ray is among what it started
        sent = time.monotonic()
        child.send_signal(signum)
        assert child.wait(timeout=10) == code
        _, alive = psutil.wait_procs(tree, timeout=max(0.0, sent + 15 - time.monotonic()))
        assert not alive, f"still running 15 s after the signal: {alive}"
    finally:
        stop([psutil.Process(child.pid), *ours(_env(tmp_path)["FLWR_HOME"])]
             if child.poll() is None else ours(_env(tmp_path)["FLWR_HOME"]))
    lines = log.read_text().splitlines()
    assert f"continue with: fedlora simulate --resume {out}" in lines[-1]
    assert "Traceback" not in log.read_text()
    assert not (out / "summary.json").exists()
    if signum == signal.SIGINT:  # and the partial run goes on to the end
        _finish(tmp_path, ["simulate", "--resume", str(out)], log)
        assert _rounds(out) == [1, 2, 3, 4]
        assert json.loads((out / "summary.json").read_text())["rounds"] == 4
