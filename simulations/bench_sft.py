"""Instruction tuning's reference points and client cost, for the federated
runs of ``simulations/sft_agnews.toml`` (SmolLM2-135M-Instruct, AG News as
chat instructions).

    python simulations/bench_sft.py zero-shot [--seeds 1 2 3]
    python simulations/bench_sft.py ceiling [--seeds 1 2 3]
    python simulations/bench_sft.py cost [--repeats 3]

``zero-shot`` prints, for each seed, the base model's metrics on that seed's
run's evaluation sample (the LoRA adapter starts at B = 0, so this is the
base model itself). ``ceiling`` prints a **centralised ceiling**: one LoRA adapter
trained in one process on as many examples as a federated run's clients see
in all (rounds × clients-per-round × local-steps × batch-size), drawn from the
whole train split without label skew, in steps of the same batch size, with
the same optimiser, learning rate and schedule; evaluated the same way.

``cost`` times one client's round (``fedlora.node.client_loop.handle_train``
on a real training message, as ``bench_dp_cost.py`` does) with the base in
float32 or bfloat16 and gradient checkpointing off or on; the settings take
turns in every repeat, so they share the machine's load. One JSON line per
setting: median seconds per client round and per optimiser step.

``--set KEY=VALUE`` changes the TOML's ``[base]`` keys for both.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from bench_dp_cost import client_context, training_message

from fedlora.commands.prepare import absolute_paths, preflight
from fedlora.core.config import load_toml, parse_set_option
from fedlora.strategies import resolve

WORKLOAD = Path(__file__).with_name("sft_agnews.toml")
COST_SETTINGS = {"float32": {},
                 "float32+checkpointing": {"gradient-checkpointing": True},
                 "bfloat16": {"model-dtype": "bfloat16"},
                 "bfloat16+checkpointing": {"model-dtype": "bfloat16",
                                            "gradient-checkpointing": True}}


def base_keys(overrides: list[str]) -> dict:
    """The workload's ``[base]`` table with ``--set`` applied, paths made
    absolute relative to the TOML's folder's parent (as ``fedlora compare``
    reads them from the repository root)."""
    keys = dict(load_toml(WORKLOAD)["base"])
    for item in overrides:
        key, value = parse_set_option(item)
        keys[key] = value
    return keys


def zero_shot(keys: dict, seed: int) -> dict:
    """The base model's metrics on seed ``seed``'s evaluation sample."""
    from fedlora.learning.features import central_test_set, model_for
    from fedlora.learning.tasks import task_for

    config = resolve(absolute_paths({**keys, "seed": seed}))
    preflight(config)
    started = time.perf_counter()
    metrics = task_for(config).evaluate(model_for(config), central_test_set(config))
    return {"seed": seed, "zero_shot": metrics,
            "evaluate_s": round(time.perf_counter() - started, 1)}


def ceiling(keys: dict, seed: int) -> dict:
    """A centralised adapter trained on a federated run's number of examples."""
    from fedlora.core.adapters import set_trainable
    from fedlora.learning.features import central_test_set, encoded_splits, model_for
    from fedlora.learning.schedule import round_lr
    from fedlora.learning.tasks import task_for
    from fedlora.learning.training import train_local

    config = resolve(absolute_paths({**keys, "seed": seed}))
    preflight(config)
    task, model = task_for(config), model_for(config)
    per_round = config.clients_per_round * config.local_steps * config.batch_size
    train = encoded_splits(config).train.shuffle(seed=seed)
    params = set_trainable(model.peft, lambda kind: True)  # fedavg trains A and B
    compute = 0.0
    for server_round in range(1, config.rounds + 1):  # the rounds' rates, one optimiser each
        first = (server_round - 1) * per_round
        result = train_local(
            model, params, train.select(range(first, first + per_round)), task=task,
            epochs=1, max_steps=0, batch_size=config.batch_size,
            lr=round_lr(config, server_round), optimizer=config.optimizer,
            seed=seed * 1000 + server_round)
        compute += result.compute_seconds
    return {"seed": seed, "ceiling": task.evaluate(model, central_test_set(config)),
            "examples": per_round * config.rounds, "train_s": round(compute, 1)}


def cost(keys: dict, repeats: int) -> list[dict]:
    """Median client-round and step seconds of each precision setting."""
    from fedlora.node.client_loop import handle_train as train

    configs = {name: resolve(absolute_paths({**keys, **extra}))
               for name, extra in COST_SETTINGS.items()}
    for config in configs.values():
        preflight(config)
    train(training_message(configs["float32"], 1), client_context())  # warm-up, not timed
    rounds = {name: [] for name in configs}
    compute = {name: [] for name in configs}
    for server_round in range(1, repeats + 1):
        for name, config in configs.items():
            message = training_message(config, server_round)
            started = time.perf_counter()
            reply = train(message, client_context())
            rounds[name].append(time.perf_counter() - started)
            compute[name].append(float(reply.content.metric_records["metrics"]
                                       ["compute-seconds"]))
    steps = configs["float32"].local_steps
    plain = statistics.median(rounds["float32"])
    return [{"setting": name, "repeats": repeats, "local_steps": steps,
             "round_s": round(statistics.median(rounds[name]), 2),
             "step_s": round(statistics.median(compute[name]) / steps, 3),
             "vs_float32": round(statistics.median(rounds[name]) / plain, 3)}
            for name in configs]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("zero-shot", "ceiling", "cost"))
    parser.add_argument("--set", nargs="+", metavar="KEY=VALUE", action="extend", default=[],
                        help=f"change {WORKLOAD.name}'s [base] keys")
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--repeats", type=int, default=3, help="client rounds per setting")
    args = parser.parse_args(argv)
    keys = base_keys(args.set)
    per_seed = {"zero-shot": zero_shot, "ceiling": ceiling}.get(args.what)
    rows = ([per_seed(keys, seed) for seed in args.seeds] if per_seed
            else cost(keys, args.repeats))
    for row in rows:
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
