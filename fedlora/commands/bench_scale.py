"""``fedlora bench-scale``: what orchestrating K virtual clients costs, next to
the stock Flower pattern, in one invocation.

Every simulation runs through the real path (``fedlora.commands.simulation.simulate``:
Flower's simulation engine on Ray), each in its own child process so Ray
starts fresh and memory is measured per run. For each K (10, 100, 500 by
default) the project's ClientApp runs with the benchmark's default work; then,
at the largest K and with the small work (``SMALL_WORK``: 1 example of 32
tokens per step, where orchestration dominates as it does on a GPU), the
project's ClientApp and the stock pattern run side by side (``--no-stock``
skips that pair):

``fedlora``
    the project's ClientApp: the base model is built once per Ray worker, the
    tokenised partitions are cached, each message only overwrites the adapter.
``stock``
    the pattern of Flower's own examples: every message loads the model with
    ``from_pretrained``, wraps it with PEFT, takes its partition of the raw
    data (whose partitioner is kept per process, like the examples' global
    ``FederatedDataset``) and tokenises it; then the same local training.

Every client does the same fixed local work (``local-steps`` optimiser steps
of ``batch-size`` examples) in every round, and all K clients train in every
round. ``--cohort-size 1,16,64`` runs every K once per cohort size
(``cohort-size``: clients one message carries; rows say ``cohort_size``),
and ``--work small`` gives those rows the small work. One JSON object per run
(or run pair) is printed (``work``: default or small; definitions in
BENCHMARKS.md), then one with the floors of issue #16 that these rows can
judge (``FLOORS``: value, limit, whether it holds; read from the rows of
cohort size 1, today's path, except the one every row has):

* ``wall_s``: the whole run in the child: data and model loading, Ray start,
  all rounds, central evaluation, results written.
* ``compute_s``: Σ over client updates of the forward/backward/step time
  measured inside the clients (``TrainResult.compute_seconds``).
* ``workers``: Ray actors training concurrently (⌊CPUs / client-cpus⌋, and
  at most ⌊GPUs / client-gpus⌋ when ``client-gpus`` > 0).
* ``efficiency = compute_s / (workers × wall_s)``: the share of the workers'
  time spent in local compute (1 is perfect).
* ``startup_s``: ``wall_s`` minus the rounds' time (data and model loading,
  Ray start, the workers' warm-up, results written); ``rounds_efficiency``
  is ``efficiency`` over the rounds alone (a local Ray's workers are warm
  before round 1, ``fedlora.commands.warmup``; on a cluster the first round
  still includes their warm-up). Its parts: ``ray_ready_s`` (until Ray is
  up), ``rounds_start_s`` (until the round loop starts: the driver's own
  preparation done and a local Ray's workers warm) and ``end_s`` (after the
  last round: central evaluation, results, Flower and Ray stopped);
  ``first_round_s`` is round 1's time.
* ``overhead_ms_per_client = (wall_s − compute_s / workers) / updates``: the
  wall-clock time beyond perfectly parallel compute, per client update.
* ``clients_per_s = updates / rounds_s``: client updates finished per
  second of the rounds (``rounds_s`` is the rounds' time, without startup).
* ``aggregate_s``: Σ over rounds of the server's aggregation time;
  ``server_ms_per_update`` is it per client update, in milliseconds.
* ``peak_rss_mb``: the peak of the summed RSS of the child process and all
  its descendants (Ray's GCS, raylet and workers), sampled every 0.5 s.
* ``cpu_s_driver``, ``cpu_s_workers``, ``cpu_s_ray``: CPU seconds (user and
  system) of the child, of the Ray workers and of Ray's other processes,
  each as last sampled; ``cpu_busy`` is their sum over (CPUs × ``wall_s``):
  how busy the machine was (above 0.9, the run is short of CPU, and every
  non-compute CPU-second is taken from the clients).
* ``gpu_mem_mb_per_worker``, only when a GPU was seen (through NVML,
  ``fedlora.runtime.gpu_memory``): the largest peak GPU memory of one process of the
  tree other than the child itself, i.e. of one Ray worker (CUDA context,
  weights and PyTorch's cached pool: what ``nvidia-smi`` lists), sampled with
  the RSS; ``gpu_mem_mb_driver`` is the child's own (the server's central
  evaluation), ``gpu_mem_mb_used`` the peak device-wide memory in use above
  what was in use before the run. The stock run's are ``stock_…``.
* ``speedup_vs_stock = stock wall_s / fedlora wall_s``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedlora.core.config import ConfigError, RunConfig, cached_by, parse_set_option
from fedlora.core.fields import Round
from fedlora.strategies import resolve

DEFAULT_CLIENTS = (10, 100, 500)
RSS_SAMPLE_S = 0.5
# The fixed local work and the federation shape; --set overrides any of them.
BENCH_KEYS = {"partition": "iid", "local-steps": 1, "batch-size": 8, "max-seq-len": 64,
              "rounds": 2, "eval-every": 1000, "eval-examples": 64, "strategy": "fedavg"}

# The small work: where orchestration dominates, as it does on a GPU; the stock
# comparison runs at the largest K with it.
SMALL_WORK = {"batch-size": 1, "max-seq-len": 32}
# The floors of issue #16: (name, work, the K it reads, value, limit, at most?);
# work None: every row.
FLOORS = (
    ("startup_s at every K", None, (), lambda row: row["startup_s"], 8.0, True),
    ("efficiency at 100 clients", "default", (100,), lambda row: row["efficiency"], 0.85,
     False),
    ("overhead_ms_per_client at 500 clients", "default", (500,),
     lambda row: row["overhead_ms_per_client"], 20.0, True),
    ("peak_rss_mb at 500 / at 10", "default", (500, 10),
     lambda big, small: big["peak_rss_mb"] / small["peak_rss_mb"], 1.5, True),
    ("speedup_vs_stock at 500 clients, small work", "small", (500,),
     lambda row: row["speedup_vs_stock"], 3.0, False),
)

stock_app = ClientApp()


@cached_by("dataset", "text-column", "label-column", "seed", "num-clients", "partition",
           "dirichlet-alpha", "labels-per-client")
def _raw_partitioner(config: RunConfig):
    """The raw (untokenised) train split partitioned as ``fedlora.learning.features``
    partitions the tokenised one (same shuffle, same partitioner seed; for a
    Dirichlet split that needed redraws the two differ, hence the benchmark's
    IID default), kept per process like a Flower example's global
    ``FederatedDataset``."""
    from fedlora.learning.data import make_partitioner
    from fedlora.learning.features import splits_for

    splits = splits_for(config)
    train = splits.train.shuffle(seed=config.seed).flatten_indices()
    partitioner = make_partitioner(config, len(train), config.seed, splits.partition_by)
    partitioner.dataset = train
    return partitioner


@stock_app.train()
def _stock_train(message: Message, context: Context) -> Message:
    """Model from disk and partition tokenised for this message alone."""
    from fedlora.learning.features import encode, splits_for
    from fedlora.learning.models import ModelSpec, build_lora_model
    from fedlora.node.client_loop import local_update
    from fedlora.node.session import open_session
    from fedlora.strategies import from_message
    from fedlora.wire.messages import Request

    request = Request.from_message(message)
    config = from_message(request.run_config())
    label_names = splits_for(config).label_names
    model = build_lora_model(ModelSpec.from_config(config, label_names, request.task.rank))
    raw = _raw_partitioner(config).load_partition(request.task.partition_id)
    data = encode(config, model, raw, "partition")
    return local_update(message, context, open_session(message, context, model, data))


# ---------------------------------------------------------------- child process
def run_child(mode: str, overrides: dict, out_dir: str) -> dict:
    """One simulation in this process; returns its timings (printed as JSON)."""
    started = time.perf_counter()
    from fedlora.commands.prepare import preflight
    from fedlora.commands.simulation import simulate

    config = resolve({**overrides, "out-dir": out_dir})
    phases: dict[str, float] = {}
    workers = simulate(config, client_app=stock_app if mode == "stock" else None,
                       prepare=functools.partial(preflight, config), phases=phases)
    wall = time.perf_counter() - started
    rounds = [json.loads(line) for line in
              (Path(out_dir) / "metrics.jsonl").read_text().splitlines() if line]
    return {"wall_s": wall, "workers": workers,
            "ray_ready_s": phases["ray_ready"] - started,
            "rounds_start_s": phases["rounds_start"] - started,
            "compute_s": sum(r[Round.COMPUTE_S] for r in rounds),
            "rounds_s": sum(r[Round.SECONDS] for r in rounds),
            "first_round_s": rounds[0][Round.SECONDS],
            "aggregate_s": sum(r.get(Round.AGGREGATE_S) or 0.0 for r in rounds),
            "updates": sum(r[Round.CLIENTS] for r in rounds),
            "rejected": sum(r[Round.REJECTED] for r in rounds)}


# --------------------------------------------------------------- parent process
class TreeRss:
    """Peak summed RSS of a process and its descendants, sampled in a thread;
    the CPU time each of them had used when last seen (``cpu_fields``); and
    (``gpu``) the peak GPU memory of each of them where there is a GPU."""

    def __init__(self, pid: int) -> None:
        import psutil

        from fedlora.runtime.gpu_memory import GpuMemory

        self._root = psutil.Process(pid)
        self._done = threading.Event()
        self.peak_bytes = 0
        self._cpu: dict[int, tuple[str, float]] = {}  # pid: (role, CPU seconds)
        self.gpu = GpuMemory()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        import psutil

        while not self._done.is_set():
            total = 0
            try:
                processes = [self._root, *self._root.children(recursive=True)]
            except psutil.Error:
                processes = []
            for process in processes:
                try:
                    total += process.memory_info().rss
                    times = process.cpu_times()
                    role = self._cpu.get(process.pid, (None,))[0] or self._role(process)
                    self._cpu[process.pid] = (role, times.user + times.system)
                except psutil.Error:
                    pass  # exited between listing and reading
            self.peak_bytes = max(self.peak_bytes, total)
            self.gpu.sample(process.pid for process in processes)
            self._done.wait(RSS_SAMPLE_S)

    def stop(self) -> float:
        self._done.set()
        self._thread.join()
        self.gpu.close()
        return self.peak_bytes / 2**20

    def _role(self, process) -> str:
        """driver (the child), worker (a Ray worker: Flower's actors) or ray
        (GCS, raylet and Ray's helper processes)."""
        if process.pid == self._root.pid:
            return "driver"
        command = " ".join(process.cmdline())
        return "worker" if "default_worker.py" in command or command.startswith("ray::") \
            else "ray"

    def cpu_fields(self) -> dict:
        """``cpu_s_driver``, ``cpu_s_workers``, ``cpu_s_ray``: CPU seconds by
        role, each process as last sampled (up to ``RSS_SAMPLE_S`` of a
        process's last CPU is missed when it exits between samples)."""
        totals = {"driver": 0.0, "worker": 0.0, "ray": 0.0}
        for role, seconds in self._cpu.values():
            totals[role] += seconds
        return {"cpu_s_driver": totals["driver"], "cpu_s_workers": totals["worker"],
                "cpu_s_ray": totals["ray"]}

    def gpu_fields(self) -> dict:
        """``gpu_mem_mb_*`` (see the module docstring); empty without a GPU."""
        if not self.gpu.available:
            return {}
        driver = self.gpu.peak_by_pid.get(self._root.pid)
        return {"gpu_mem_mb_per_worker": self.gpu.per_process_mb(exclude=[self._root.pid]),
                "gpu_mem_mb_driver": None if driver is None else driver / 2**20,
                "gpu_mem_mb_used": self.gpu.used_mb()}


def measure(mode: str, overrides: dict, work_dir: Path, work: str = "default",
            tag: str = "") -> dict:
    """Run one child simulation and measure it from outside (its run
    directory named by mode, K, work, cohort size and ``tag``)."""
    out_dir = work_dir / f"{mode}{tag}-{overrides['num-clients']}"
    if work != "default":
        out_dir = out_dir.with_name(f"{out_dir.name}-{work}")
    if overrides.get("cohort-size", 1) != 1:
        out_dir = out_dir.with_name(f"{out_dir.name}-cohort-{overrides['cohort-size']}")
    command = [sys.executable, "-m", "fedlora", "bench-scale", "--child", mode,
               "--out", str(out_dir), "--overrides", json.dumps(overrides)]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    rss = TreeRss(child.pid)
    try:
        stdout, _ = child.communicate()
    finally:
        peak = rss.stop()
        if child.poll() is None:
            child.kill()
    if child.returncode != 0:
        raise ConfigError(f"the {mode} run with {overrides['num-clients']} clients failed "
                          f"(exit {child.returncode}); its output is above")
    result = json.loads(stdout.strip().splitlines()[-1])
    result["peak_rss_mb"] = peak
    result.update(rss.cpu_fields())
    result.update(rss.gpu_fields())
    return result


def _mb(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def summarise(clients: int, rounds: int, ours: dict, stock: dict | None,
              work: str = "default", cohort: int = 1) -> dict:
    workers, wall, compute = ours["workers"], ours["wall_s"], ours["compute_s"]
    row = {"clients": clients, "work": work, "cohort_size": cohort, "rounds": rounds,
           "updates": ours["updates"],
           "workers": workers, "wall_s": round(wall, 2), "compute_s": round(compute, 2),
           "efficiency": round(compute / (workers * wall), 3),
           "startup_s": round(wall - ours["rounds_s"], 2),
           "ray_ready_s": round(ours["ray_ready_s"], 2),
           "rounds_start_s": round(ours["rounds_start_s"], 2),
           "first_round_s": round(ours["first_round_s"], 2),
           "end_s": round(wall - ours["rounds_start_s"] - ours["rounds_s"], 2),
           "rounds_efficiency": round(compute / (workers * ours["rounds_s"]), 3),
           "overhead_ms_per_client": round(
               1000 * (wall - compute / workers) / max(ours["updates"], 1), 1),
           "clients_per_s": round(ours["updates"] / ours["rounds_s"], 2)
           if ours["rounds_s"] > 0 else None,
           "aggregate_s": round(ours["aggregate_s"], 3),
           "server_ms_per_update": round(1000 * ours["aggregate_s"] / max(ours["updates"], 1),
                                         2),
           "peak_rss_mb": round(ours["peak_rss_mb"], 1)}
    if "cpu_s_driver" in ours:
        cpu = {key: round(ours[key], 1)
               for key in ("cpu_s_driver", "cpu_s_workers", "cpu_s_ray")}
        row.update(cpu, cpu_busy=round(sum(cpu.values()) / (os.cpu_count() * wall), 3))
    gpu_keys = ("gpu_mem_mb_per_worker", "gpu_mem_mb_driver", "gpu_mem_mb_used")
    row.update({key: _mb(ours[key]) for key in gpu_keys if key in ours})
    if stock is not None:
        row.update({"stock_wall_s": round(stock["wall_s"], 2),
                    "stock_compute_s": round(stock["compute_s"], 2),
                    "stock_clients_per_s": round(stock["updates"] / stock["rounds_s"], 2)
                    if stock.get("rounds_s") else None,
                    "stock_peak_rss_mb": round(stock["peak_rss_mb"], 1),
                    "speedup_vs_stock": round(stock["wall_s"] / wall, 2)})
        row.update({f"stock_{key}": _mb(stock[key]) for key in gpu_keys if key in stock})
    return row


def floors(rows: list[dict]) -> list[dict]:
    """Each floor of ``FLOORS`` these rows can judge: its value and whether
    it holds."""
    by = {(row["work"], row["clients"]): row for row in rows
          if row.get("cohort_size", 1) == 1}  # rows from before cohorts have none
    judged = []
    for name, work, clients, value_of, limit, at_most in FLOORS:
        if work is None:
            value = max(value_of(row) for row in rows)
        elif all((work, k) in by for k in clients):
            value = value_of(*(by[(work, k)] for k in clients))
        else:
            continue
        judged.append({"floor": name, "value": round(value, 3), "limit": limit,
                       "holds": value <= limit if at_most else value >= limit})
    return judged


def cohort_sizes(text: str) -> list[int]:
    """``--cohort-size``: positive integers, comma-separated."""
    try:
        sizes = [int(item) for item in text.split(",")]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: needs cohort sizes >= 1, "
                                         "comma-separated (1,16,64)")
    return sizes


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedlora bench-scale",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=list(DEFAULT_CLIENTS),
                        help="numbers of virtual clients K (default: 10 100 500)")
    parser.add_argument("--set", nargs="+", metavar="KEY=VALUE", action="extend",
                        help=f"run-config keys (benchmark defaults: {BENCH_KEYS})")
    parser.add_argument("--cohort-size", type=cohort_sizes, default=[1], metavar="C[,C...]",
                        help="cohort sizes, each run at every K (default: 1, one client "
                             "a message)")
    parser.add_argument("--work", choices=("default", "small"), default="default",
                        help=f"the per-K rows' work (small: {SMALL_WORK})")
    parser.add_argument("--no-stock", action="store_true",
                        help=f"skip the stock comparison (at the largest K, {SMALL_WORK})")
    parser.add_argument("--work-dir", help="keep the runs here (default: a temporary dir)")
    parser.add_argument("--child", choices=("fedlora", "stock"), help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--overrides", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.child:
        print(json.dumps(run_child(args.child, json.loads(args.overrides), args.out)),
              flush=True)
        return 0
    from fedlora.commands.prepare import absolute_paths

    base = dict(BENCH_KEYS)
    for item in args.set or []:
        key, value = parse_set_option(item)
        base[key] = value
    base = absolute_paths(base)
    work = {**base, **(SMALL_WORK if args.work == "small" else {})}
    for clients in args.clients:  # every setting checked before anything runs
        for cohort in args.cohort_size:
            resolve({**work, "num-clients": clients, "clients-per-round": clients,
                     "cohort-size": cohort})
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        work_dir = Path(args.work_dir or tmp)
        for clients in args.clients:
            for cohort in args.cohort_size:
                overrides = {**work, "num-clients": clients, "clients-per-round": clients,
                             "cohort-size": cohort}
                ours = measure("fedlora", overrides, work_dir, args.work)
                rows.append(summarise(clients, resolve(overrides)["rounds"], ours, None,
                                      args.work, cohort))
                print(json.dumps(rows[-1]), flush=True)
        if not args.no_stock:  # against stock where orchestration dominates
            clients = max(args.clients)
            small = {**base, **SMALL_WORK, "num-clients": clients,
                     "clients-per-round": clients, "cohort-size": 1}  # stock's is 1
            # its own run beside the stock one (a per-K row may be the same setting)
            ours = measure("fedlora", small, work_dir, "small", tag="-vs-stock")
            stock = measure("stock", small, work_dir, "small")
            rows.append(summarise(clients, resolve(small)["rounds"], ours, stock, "small"))
            print(json.dumps(rows[-1]), flush=True)
    print(json.dumps({"floors": floors(rows)}), flush=True)
    return 0
