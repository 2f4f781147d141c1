"""pfl-research (Apple's ``pfl`` 0.6) on the workload of ``fedlora bench-scale``:
the peer of issue #29 ("A peer, side by side"). pfl reports being 7–72× faster
than other open-source FL simulators by keeping its workers lean; this runs its
own simulation API on fedlora's benchmark so that clients/s compare directly.

Run from the repository root (one JSON line per run)::

    python simulations/bench_pfl.py --clients 100 --work small
    python simulations/bench_pfl.py --clients 100 --work default
    python simulations/bench_pfl.py --clients 100 --work small --workers 1

and side by side with fedlora on the same workload, in one invocation::

    python simulations/bench_pfl.py --clients 100 500 --work small \\
        --fedlora-cohort-size 1,50 --reps 2

``--fedlora-cohort-size`` runs, after each pfl run, ``fedlora bench-scale``'s
own child (``fedlora.commands.bench_scale.measure``: the same run and
measurements as that command) once per cohort size on the same overrides,
and ends with one line per K and cohort size: the median clients/s and wall
time of each side over ``--reps`` alternations, and their ratio.

The workload is built by fedlora's own code, so only the orchestration differs:

* the model: fedlora's PEFT model for the run config (``model_for``): the
  packaged all-MiniLM-L6-v2, LoRA r=8, α=16, dropout 0.05 on PEFT's default
  modules (query, value), the classifier head trained, initialised from the
  run seed (the same initial adapter as fedlora's), in train mode (dropout on);
* the data: fedlora's partitions of AG News (``BENCH_KEYS``: IID, fedlora's
  shuffle and partitioner), tokenised once by fedlora (truncated to
  ``max-seq-len``); pfl user i holds fedlora's partition i, in memory, and
  each batch is cut to its longest example (fedlora pads each batch so);
* each client in each round: ``local-steps`` steps of ``batch-size`` examples
  with a fresh AdamW (fedlora's ``lr``, no weight decay); FedAvg weighted by
  examples (pfl's ``WeightByDatapoints`` and a central SGD of rate 1); all K
  users each round (cohort K; pfl's ``minimize_reuse`` sampler visits each
  once), for ``rounds`` rounds.

What still differs: a pfl user trains on its first batch in every round,
fedlora's client on a seeded shuffled one (the same partition, so the same
length distribution). pfl has no messages: its users' data sit in memory as
padded tensors, the model's tensors are copied in place, and the server's sum
is a plain in-process sum (no encoding, validation, exact sums or
``agg-residual``). pfl evaluates every user before and after training in its
first iteration (``iteration % evaluation_frequency == 0``), which is
switched off here because fedlora's benchmark evaluates no client.

Measured as ``fedlora bench-scale`` measures: ``wall_s`` is the whole child
run (imports, model and data, all rounds); ``rounds_s`` the sum of the
rounds' times (pfl's iterations, from a callback) and ``startup_s`` the rest;
``clients_per_s = updates / rounds_s`` (updates: pfl's count of users
trained); ``peak_rss_mb`` the peak summed RSS of the child's process tree,
sampled every 0.5 s (``fedlora.commands.bench_scale.TreeRss``); ``cpu_busy``
the tree's CPU seconds over (CPUs × ``wall_s``).

Processes: by default as many as fedlora's Ray workers (one per CPU), each
on one torch thread as fedlora's clients, in pfl's documented multi-process
mode (``torchrun``; gloo on a CPU): each process trains its share of every
cohort and the sums are all-reduced. ``--workers 1`` is pfl's single-process
simulation, on every CPU unless ``--threads`` says otherwise; on a loaded
machine its two threads ran 20× slower than one (CPU oversubscription).

Install (the ``bench-pfl`` extra, ``pip install -e '.[bench-pfl]'``).
``pfl[pytorch]`` 0.6.0 needs dp-accounting 0.5, which pins attrs < 24 and
absl-py 1.x, so installing it downgrades those two. pfl imports dp-accounting
(for its privacy accountants, unused here) and it imports with the newer attrs
and absl-py, so a shared environment can keep its versions (dm-tree unneeded)::

    python -m venv /work/venv-pfl    # from the project venv's python
    # the project venv's packages, its own .pth files (fedlora, editable) included
    echo "import site; site.addsitedir('$VIRTUAL_ENV/lib/python3.11/site-packages')" \\
        > /work/venv-pfl/lib/python3.11/site-packages/project-venv.pth
    /work/venv-pfl/bin/pip install --no-deps pfl==0.6.0 dp-accounting==0.5.1 \\
        prv-accountant==0.2.0
    /work/venv-pfl/bin/python simulations/bench_pfl.py --clients 100 --work small
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fedlora.commands import bench_scale
from fedlora.commands.bench_scale import BENCH_KEYS, SMALL_WORK, TreeRss
from fedlora.commands.prepare import absolute_paths
from fedlora.core.config import parse_set_option
from fedlora.strategies import resolve

DATASET = "../shared/data/ag_news"


def run_child(overrides: dict, threads: int) -> dict | None:
    """One pfl simulation in this process (one of ``--workers``), torch on
    ``threads`` threads; its timings (None on every process but the first)."""
    started = time.perf_counter()
    import numpy as np
    import torch
    from pfl.aggregate.base import get_num_devices_weight_name
    from pfl.aggregate.simulate import SimulatedBackend
    from pfl.aggregate.weighting import WeightByDatapoints
    from pfl.algorithm import FederatedAveraging, NNAlgorithmParams
    from pfl.callback.base import TrainingProcessCallback
    from pfl.common_types import Population
    from pfl.data.federated_dataset import FederatedDataset
    from pfl.data.sampling import get_user_sampler
    from pfl.hyperparam import NNTrainHyperParams
    from pfl.internal.ops import pytorch_ops
    from pfl.metrics import Metrics, Weighted
    from pfl.model.pytorch import PyTorchModel

    from fedlora.learning.features import client_dataset, held_out_split, model_for
    from fedlora.learning.tasks import task_for
    from fedlora.learning.tasks.labels import LABEL
    from fedlora.strategies import strategy_class

    class Classifier(torch.nn.Module):
        """fedlora's PEFT model with the two methods pfl's ``PyTorchModel`` calls."""

        def __init__(self, peft: torch.nn.Module) -> None:
            super().__init__()
            self.peft = peft

        def _loss(self, input_ids, attention_mask, labels) -> torch.Tensor:
            width = int(attention_mask.sum(1).max())  # the batch's longest example
            return self.peft(input_ids=input_ids[:, :width],
                             attention_mask=attention_mask[:, :width], labels=labels).loss

        def loss(self, *batch) -> torch.Tensor:
            self.train()
            return self._loss(*batch)

        @torch.no_grad()
        def metrics(self, *batch) -> dict:
            self.eval()
            examples = len(batch[-1])
            return {"loss": Weighted(float(self._loss(*batch)) * examples, examples)}

    class NoUserEvaluation(FederatedAveraging):
        """FedAvg without pfl's evaluation of every user around its training
        (always in the first iteration): fedlora's benchmark evaluates no client."""

        def get_next_central_contexts(self, *args, **kwargs):
            contexts, model, metrics = super().get_next_central_contexts(*args, **kwargs)
            if contexts is not None:
                contexts = tuple(dataclasses.replace(c, do_evaluation=False)
                                 for c in contexts)
            return contexts, model, metrics

    class RoundTimer(TrainingProcessCallback):
        """Each iteration's seconds and the users pfl counts as trained in it."""

        def on_train_begin(self, *, model) -> Metrics:
            self.seconds, self.updates, self._last = [], 0, time.perf_counter()
            return Metrics()

        def after_central_iteration(self, aggregate_metrics, model, *, central_iteration):
            now = time.perf_counter()
            self.seconds.append(now - self._last)
            self._last = now
            users = aggregate_metrics[get_num_devices_weight_name(Population.TRAIN)]
            self.updates += int(getattr(users, "overall_value", users))
            return False, Metrics()

    torch.set_num_threads(threads)
    config = resolve(overrides)
    np.random.seed(config.seed)  # pfl's samplers: the same draws on every process
    lora = model_for(config)
    task = task_for(config)
    evaluates_clients = strategy_class(config.strategy).evaluation_prefix(config)
    users = {}
    for user in range(config.num_clients):  # as fedlora.node.session opens a client
        data = client_dataset(config, user)
        train = held_out_split(config, data)[0] if evaluates_clients else data
        batch = task.collate(train.to_list(), lora.pad_token_id)
        users[user] = (batch["input_ids"], batch["attention_mask"], batch[LABEL])
    federated = FederatedDataset.from_slices(
        users, get_user_sampler("minimize_reuse", list(range(config.num_clients))))

    def local_optimizer(params, lr: float) -> torch.optim.Optimizer:
        """fedlora's: a fresh one per client, on the trainable tensors."""
        params = [p for p in params if p.requires_grad]
        return (torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
                if config.optimizer == "adamw" else torch.optim.SGD(params, lr=lr))

    module = Classifier(lora.peft)
    model = PyTorchModel(module, local_optimizer_create=local_optimizer,
                         central_optimizer=torch.optim.SGD(
                             [p for p in module.parameters() if p.requires_grad], lr=1.0))
    steps = config.local_steps or None
    train_params = NNTrainHyperParams(
        local_batch_size=config.batch_size, local_learning_rate=config.lr,
        local_num_steps=steps, local_num_epochs=None if steps else config.local_epochs)
    algorithm_params = NNAlgorithmParams(
        central_num_iterations=config.rounds, evaluation_frequency=config.rounds,
        train_cohort_size=config.clients_per_round, val_cohort_size=None)
    timer = RoundTimer()
    NoUserEvaluation().run(
        algorithm_params, SimulatedBackend(federated, federated, [WeightByDatapoints()]),
        model, train_params, callbacks=[timer], send_metrics_to_platform=False)
    wall = time.perf_counter() - started
    distributed = pytorch_ops.distributed
    if distributed.global_rank != 0:
        return None
    return {"workers": distributed.world_size, "threads": torch.get_num_threads(),
            "updates": timer.updates, "wall_s": wall, "rounds_s": sum(timer.seconds),
            "first_round_s": timer.seconds[0]}


