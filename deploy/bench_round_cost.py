"""What a fresh ClientApp process per message costs per round.

In a deployment (``--isolation process``, docker-compose.yml) every message
starts a new ClientApp process: Python, torch/transformers/peft imports, the
base model from disk, the node's data. The in-process simulation keeps one Ray
actor per CPU alive for the whole run, so only its first round pays that. This
runs the same federation both ways on this machine and prints seconds per
round side by side:

    python deploy/bench_round_cost.py ../shared/data/ag_news --rounds 4

- deployment: the compose services as local processes (deploy/local.py: TLS,
  SuperNode authentication, one executor per node), nodes holding the
  partitions ``deploy/split_dataset.py`` cuts, the run submitted with ``flwr run``;
- simulation: ``fedlora simulate`` on the same dataset, with the same
  partitions (``partition=iid``, the same seed) and keys.

It also times, in fresh interpreters, the two fixed parts of a ClientApp
process's start: importing the ClientApp module, and that plus building the
base model with its adapter.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from deploy.local import CONNECTION, REPO, LocalDeployment  # noqa: E402
from deploy.split_dataset import split  # noqa: E402
from fedlora.strategies import resolve  # noqa: E402

ENV = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1",
           HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
           HF_DATASETS_DISABLE_PROGRESS_BARS="1", TRANSFORMERS_VERBOSITY="error",
           RAY_USAGE_STATS_ENABLED="0", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
BUILD_MODEL = ("import client.app; from fedlora.strategies import resolve; "
               "from fedlora.features import model_with_labels; "
               "model_with_labels(resolve({}), ('a', 'b', 'c', 'd'))")


def _timed(code: str, repeats: int = 3) -> float:
    """Best of ``repeats`` wall times of ``code`` in a fresh interpreter (the
    least disturbed by whatever else runs on the machine)."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, env=ENV, cwd=REPO)
        times.append(time.perf_counter() - started)
    return min(times)


def _load() -> str:
    return f"{os.getloadavg()[0]:.1f}"


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _deployed(root: Path, keys: dict, nodes: int) -> list[dict]:
    dep = LocalDeployment(root / "deployment", ENV)
    dep.make_certs(nodes)
    split(resolve(keys), dep.root / "deploy" / "data")  # node-K/ and server/, as compose mounts
    out = dep.host_path("superexec-serverapp", "/fedlora/runs/bench")
    server = dep.host_path("superexec-serverapp", "/fedlora/data/server")
    run_config = " ".join(f"{k}={json.dumps(v)}" for k, v in
                          {**keys, "dataset": str(server), "out-dir": str(out)}.items())
    try:
        dep.up(dep.supernodes()[:nodes])
        done = dep.flwr("run", str(REPO), CONNECTION, "--run-config", run_config, "--stream",
                        timeout=3600)
        if done.returncode != 0 or not (out / "summary.json").exists():
            raise RuntimeError(f"deployed run failed:\n{done.stdout[-4000:]}{done.stderr}")
    finally:
        dep.down()
    return _rows(out)


def _simulated(root: Path, keys: dict) -> list[dict]:
    out = root / "simulation"
    command = [sys.executable, "-m", "fedlora.cli", "simulate", "--out", str(out), "--set",
               *(f"{k}={json.dumps(v)}" for k, v in keys.items())]
    subprocess.run(command, check=True, env=ENV, cwd=REPO, stdout=subprocess.DEVNULL)
    return _rows(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", type=Path)
    parser.add_argument("--nodes", type=int, default=3, choices=(1, 2, 3),
                        help="SuperNodes of docker-compose.yml to start")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--local-steps", type=int, default=5)
    args = parser.parse_args()
    nodes = args.nodes
    keys = {"dataset": str(args.dataset.resolve()), "num-clients": nodes,
            "clients-per-round": nodes, "rounds": args.rounds, "partition": "iid",
            "local-steps": args.local_steps, "max-seq-len": 64, "eval-examples": 200}

    imports = _timed("import client.app")
    with_model = _timed(BUILD_MODEL)
    with tempfile.TemporaryDirectory(prefix="fedlora-bench-") as tmp:
        loads = [_load()]
        deployed = _deployed(Path(tmp), keys, nodes)
        loads.append(_load())
        simulated = _simulated(Path(tmp), keys)
        loads.append(_load())

    print(f"fresh interpreter (best of 3): import client.app {imports:.1f}s; that and "
          f"building the default model with its adapter {with_model:.1f}s")
    print(f"1-min load average: {loads[0]} before the deployment, {loads[1]} after it, "
          f"{loads[2]} after the simulation ({os.cpu_count()} CPUs)")
    print(f"{nodes} nodes, {nodes} per round, local-steps={args.local_steps}, "
          f"max-seq-len 64, central evaluation on 200 examples")
    print("| round | deployment s | simulation s | difference s | deployment compute_s "
          "| simulation compute_s |")
    print("|---|---|---|---|---|---|")
    for d, s in zip(deployed, simulated):
        print(f"| {d['round']} | {d['seconds']:.1f} | {s['seconds']:.1f} | "
              f"{d['seconds'] - s['seconds']:+.1f} | {d['compute_s']:.1f} | "
              f"{s['compute_s']:.1f} |")
    later = [d["seconds"] - s["seconds"] for d, s in zip(deployed[1:], simulated[1:])]
    if later:
        print(f"rounds 2..{args.rounds}: deployment costs {statistics.mean(later):+.1f}s per "
              "round more than the simulation")


if __name__ == "__main__":
    main()
