"""What a deployed round costs beyond training, cold, warm and simulated.

    python deploy/bench_round_cost.py ../shared/data/ag_news --nodes 3 --rounds 5
    python deploy/bench_round_cost.py ../shared/data/ag_news --modes warm --json

Modes (each a fresh run of the same federation on this machine, one after the
other):

- ``cold``: docker-compose.yml with deploy/cold.yml, as local processes
  (``deploy/local.py``: TLS, SuperNode authentication, one executor per node).
  Every message starts a ClientApp process that imports the training stack,
  loads the base model and reads the node's data;
- ``warm``: docker-compose.yml as it is: each node's ClientApp process forwards
  the message to the node's trainer (``fedlora trainer``), which keeps all that;
- ``simulation``: ``fedlora simulate`` with the same keys and partitions (its Ray
  actors keep the model too).

The nodes hold the IID partitions ``deploy/split_dataset.py`` cuts (those
``fedlora simulate`` cuts with ``partition=iid`` and the same seed); every node
trains every round.

``--flower-polls`` runs the deployed modes with Flower's own waits (the
SuperNode asks for a message every 3 s when idle, the executor for a task
every 1 s) instead of the compose file's (0.2 s: ``fedlora supernode``; 0.1 s:
``FLWR_SUPEREXEC_TASK_POLL_INTERVAL``), to show what those waits cost.

Per (mode, round): ``seconds`` (the server's round time), ``compute_s`` (the
slowest client's forward/backward/step time: a parallel round's critical
path), ``evaluate_s`` (the server's central evaluation) and ``overhead_s`` =
seconds − compute_s − evaluate_s: what the orchestration costs. Deployed
modes also give ``clientapp_s``, the longest ClientApp process of the round
(start to exit, timed by a wrapper in front of ``flwr-clientapp`` on the
executors' PATH), and warm mode ``trainer_s``, the longest time a trainer
took over one message (its log). ``--json``
prints one JSON object per (mode, round); otherwise a table and the median
overhead over rounds 2..N per mode (round 1 pays the start-up in every mode).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from deploy.local import COLD, CONNECTION, REPO, LocalDeployment, with_option  # noqa: E402
from deploy.split_dataset import split  # noqa: E402
from fedlora.strategies import resolve  # noqa: E402

ENV = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1",
           HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
           HF_DATASETS_DISABLE_PROGRESS_BARS="1", TRANSFORMERS_VERBOSITY="error",
           RAY_USAGE_STATS_ENABLED="0", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
MODES = ("cold", "warm", "simulation")
POLL_VARIABLE = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"  # the executor's wait between asks


def _timed(code: str, repeats: int = 3) -> float:
    """Best of ``repeats`` wall times of ``code`` in a fresh interpreter (the
    least disturbed by whatever else runs on the machine)."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, env=ENV, cwd=REPO)
        times.append(time.perf_counter() - started)
    return min(times)


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


CLIENTAPP_TIMER = """#!/bin/sh
# bench_round_cost.py: Flower's flwr-clientapp, its wall time appended to a log
started=$(date +%s.%N)
"{real}" "$@"
code=$?
echo "$started $(date +%s.%N)" >> "{log}"
exit $code
"""


def _timed_clientapps(dep: LocalDeployment) -> Path:
    """Put a timer in front of ``flwr-clientapp`` on the executors' PATH (the
    executor finds the command there); returns its log."""
    shim = dep.root / "shim"
    shim.mkdir(parents=True, exist_ok=True)
    log = shim / "clientapp-times.log"
    timer = shim / "flwr-clientapp"
    timer.write_text(CLIENTAPP_TIMER.format(real=Path(sys.executable).parent / "flwr-clientapp",
                                            log=log))
    timer.chmod(0o755)
    dep.env["PATH"] = f"{shim}{os.pathsep}{dep.env['PATH']}"
    return log


def _per_round(values: list[float], per_round: int, rounds: int) -> list[float | None]:
    """The largest of each round's ``per_round`` consecutive values."""
    return [max(values[i * per_round:(i + 1) * per_round], default=None)
            for i in range(rounds)]


def _deployed(root: Path, keys: dict, nodes: int, cold: bool, flower_polls: bool) -> list[dict]:
    dep = LocalDeployment(root, ENV, overrides=(COLD,) if cold else ())
    clientapp_log = _timed_clientapps(dep)
    if flower_polls:  # Flower's own waits instead of the compose file's shorter ones
        for name in dep.supernodes():
            service = dep.services[name]
            service["command"] = with_option(service["command"], "--poll-interval", "3")
            executor = dep.services[dep.executor_of(name)]
            executor["environment"] = {**executor.get("environment", {}),
                                       POLL_VARIABLE: "1.0"}
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
    rows = _rows(out)
    spans = sorted(tuple(map(float, line.split()))
                   for line in clientapp_log.read_text().splitlines())
    clientapp = _per_round([end - start for start, end in spans], nodes, len(rows))
    handled = [[float(s) for s in re.findall(r"train for node \d+ in ([\d.]+) s",
                                              dep.log(trainer).read_text())]
               for trainer in filter(None, map(dep.trainer_of, dep.supernodes()[:nodes]))]
    trainer = [max((h[i] for h in handled if i < len(h)), default=None)
               for i in range(len(rows))]
    return [{**row, "clientapp_s": c, "trainer_s": t}
            for row, c, t in zip(rows, clientapp, trainer)]


