"""Integration: real Flower simulations on real Ray (local, 127.0.0.1), tiny models.

Each run goes through the ``fedlora`` command in a child process, as a user
would run it, and the outputs contract is checked file by file; ``fedlora
evaluate`` must then reproduce the final accuracy exactly. While a run goes,
every listening socket of its process tree is recorded: all must be loopback,
and the tree must be gone when the command returns.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import psutil
import pytest
from opacus.accountants import RDPAccountant
from processes import describe, ours, stop, watch
from safetensors.numpy import load_file

from fedlora import codec

ROUND_FIELDS = {"round", "accuracy", "loss", "train_loss", "clients", "uplink_bytes",
                "downlink_bytes", "epsilon", "seconds"}
FEDLORA = [sys.executable, "-m", "fedlora.cli"]


def _env(tmp_path: Path) -> dict:
    """The child's environment; its unique FLWR_HOME marks its process tree."""
    return dict(os.environ, FLWR_HOME=str(tmp_path / "flwr-home"))


def run_fedlora(tmp_path: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([*FEDLORA, *args], env=_env(tmp_path), capture_output=True,
                          text=True, timeout=timeout)


def check_run(tmp_path: Path, model_dir: Path, dataset: Path, clients=(4, 4),
              trained_b: bool = True, **overrides) -> tuple[dict, list[dict], dict]:
    """Run ``fedlora simulate`` and check the outputs contract; returns
    (summary, metrics rows, the saved adapter tensors). ``trained_b``: the
    saved global B must have moved off 0 (not so where B stays on the
    clients, or restarts from 0 every round)."""
    out = tmp_path / "run"
    settings = {"model": str(model_dir), "dataset": str(dataset), "num-clients": 8,
                "clients-per-round": 4, "rounds": 2, "batch-size": 8, "lr": 0.005,
                "partition": "dirichlet", "dirichlet-alpha": 1.0, "client-cpus": 1,
                **overrides}
    env, log = _env(tmp_path), tmp_path / "simulate.log"
    command = [*FEDLORA, "simulate", "--set", *[f"{k}={v}" for k, v in settings.items()],
               "--out", str(out)]
    try:
        code, sockets, names = watch(command, env, env["FLWR_HOME"], log, timeout=600)
        output = log.read_text()
        assert code == 0, output[-3000:]
        # Ray shut down with the run: nothing of the tree outlives the command
        _, alive = psutil.wait_procs(ours(env["FLWR_HOME"]), timeout=30)
        assert not alive, f"left running: {[describe(p) for p in alive]}"
    finally:
        stop(ours(env["FLWR_HOME"]))
    # a Ray server was seen listening, so the loopback check below saw Ray (the
    # GCS listens for the whole run; a short run on a loaded machine may end
    # between two once-a-second samples of the raylet's sockets)
    assert any(name in names.get(pid, "") for pid, _, _ in sockets
               for name in ("raylet", "gcs_server")), names
    exposed = [f"{names.get(pid)} {ip}:{port}" for (pid, ip, port), loop in sockets.items()
               if not loop]
    assert not exposed, f"listening beyond loopback: {exposed}"

    # one progress line per round
    assert [line.split()[1] for line in output.splitlines()
            if line.startswith("round ")] == ["1/2", "2/2"]

    config = json.loads((out / "config.json").read_text())
    assert config["num-clients"] == settings["num-clients"] and config["model"] == str(model_dir)

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    adapter_dir = out / "adapter"
    saved = load_file(str(adapter_dir / "adapter_model.safetensors"))
    private = settings.get("dp", "off") != "off"
    assert [row["clients"] for row in rows] == list(clients)
    for row in rows:
        assert ROUND_FIELDS <= set(row)
        assert 0.0 <= row["accuracy"] <= 1.0 and row["loss"] > 0
        assert (row["epsilon"] > 0) if private else (row["epsilon"] is None)
        assert row["downlink_bytes"] > 0 and row["seconds"] > 0
        if row["clients"]:
            assert row["uplink_bytes"] > 0 and row["train_loss"] > 0
            assert row.get("agg_residual") is None or row["agg_residual"] >= 0

    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_accuracy"] == rows[-1]["accuracy"]
    assert summary["uplink_bytes"] == sum(r["uplink_bytes"] for r in rows)
    assert summary["client_updates"] == sum(clients)

    # training moved the adapter off PEFT's B = 0 init; `evaluate` below loads it
    # with PeftModel.from_pretrained
    assert (adapter_dir / "adapter_config.json").is_file()
    b_norms = [np.abs(v).sum() for k, v in saved.items() if ".lora_B." in k]
    assert b_norms and (all(n > 0 for n in b_norms) or not trained_b)

    evaluated = run_fedlora(tmp_path, "evaluate", str(out))
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    report = json.loads(evaluated.stdout.strip().splitlines()[-1])
    assert report["accuracy"] == summary["final_accuracy"]
    return summary, rows, saved


def test_sequence_classification_simulation(tmp_path, tiny_bert, topic_dataset):
    _, rows, saved = check_run(tmp_path, tiny_bert, topic_dataset)
    for row in rows:  # FedAvg: the whole adapter, dense float32, both ways
        assert row["uplink_bytes"] == row["downlink_bytes"] == 4 * len(codec.encode(saved))
        assert row["agg_residual"] > 0


def test_causal_lm_simulation(tmp_path, tiny_llama, topic_dataset):
    _, rows, saved = check_run(tmp_path, tiny_llama, topic_dataset, **{"max-seq-len": 48})
    assert not any("classifier" in name or "score" in name for name in saved)
    assert rows[-1]["uplink_bytes"] == 4 * len(codec.encode(saved))


# The other strategies run with client-level DP on: each run checks the
# strategy's own contract and the DP accounting (8 IID clients of 40 examples,
# batch 8, noise 1.0: a client's ε after one round is known in advance).
DP = {"partition": "iid", "dp": "local", "dp-noise-multiplier": 1.0}


def _one_round_epsilon(examples: int, batch: int, noise: float) -> float:
    """ε of one epoch of Poisson-sampled DP-SGD, by Opacus's own accountant."""
    accountant = RDPAccountant()
    steps = -(-examples // batch)
    accountant.history = [(noise, 1.0 / steps, steps)]
    return accountant.get_epsilon(1e-5)


def _check_epsilon(rows: list[dict]) -> None:
    assert rows[0]["epsilon"] == pytest.approx(_one_round_epsilon(40, 8, 1.0), rel=1e-6)
    assert rows[1]["epsilon"] >= rows[0]["epsilon"]


def test_ffa_simulation_with_dp(tmp_path, tiny_bert, topic_dataset):
    _, rows, saved = check_run(tmp_path, tiny_bert, topic_dataset, strategy="ffa", **DP)
    sent = {n: v for n, v in saved.items() if ".lora_A." not in n}
    for row in rows:
        assert row["uplink_bytes"] == 4 * len(codec.encode(sent))
        assert row["agg_residual"] < 1e-6  # exact aggregation
    _check_epsilon(rows)


def test_lora_fair_simulation_with_dp(tmp_path, tiny_bert, topic_dataset):
    _, rows, _ = check_run(tmp_path, tiny_bert, topic_dataset, strategy="lora-fair",
                           **{"fair-steps": 50}, **DP)
    for row in rows:  # the correction never loses to plain averaging of the same factors
        assert row["agg_residual"] <= row["agg_residual_fedavg"] + 1e-9
    _check_epsilon(rows)


def test_cellm_simulation_with_dp(tmp_path, tiny_bert, topic_dataset):
    _, rows, saved = check_run(tmp_path, tiny_bert, topic_dataset, strategy="cellm",
                               **{"cellm-up-density": 0.05, "cellm-error-feedback": "true"},
                               **DP)
    dense = len(codec.encode(saved))
    for row in rows:
        assert row["downlink_bytes"] == 4 * dense
        assert row["uplink_bytes"] * 5 < row["downlink_bytes"]
    _check_epsilon(rows)


def test_dp_budget_stops_clients(tmp_path, tiny_bert, topic_dataset):
    """All 4 clients train in round 1; a second round would exceed the budget,
    so in round 2 they all decline and the global adapter stays as it was."""
    one = _one_round_epsilon(80, 8, 1.0)
    _, rows, _ = check_run(
        tmp_path, tiny_bert, topic_dataset, clients=(4, 0), partition="iid",
        **{"num-clients": 4, "clients-per-round": 4, "dp": "local",
           "dp-noise-multiplier": 1.0, "dp-target-epsilon": round(1.1 * one, 6)})
    assert rows[0]["epsilon"] == pytest.approx(one, rel=1e-6)
    assert rows[1]["declined"] == 4 and rows[1]["updated"] is False
    assert rows[1]["accuracy"] == rows[0]["accuracy"]


def test_central_dp_simulation(tmp_path, tiny_bert, topic_dataset):
    """The server clips and noises; ε is the subsampled Gaussian's after each
    round (q = 4 of 8 clients), and no raw-factor metric is published."""
    _, rows, _ = check_run(tmp_path, tiny_bert, topic_dataset, partition="iid",
                           **{"dp": "central", "dp-noise-multiplier": 1.0,
                              "dp-max-grad-norm": 0.5})
    reference = RDPAccountant()
    for row in rows:
        reference.step(noise_multiplier=1.0, sample_rate=0.5)
        assert row["epsilon"] == pytest.approx(reference.get_epsilon(1e-5), rel=1e-9)
        assert "agg_residual" not in row
