"""What client-level DP-SGD costs a client per round, measured side by side.

For FedAvg and FFA-LoRA, each with and without ``dp=local``, one client's
round runs through the project's client loop (``fedlora.node.client_loop.handle_train`` on a real
training message: decode, attach Opacus, the local steps, detach, encode),
``--repeats`` times. The four settings take turns in every repeat, so they
share the machine's load; the client's Flower state persists across its
rounds as in a simulation (the accountant history grows). The server's work
does not change with local DP, so this is the cost of DP per round.

Prints one JSON line per setting: median seconds per client round
(``round_s``), median forward/backward/step seconds (``compute_s``), and
``round_s`` relative to the same strategy without DP (``vs_no_dp``).

    python simulations/bench_dp_cost.py --set dataset=../shared/data/sst2
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from flwr.app import Context, Message, Metadata, RecordDict
from flwr.app.message.message import make_message

from fedlora.commands.prepare import absolute_paths, preflight
from fedlora.core.config import parse_set_option
from fedlora.strategies import resolve

# The DP benchmark's client work (simulations/dp.toml): 15 steps of batch 16.
BENCH_KEYS = {"num-clients": 5, "clients-per-round": 5, "rounds": 8, "partition": "dirichlet",
              "dirichlet-alpha": 0.5, "local-steps": 15, "batch-size": 16,
              "max-seq-len": 64, "seed": 42}
SETTINGS = {"fedavg": {"strategy": "fedavg"},
            "fedavg-dp": {"strategy": "fedavg", "dp": "local", "dp-target-epsilon": 6.0},
            "ffa": {"strategy": "ffa"},
            "ffa-dp": {"strategy": "ffa", "dp": "local", "dp-target-epsilon": 6.0}}
CLIENT = 0


def training_message(config, server_round: int) -> Message:
    """The message a server sends this client in ``server_round``."""
    from fedlora.learning.features import model_for
    from fedlora.strategies import strategy_class
    from fedlora.wire.messages import LABEL_NAMES, Request, Task

    model = model_for(config)
    strategy = strategy_class(config["strategy"])(config, model.initial_state)
    _, blob = strategy.download(model.initial_state)
    sent = {**config.to_dict(), LABEL_NAMES: list(model.spec.label_names)}
    request = Request(sent, Task(server_round, CLIENT, config["lora-rank"]), blob)
    metadata = Metadata(run_id=1, message_id=f"round-{server_round}", src_node_id=1,
                        dst_node_id=2, reply_to_message_id="", group_id=str(server_round),
                        created_at=time.time(), ttl=3600.0, message_type="train")
    return make_message(metadata=metadata, content=request.to_content())


def client_context() -> Context:
    """A fresh client: its Flower state starts empty (no DP history)."""
    return Context(run_id=1, node_id=2, node_config={"partition-id": CLIENT},
                   state=RecordDict(), run_config={})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", nargs="+", metavar="KEY=VALUE", action="extend",
                        help=f"run-config keys (defaults: {BENCH_KEYS})")
    parser.add_argument("--repeats", type=int, default=5,
                        help="client rounds per setting (at most the planned rounds)")
    args = parser.parse_args(argv)
    from fedlora.node.client_loop import handle_train as train

    base = dict(BENCH_KEYS)
    for item in args.set or []:
        key, value = parse_set_option(item)
        base[key] = value
    configs = {name: resolve(absolute_paths({**base, **keys}))
               for name, keys in SETTINGS.items()}
    planned = configs["fedavg"]["rounds"]
    if not 1 <= args.repeats <= planned:
        parser.error(f"--repeats must be in 1..{planned} (the planned rounds)")
    for config in configs.values():
        preflight(config)
    contexts = {name: client_context() for name in configs}
    train(training_message(configs["fedavg"], 1), client_context())  # warm-up, not timed
    rounds: dict[str, list[float]] = {name: [] for name in configs}
    compute: dict[str, list[float]] = {name: [] for name in configs}
    for server_round in range(1, args.repeats + 1):
        for name, config in configs.items():
            message = training_message(config, server_round)
            started = time.perf_counter()
            reply = train(message, contexts[name])
            rounds[name].append(time.perf_counter() - started)
            metrics = reply.content.metric_records["metrics"]
            if metrics.get("declined"):
                raise SystemExit(f"{name}: the client declined in round {server_round}")
            compute[name].append(float(metrics["compute-seconds"]))
    for name in configs:
        plain = statistics.median(rounds[name.removesuffix("-dp")])
        row = {"setting": name, "repeats": args.repeats,
               "round_s": round(statistics.median(rounds[name]), 3),
               "compute_s": round(statistics.median(compute[name]), 3),
               "vs_no_dp": round(statistics.median(rounds[name]) / plain, 3)}
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