def measure(overrides: dict, workers: int, threads: int) -> dict:
    """Run one simulation in a child process (``torchrun`` for several
    workers) and measure its process tree from outside."""
    command = [os.path.abspath(__file__), "--child", json.dumps(overrides),
               f"--threads={threads}"]
    if workers > 1:
        command = ["-m", "torch.distributed.run", "--standalone", "--nnodes=1",
                   f"--nproc-per-node={workers}", *command]
    child = subprocess.Popen([sys.executable, *command], stdout=subprocess.PIPE, text=True)
    tree = TreeRss(child.pid)
    try:
        stdout, _ = child.communicate()
    finally:
        peak = tree.stop()
    if child.returncode != 0:
        sys.exit(f"the pfl run with {overrides['num-clients']} clients failed "
                 f"(exit {child.returncode}); its output is above")
    result = json.loads(stdout.strip().splitlines()[-1])
    cpu = sum(tree.cpu_fields().values())
    return {**result, "peak_rss_mb": peak, "cpu_busy": cpu / (os.cpu_count() * result["wall_s"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[100],
                        help="numbers of clients K, all trained every round (default: 100)")
    parser.add_argument("--work", choices=("default", "small"), default="default",
                        help=f"fedlora bench-scale's work (small: {SMALL_WORK})")
    parser.add_argument("--workers", type=int, default=os.cpu_count(),
                        help="pfl processes, under torchrun when more than 1 (default: the "
                             "CPUs, as many as fedlora's Ray workers of 1 CPU)")
    parser.add_argument("--threads", type=int,
                        help="torch threads per process (default: CPUs / workers; fedlora "
                             "gives each client client-cpus = 1)")
    parser.add_argument("--set", nargs="+", metavar="KEY=VALUE", action="extend",
                        help=f"run-config keys (defaults: {BENCH_KEYS}, dataset={DATASET})")
    parser.add_argument("--fedlora-cohort-size", type=bench_scale.cohort_sizes, default=[],
                        metavar="C[,C...]", help="also run fedlora bench-scale's child at "
                        "these cohort sizes after each pfl run, and compare")
    parser.add_argument("--reps", type=int, default=1,
                        help="alternations of the runs (default: 1)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.reps < 1:
        parser.error(f"--reps: {args.reps}; needs at least 1")
    if args.child:
        result = run_child(json.loads(args.child), args.threads)
        if result is not None:
            print(json.dumps(result), flush=True)
        return
    base = {**BENCH_KEYS, "dataset": DATASET, **(SMALL_WORK if args.work == "small" else {})}
    for item in args.set or []:
        key, value = parse_set_option(item)
        base[key] = value
    base = absolute_paths(base)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-pfl-") as work_dir:
        for rep in range(args.reps):
            for clients in args.clients:
                overrides = {**base, "num-clients": clients, "clients-per-round": clients}
                if resolve(overrides).strategy != "fedavg":
                    parser.error("--set strategy: pfl runs FedAvg here (fedavg only)")
                rows.append(pfl_row(overrides, args, rep))
                print(json.dumps(rows[-1]), flush=True)
                for cohort in args.fedlora_cohort_size:
                    rows.append(fedlora_row({**overrides, "cohort-size": cohort},
                                            args.work, rep, Path(work_dir)))
                    print(json.dumps(rows[-1]), flush=True)
    for line in side_by_side(rows):
        print(json.dumps(line), flush=True)


def pfl_row(overrides: dict, args: argparse.Namespace, rep: int) -> dict:
    run = measure(overrides, args.workers, args.threads or max(1, os.cpu_count() // args.workers))
    return {"peer": "pfl", "rep": rep, "clients": overrides["num-clients"], "work": args.work,
            "rounds": resolve(overrides).rounds, "workers": run["workers"],
            "threads": run["threads"], "updates": run["updates"],
            "wall_s": round(run["wall_s"], 2),
            "startup_s": round(run["wall_s"] - run["rounds_s"], 2),
            "rounds_s": round(run["rounds_s"], 2),
            "first_round_s": round(run["first_round_s"], 2),
            "clients_per_s": round(run["updates"] / run["rounds_s"], 2),
            "peak_rss_mb": round(run["peak_rss_mb"], 1),
            "cpu_busy": round(run["cpu_busy"], 3)}


def fedlora_row(overrides: dict, work: str, rep: int, work_dir: Path) -> dict:
    """``fedlora bench-scale``'s row for one run of these overrides."""
    run = bench_scale.measure("fedlora", overrides, work_dir / f"rep-{rep}", work)
    row = bench_scale.summarise(overrides["num-clients"], resolve(overrides).rounds, run, None,
                                work, overrides["cohort-size"])
    return {"peer": "fedlora", "rep": rep, **row}


def side_by_side(rows: list[dict]) -> list[dict]:
    """Per K and fedlora cohort size: each side's median clients/s and wall
    time over the reps, and fedlora's clients/s over pfl's."""
    def median(peer: str, clients: int, key: str, cohort: int | None = None) -> float:
        return round(statistics.median(row[key] for row in rows if row["peer"] == peer
                                       and row["clients"] == clients
                                       and row.get("cohort_size") == cohort), 2)

    lines = []
    for clients, cohort in sorted({(row["clients"], row["cohort_size"]) for row in rows
                                   if row["peer"] == "fedlora"}):
        pfl = median("pfl", clients, "clients_per_s")
        ours = median("fedlora", clients, "clients_per_s", cohort)
        lines.append({"side_by_side": clients, "cohort_size": cohort,
                      "reps": sum(row["peer"] == "pfl" and row["clients"] == clients
                                  for row in rows),
                      "pfl_clients_per_s": pfl, "fedlora_clients_per_s": ours,
                      "fedlora_over_pfl": round(ours / pfl, 2),
                      "pfl_wall_s": median("pfl", clients, "wall_s"),
                      "fedlora_wall_s": median("fedlora", clients, "wall_s", cohort)})
    return lines

if __name__ == "__main__":
    main()
