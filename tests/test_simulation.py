"""Integration: real Flower simulations on real Ray (local, 127.0.0.1), tiny models.

Each run goes through the installed ``fedlora`` console script in a child
process, as a user would run it, and the outputs contract is checked file by
file; ``fedlora evaluate`` must then reproduce the final accuracy exactly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import psutil
from safetensors.numpy import load_file

from fedlora import codec

ROUND_FIELDS = {"round", "accuracy", "loss", "train_loss", "clients", "uplink_bytes",
                "downlink_bytes", "epsilon", "seconds"}
FEDLORA = [sys.executable, "-m", "fedlora.cli"]


def _ray_pids() -> set[int]:
    names = {"raylet", "gcs_server"}
    return {p.pid for p in psutil.process_iter(["name"]) if p.info["name"] in names}


def _env(tmp_path: Path) -> dict:
    env = dict(os.environ, FLWR_HOME=str(tmp_path / "flwr-home"), HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0")
    return env


def run_fedlora(tmp_path: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([*FEDLORA, *args], env=_env(tmp_path), capture_output=True,
                          text=True, timeout=timeout)


def _wait_for_ray_exit(before: set[int]) -> set[int]:
    """Ray processes this test started that are still alive after 30 s."""
    started = _ray_pids() - before
    procs = [psutil.Process(pid) for pid in started if psutil.pid_exists(pid)]
    _, alive = psutil.wait_procs(procs, timeout=30)
    for proc in alive:  # stop what we started, then report it
        proc.kill()
    return {p.pid for p in alive}


def check_run(tmp_path: Path, model_dir: Path, dataset: Path, **overrides) -> dict:
    out = tmp_path / "run"
    settings = {"model": str(model_dir), "dataset": str(dataset), "num-clients": 8,
                "clients-per-round": 4, "rounds": 2, "batch-size": 8, "lr": 0.005,
                "partition": "dirichlet", "dirichlet-alpha": 1.0, "client-cpus": 1,
                **overrides}
    before = _ray_pids()
    proc = run_fedlora(tmp_path, "simulate", "--set",
                       *[f"{k}={v}" for k, v in settings.items()], "--out", str(out))
    leftover = _wait_for_ray_exit(before)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not leftover, f"Ray processes left running: {leftover}"

    # one progress line per round
    assert [line.split()[1] for line in proc.stdout.splitlines()
            if line.startswith("round ")] == ["1/2", "2/2"]

    config = json.loads((out / "config.json").read_text())
    assert config["num-clients"] == 8 and config["model"] == str(model_dir)

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    adapter_dir = out / "adapter"
    saved = load_file(str(adapter_dir / "adapter_model.safetensors"))
    payload_size = len(codec.encode(saved))
    for row in rows:
        assert ROUND_FIELDS <= set(row)
        assert 0.0 <= row["accuracy"] <= 1.0 and row["loss"] > 0
        assert row["clients"] == 4 and row["epsilon"] is None
        assert row["uplink_bytes"] == row["downlink_bytes"] == 4 * payload_size
        assert row["train_loss"] > 0 and row["seconds"] > 0

    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_accuracy"] == rows[-1]["accuracy"]
    assert summary["uplink_bytes"] == sum(r["uplink_bytes"] for r in rows)
    assert summary["client_updates"] == 8

    # training moved the adapter off PEFT's B = 0 init; `evaluate` below loads it
    # with PeftModel.from_pretrained
    assert (adapter_dir / "adapter_config.json").is_file()
    b_norms = [np.abs(v).sum() for k, v in saved.items() if ".lora_B." in k]
    assert b_norms and all(n > 0 for n in b_norms)

    evaluated = run_fedlora(tmp_path, "evaluate", str(out))
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    report = json.loads(evaluated.stdout.strip().splitlines()[-1])
    assert report["accuracy"] == summary["final_accuracy"]
    return summary


def test_sequence_classification_simulation(tmp_path, tiny_bert, topic_dataset):
    check_run(tmp_path, tiny_bert, topic_dataset)


def test_causal_lm_simulation(tmp_path, tiny_llama, topic_dataset):
    summary = check_run(tmp_path, tiny_llama, topic_dataset, **{"max-seq-len": 48})
    assert summary["final_accuracy"] is not None
