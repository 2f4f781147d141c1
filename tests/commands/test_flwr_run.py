"""End to end the Flower way: ``flwr run .`` with a tiny model, offline, on loopback.

``flwr run . local`` (the ``:local:`` connection of a fresh ``$FLWR_HOME``)
starts a detached ``flower-superlink --simulation`` on 127.0.0.1, which starts
``flower-superexec``, which starts ``flwr-simulation`` for the run, which
starts Ray (``gcs_server``, ``raylet``, workers). The SuperLink and SuperExec
keep running after the run; this test stops them by pid.

Every process of that tree inherits the environment given here, so "ours" is
exactly the set of processes whose ``FLWR_HOME`` is this test's temporary
one: nothing else on the machine is looked at twice or touched.

Ports: the local SuperLink's port comes from ``FLWR_LOCAL_SUPERLINK_HTTP_API_PORT``
(default 39091) and ``FLWR_LOCAL_CONTROL_API_PORT`` (default 39093); the test
picks free ones, so it neither collides with nor reuses another SuperLink.

Ray on loopback: ``flwr run`` lets only ``num_cpus``, ``num_gpus``,
``logging_level`` and ``log_to_driver`` through to ``ray.init`` (the
``init-args-*`` keys of ``--federation-config``), so ``_node_ip_address`` cannot
be passed, and in Ray 2.55 ``_node_ip_address="127.0.0.1"`` is rewritten to the
node's routable address anyway. ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` in the
environment makes Ray's node address 127.0.0.1 and its servers bind there;
the test checks every listening socket of its processes while the run goes.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from processes import describe, ours, stop, watch

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
RUN_TIMEOUT_S = 600
ROUND_FIELDS = {"round", "accuracy", "loss", "train_loss", "clients", "uplink_bytes",
                "downlink_bytes", "epsilon", "seconds"}
NUM_CLIENTS = 8
RAY_NAMES = ("gcs_server", "raylet", "ray::")
# each also runs through `flwr run`; three with heterogeneous ranks
NEW_STRATEGIES = {"fedsa": (), "hetlora": ("client-ranks='2,4,8'",),
                  "flexlora": ("client-ranks='2,4,8'",), "flora": ("client-ranks='2,4,8'",),
                  "fedex": ()}


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _toml_literal(path: Path) -> str:
    """A path as a TOML literal string; ``--run-config`` splits on ``'...'``."""
    assert "'" not in str(path), f"cannot quote {path} for --run-config"
    return f"'{path}'"


def _tail(path: Path, chars: int = 4000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else f"({path} missing)"


def _stopped_after_round_one(tmp_path: Path, env: dict, config: str) -> Path:
    """A CELLM run with error feedback (client state) and a server Adam
    (strategy state), 3 rounds, stopped with SIGINT once round 1 is
    checkpointed: the directory `resume-from` continues."""
    from fedlora.federation import checkpoint

    out = tmp_path / "stopped"
    settings = [item for item in config.split() if not item.startswith("out-dir=")]
    settings += ["rounds=3", "local-epochs=20", "strategy='cellm'", "cellm-error-feedback=true",
                 "cellm-server-optimizer='adam'", "cellm-server-lr=0.01"]
    log = (tmp_path / "stopped.log").open("w")
    child = subprocess.Popen([sys.executable, "-m", "fedlora", "simulate", "--set",
                              *settings, "--out", str(out)], env=env, stdout=log,
                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not (out / checkpoint.CHECKPOINT_FILE).is_file():
        assert child.poll() is None and time.monotonic() < deadline, _tail(tmp_path /
                                                                            "stopped.log")
        time.sleep(0.05)
    child.send_signal(signal.SIGINT)
    assert child.wait(timeout=30) == 130, _tail(tmp_path / "stopped.log")
    assert checkpoint.load(out).round < 3 and not (out / "summary.json").exists()
    return out


def test_flwr_run_end_to_end(tmp_path, tiny_bert, topic_dataset):
    home = tmp_path / "flwr-home"
    home.mkdir()
    out = tmp_path / "run"
    log = tmp_path / "flwr-run.log"
    superlink_log = home / "local-superlink" / "superlink.log"
    http_port, control_port = _free_ports(2)
    env = dict(
        os.environ,
        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # flower-superlink etc.
        FLWR_HOME=str(home),
        FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(http_port),
        FLWR_LOCAL_CONTROL_API_PORT=str(control_port),
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",  # Ray node address and binds: 127.0.0.1
    )
    def run_config(out: Path, *extra: str) -> str:
        return " ".join([
            f"model={_toml_literal(tiny_bert)}",
            f"dataset={_toml_literal(topic_dataset)}",
            f"num-clients={NUM_CLIENTS}", "clients-per-round=4", "rounds=2",
            "batch-size=8", "lr=0.005", "partition='dirichlet'", "dirichlet-alpha=1.0",
            f"out-dir={_toml_literal(out)}", *extra,
        ])
    # Two actors whatever the machine: the 4 clients of a round share them.
    federation_config = (f"num-supernodes={NUM_CLIENTS} client-resources-num-cpus=1 "
                         "client-resources-num-gpus=0 init-args-num-cpus=2 "
                         "init-args-num-gpus=0")
    def command(config: str) -> list[str]:
        return [str(BIN / "flwr"), "run", ".", "local", "--run-config", config,
                "--federation-config", federation_config, "--stream"]

    started = time.monotonic()
    try:
        # Waits for the CLI (it streams the logs until the run ends), recording
        # every listening socket of our processes meanwhile.
        returncode, listening, names = watch(command(run_config(out)), env, str(home), log,
                                             timeout=RUN_TIMEOUT_S, cwd=REPO)
        output = log.read_text(errors="replace")
        elapsed = time.monotonic() - started
        print(f"flwr run took {elapsed:.1f}s")
        assert returncode == 0, (f"flwr run exited {returncode}:\n{output[-4000:]}"
                                     f"\n--- superlink.log ---\n{_tail(superlink_log)}")

        # The run, as the SuperLink saw it: finished and completed.
        match = re.search(r"Successfully started run (\d+)", output)
        assert match, output[-4000:]
        status = subprocess.run(
            [str(BIN / "flwr"), "ls", "local", "--run-id", match.group(1), "--format",
             "json"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert status.returncode == 0, status.stdout + status.stderr
        runs = json.loads(status.stdout)["runs"]
        assert [r["status"] for r in runs] == ["finished:completed"], (
            f"{runs}\n{output[-4000:]}")

        # The ServerApp's progress lines came through the log stream.
        assert [line.split()[1] for line in output.splitlines()
                if line.startswith("round ")] == ["1/2", "2/2"], output[-4000:]

        # Everything listened on loopback only, Ray included.
        ray_pids = {pid for pid, name in names.items()
                    if any(r in name for r in RAY_NAMES)}
        assert any(pid in ray_pids for pid, _, _ in listening), (
            f"no Ray server was seen listening: {names}")
        print("listening:", sorted(f"{names.get(pid, pid)} {ip}:{port}"
                                   for (pid, ip, port) in listening))
        exposed = sorted(f"{names.get(pid, pid)} {ip}:{port}"
                         for (pid, ip, port), loop in listening.items() if not loop)
        assert not exposed, f"listening beyond loopback: {exposed}"

        # Ray went away with the run; the SuperLink and SuperExec stay until stopped.
        print(f"run status checked at {time.monotonic() - started:.1f}s")
        ray_left = [p for p in ours(str(home)) if any(r in describe(p) for r in RAY_NAMES)]
        _, ray_alive = psutil.wait_procs(ray_left, timeout=60)
        print(f"Ray gone at {time.monotonic() - started:.1f}s")
        assert not ray_alive, f"Ray outlived the run: {[describe(p) for p in ray_alive]}"
        superlinks = [p for p in ours(str(home)) if "flower-superlink" in describe(p)]
        assert len(superlinks) == 1, [describe(p) for p in ours(str(home))]
        assert str(superlink_log) in superlinks[0].cmdline()

        # The outputs contract.
        config = json.loads((out / "config.json").read_text())
        assert config["model"] == str(tiny_bert) and config["dataset"] == str(topic_dataset)
        assert config["num-clients"] == NUM_CLIENTS and config["rounds"] == 2
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert [row["round"] for row in rows] == [1, 2]
        for row in rows:
            assert ROUND_FIELDS <= set(row), sorted(ROUND_FIELDS - set(row))
            assert 0.0 <= row["accuracy"] <= 1.0
            assert math.isfinite(row["loss"]) and row["loss"] > 0
            assert math.isfinite(row["train_loss"]) and row["train_loss"] > 0
            assert row["clients"] == 4
            assert row["uplink_bytes"] > 0 and row["downlink_bytes"] > 0
            assert row["epsilon"] is None
            assert row["seconds"] > 0
        summary = json.loads((out / "summary.json").read_text())
        assert summary["rounds"] == 2 and summary["final_round"] == 2
        assert summary["final_accuracy"] == rows[-1]["accuracy"]
        assert summary["client_updates"] == 8
        assert summary["out_dir"] == str(out)
        adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
        assert adapter["peft_type"] == "LORA" and adapter["r"] == config["lora-rank"]
        assert adapter["base_model_name_or_path"] == str(tiny_bert)
        assert (out / "adapter" / "adapter_model.safetensors").stat().st_size > 0

        # The contract-v2 strategies, submitted to the same SuperLink.
        for strategy, extra in NEW_STRATEGIES.items():
            strategy_out = tmp_path / f"run-{strategy}"
            done = subprocess.run(command(run_config(strategy_out, f"strategy='{strategy}'",
                                                     *extra)),
                                  cwd=REPO, env=env, capture_output=True, text=True,
                                  timeout=RUN_TIMEOUT_S)
            assert done.returncode == 0, f"{strategy}: {(done.stdout + done.stderr)[-3000:]}"
            summary = json.loads((strategy_out / "summary.json").read_text())
            assert (summary["strategy"], summary["client_updates"],
                    summary["rejected_updates"]) == (strategy, 8, 0), summary
            rows = [json.loads(line)
                    for line in (strategy_out / "metrics.jsonl").read_text().splitlines()]
            if strategy in ("flora", "fedex"):
                assert all(row["agg_residual"] < 1e-5 for row in rows), rows
                assert (strategy_out / "base_delta.safetensors").is_file()
            if strategy == "fedsa":
                assert all(0 <= row["personal_accuracy"] <= 1 for row in rows), rows
        print(f"new strategies done at {time.monotonic() - started:.1f}s")

        # Resume in deployment: a run stopped after its first round goes on
        # under `flwr run` with the run-config key resume-from.
        stopped = _stopped_after_round_one(tmp_path, env, run_config(tmp_path / "unused"))
        done = subprocess.run(command(run_config(tmp_path / "unused",
                                                 f"resume-from={_toml_literal(stopped)}")),
                              cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=RUN_TIMEOUT_S)
        assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
        rows = [json.loads(line) for line in (stopped / "metrics.jsonl").read_text()
                .splitlines()]
        assert [row["round"] for row in rows] == [1, 2, 3]
        assert json.loads((stopped / "summary.json").read_text())["rounds"] == 3
        # the clients kept their state in the run directory, in both attempts
        tokens = {path.stem.rsplit("-", 1)[1]
                  for path in (stopped / "clients").glob("*/state-*.pb")}
        assert len(tokens) == 2, tokens
        print(f"resume-from done at {time.monotonic() - started:.1f}s")
    finally:
        # Stop everything this test started, by pid: the SuperLink first (it
        # stops its SuperExec), then whatever of ours is still alive.
        stop([p for p in ours(str(home)) if "flower-superlink" in describe(p)])
        stop(ours(str(home)))
        left = [(p.pid, describe(p)) for p in ours(str(home))]
        print(f"all stopped at {time.monotonic() - started:.1f}s")
    assert not left, f"left running: {left}"
