"""What a cohort's training step costs per client, three ways, in one process
(issue #29): the default model (all-MiniLM-L6-v2, LoRA r=8 + head), C
clients of AG News, each one local step of ``--batch-size`` examples of at
most ``--max-seq-len`` tokens.

    python simulations/bench_cohort_pass.py [--clients 64] [--batch-size 1] \\
        [--max-seq-len 32] [--reps 5] [--dataset ../shared/data/ag_news]

* ``sequential``: ``train_local`` per client, one after another (what
  ``cohort-pass=sequential``, and a worker at ``cohort-size=1``, run);
* ``batched``: ``train_members``, the batched multi-LoRA pass
  (``cohort-pass=batched``);
* ``central``: the limit: one adapter and one optimiser trained, in the same
  process, with the same per-step batch composition: each step one batch of
  ``batch-size`` examples from every client's partition (its first ones, where
  the clients draw theirs shuffled: the same count and kind of text).

Each rep runs the three in turn (so the machine's load falls on all three
alike); milliseconds per client are the median over reps, the first rep
(warm-up) dropped. ``batched_vs_sequential`` and ``batched_of_central``
(the batched pass's throughput as a fraction of the limit's) are ratios of
those medians. Single-threaded torch, as a Ray worker with client-cpus=1
runs. ``gflop_per_client``: the base model's forward and input-gradient
matmul work per client (2 × 2 × non-embedding parameters × tokens): what
no batching can remove on a CPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from fedlora.core.adapters import load_adapter_state, set_trainable
from fedlora.learning.cohort_pass import Member, train_members
from fedlora.learning.features import client_dataset, model_for
from fedlora.learning.tasks import task_for
from fedlora.learning.training import train_local
from fedlora.strategies import resolve

KINDS = frozenset({"lora_A", "lora_B", "head"})


def _sequential(model, task, datas, train) -> None:
    for seed, data in enumerate(datas):
        load_adapter_state(model.peft, model.initial_state)
        params = set_trainable(model.peft, lambda kind: True)
        train_local(model, params, data, task=task, seed=seed, **train)


def _batched(model, task, datas, train) -> None:
    members = [Member({n: torch.tensor(v) for n, v in model.initial_state.items()}, KINDS,
                      data, seed) for seed, data in enumerate(datas)]
    train_members(model, members, task=task, **train)


def _central(model, task, datas, train) -> None:
    """One adapter on each step's batches of all clients, concatenated."""
    from datasets import concatenate_datasets

    load_adapter_state(model.peft, model.initial_state)
    params = set_trainable(model.peft, lambda kind: True)
    rows = train["batch_size"] * train["max_steps"]
    joined = concatenate_datasets([d.select(range(min(rows, len(d)))) for d in datas])
    train_local(model, params, joined, task=task, seed=0,
                **{**train, "batch_size": train["batch_size"] * len(datas)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--max-seq-len", type=int, default=32)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--dataset", default="../shared/data/ag_news")
    args = parser.parse_args()
    config = resolve({"dataset": args.dataset, "partition": "iid", "num-clients": args.clients,
                      "clients-per-round": args.clients, "max-seq-len": args.max_seq_len})
    torch.set_num_threads(1)
    model, task = model_for(config), task_for(config)
    datas = [client_dataset(config, i) for i in range(args.clients)]
    train = {"epochs": 1, "max_steps": args.steps, "batch_size": args.batch_size,
             "lr": config.lr, "optimizer": config.optimizer}
    ways = {"sequential": _sequential, "batched": _batched, "central": _central}
    times: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(args.reps):
        for name, way in ways.items():
            started = time.perf_counter()
            way(model, task, datas, train)
            times[name].append(1000 * (time.perf_counter() - started) / args.clients)
    ms = {name: statistics.median(values[1:] or values) for name, values in times.items()}
    base = sum(p.numel() for n, p in model.peft.named_parameters()
               if "embeddings" not in n and ".lora_" not in n and "modules_to_save" not in n)
    tokens = sum(len(row["input_ids"]) for d in datas
                 for row in d.select(range(min(args.batch_size * args.steps, len(d)))))
    print(json.dumps({
        "clients": args.clients, "batch_size": args.batch_size,
        "max_seq_len": args.max_seq_len, "steps": args.steps, "reps": args.reps,
        **{f"{name}_ms_per_client": round(value, 2) for name, value in ms.items()},
        "batched_vs_sequential": round(ms["sequential"] / ms["batched"], 2),
        "batched_of_central": round(ms["central"] / ms["batched"], 2),
        "gflop_per_client": round(4 * base * tokens / args.clients / 1e9, 3),
        "torch_threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
