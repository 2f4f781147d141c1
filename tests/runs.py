"""Running ``fedlora`` as a user would, in a child process, and checking the
outputs contract of a finished run (shared by the simulation tests)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import psutil
from processes import describe, ours, stop, watch
from safetensors.numpy import load_file

ROUND_FIELDS = {"round", "accuracy", "loss", "train_loss", "clients", "uplink_bytes",
                "downlink_bytes", "epsilon", "seconds"}
FEDLORA = [sys.executable, "-m", "fedlora"]


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