def _simulated(root: Path, keys: dict) -> list[dict]:
    out = root / "run"
    command = [sys.executable, "-m", "fedlora", "simulate", "--out", str(out), "--set",
               *(f"{k}={json.dumps(v)}" for k, v in keys.items())]
    subprocess.run(command, check=True, env=ENV, cwd=REPO, stdout=subprocess.DEVNULL)
    return _rows(out)


def _record(mode: str, nodes: int, polls: str, row: dict) -> dict:
    compute = row.get("compute_max_s") or 0.0
    evaluation = row.get("evaluate_s") or 0.0
    record = {"mode": mode, "nodes": nodes, "polls": polls, "round": row["round"],
              "seconds": round(row["seconds"], 3), "compute_s": round(compute, 3),
              "evaluate_s": round(evaluation, 3),
              "overhead_s": round(row["seconds"] - compute - evaluation, 3),
              "clients": row["clients"], "rejected": row["rejected"]}
    for key in ("clientapp_s", "trainer_s"):  # deployed modes
        if row.get(key) is not None:
            record[key] = round(row[key], 3)
    return record


def median_overhead(records: list[dict]) -> float | None:
    """The median ``overhead_s`` over rounds 2..N."""
    later = [r["overhead_s"] for r in records if r["round"] >= 2]
    return statistics.median(later) if later else None


def _parse_modes(text: str) -> list[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    unknown = sorted(set(modes) - set(MODES))
    if unknown or not modes:
        raise SystemExit(f"bench_round_cost.py: error: --modes {text!r}: choose from "
                         f"{', '.join(MODES)}")
    return modes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", type=Path)
    parser.add_argument("--modes", default=",".join(MODES), type=_parse_modes,
                        help="comma list of cold, warm, simulation (default: all three)")
    parser.add_argument("--nodes", type=int, default=3, choices=(1, 2, 3),
                        help="nodes of docker-compose.yml to start")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--local-steps", type=int, default=5)
    parser.add_argument("--json", action="store_true",
                        help="one JSON object per (mode, round) on stdout")
    parser.add_argument("--flower-polls", action="store_true",
                        help="deployed modes with Flower's own waits (SuperNode 3 s, "
                             "executor 1 s) instead of the compose file's (0.2 s, 0.1 s)")
    args = parser.parse_args()
    nodes = args.nodes
    keys = {"dataset": str(args.dataset.resolve()), "num-clients": nodes,
            "clients-per-round": nodes, "rounds": args.rounds, "partition": "iid",
            "local-steps": args.local_steps, "max-seq-len": 64, "eval-examples": 200}

    results: dict[str, list[dict]] = {}
    loads = [f"{os.getloadavg()[0]:.1f}"]
    for mode in args.modes:
        with tempfile.TemporaryDirectory(prefix=f"fedlora-bench-{mode}-") as tmp:
            rows = (_simulated(Path(tmp), keys) if mode == "simulation"
                    else _deployed(Path(tmp), keys, nodes, mode == "cold", args.flower_polls))
        polls = ("-" if mode == "simulation" else "flower" if args.flower_polls
                 else "compose")
        results[mode] = [_record(mode, nodes, polls, row) for row in rows]
        loads.append(f"{os.getloadavg()[0]:.1f}")
        if args.json:
            for record in results[mode]:
                print(json.dumps(record), flush=True)
    if args.json:
        return

    forwarder = _timed("import client.app")
    training_stack = _timed("import client.app, fedlora.node.client_loop")
    print(f"fresh interpreter (best of 3): import client.app (the warm ClientApp) "
          f"{forwarder:.2f}s; with fedlora.node.client_loop (the cold one) {training_stack:.2f}s")
    print(f"1-min load average: {' → '.join(loads)} (before, then after each mode; "
          f"{os.cpu_count()} CPUs)")
    print(f"{nodes} nodes, {nodes} per round, local-steps={args.local_steps}, max-seq-len 64, "
          "central evaluation on 200 examples; polls: "
          f"{'Flower' if args.flower_polls else 'the compose file'}'s")
    modes = list(results)
    print("| round | " + " | ".join(f"{m} s | {m} compute_s | {m} overhead_s"
                                     for m in modes) + " |")
    print("|---|" + "---|---|---|" * len(modes))
    for i in range(args.rounds):
        cells = []
        for mode in modes:
            r = results[mode][i] if i < len(results[mode]) else None
            cells.append(f"{r['seconds']:.1f} | {r['compute_s']:.1f} | {r['overhead_s']:.1f}"
                         if r else "– | – | –")
        print(f"| {i + 1} | " + " | ".join(cells) + " |")
    for mode in modes:
        median = median_overhead(results[mode])
        if median is None:
            continue
        parts = [f"{key} {statistics.median(values):.2f}s" for key in ("clientapp_s",
                                                                         "trainer_s")
                 if (values := [r[key] for r in results[mode] if r["round"] >= 2 and key in r])]
        print(f"{mode}: median overhead over rounds 2..{args.rounds}: {median:.2f}s"
              + (f" (medians: {', '.join(parts)})" if parts else ""))


if __name__ == "__main__":
    main()
