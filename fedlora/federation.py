"""The server side of a run: config → strategy → rounds → evaluation → results.

``run_federation`` is the whole of it; ``server/app.py`` calls it with the
run config Flower hands over (``flwr run``), and ``fedlora simulate`` with
the config it resolved.
"""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path

from flwr.app import ConfigRecord
from flwr.serverapp import Grid

from fedlora.adapters import load_adapter_state
from fedlora.basedelta import BASE_DELTA_FILE, save_base_delta, write_base
from fedlora.config import KEYS, RunConfig
from fedlora.features import central_test_set, model_for, partitioner_for
from fedlora.messages import LABEL_NAMES
from fedlora.replies import replies_as_they_arrive
from fedlora.results import RunWriter, prepare_out_dir
from fedlora.strategies import strategy_class
from fedlora.strategies.base import from_arrayrecord, to_arrayrecord
from fedlora.training import evaluate

NO_LIMIT_S = float("inf")  # round-timeout 0: wait until each reply (or the SuperLink's error)


def progress_line(record: dict, rounds: int) -> str:
    """The one line printed per round."""
    parts = [f"round {record['round']}/{rounds}",
             f"acc {record['accuracy']:.4f} loss {record['loss']:.4f}"
             if record["accuracy"] is not None else "acc -",
             f"train_loss {record['train_loss']:.4f}", f"clients {record['clients']}"]
    parts += [f"{key} {record[key]:.4f}" for key in ("personal_accuracy", "fed_accuracy")
              if record.get(key) is not None]
    parts += [f"{key} {record[key]}" for key in ("rejected", "declined", "missing")
              if record.get(key)]
    if record["epsilon"] is not None:
        parts.append(f"eps {record['epsilon']:.3f}")
    parts += [f"up {record['uplink_bytes'] / 1e6:.2f}MB",
              f"down {record['downlink_bytes'] / 1e6:.2f}MB", f"{record['seconds']:.1f}s"]
    return "  ".join(parts)


def run_federation(grid: Grid, config: RunConfig, in_flight: int = 0) -> dict:
    """Run all rounds and write the outputs contract; returns the summary.
    ``in_flight`` caps the messages outstanding at once (0 = a round's all at
    once; see ``fedlora.replies``)."""
    out_dir = prepare_out_dir(config["out-dir"] or
                              Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S"))
    writer = RunWriter(out_dir, config)
    model = model_for(config)
    test = central_test_set(config)
    partitioner_for(config)  # bad partition settings fail here, before any round
    strategy_type = strategy_class(config["strategy"])
    strategy = strategy_type(config, model.initial_state)
    prefix = strategy_type.evaluation_prefix(config)
    arrays = to_arrayrecord(model.initial_state)
    # sent with every message: the run config (core keys and the chosen
    # strategy's: a node need not have other packages' strategies installed)
    # and the classes, onto which a deployed node maps its own data
    own_keys = set(KEYS) | set(strategy_type.keys)
    sent_config = ConfigRecord({**{k: v for k, v in config.to_dict().items() if k in own_keys},
                                LABEL_NAMES: list(model.spec.label_names)})
    rounds, started = config["rounds"], time.perf_counter()
    timeout = config["round-timeout"] or NO_LIMIT_S
    for server_round in range(1, rounds + 1):
        round_start = time.perf_counter()
        messages = list(strategy.configure_train(server_round, arrays, sent_config, grid))
        replies = replies_as_they_arrive(grid, messages, timeout, in_flight)
        new_arrays, train = strategy.aggregate_train(server_round, replies)
        answered = sum(int(train[k]) for k in ("clients", "rejected", "declined"))
        if new_arrays is not None:
            arrays = new_arrays
        record = {"round": server_round, "accuracy": None, "loss": None,
                  "epsilon": None, "sampled": len(messages),
                  "missing": len(messages) - answered, **dict(train),
                  "updated": new_arrays is not None}
        if server_round % config["eval-every"] == 0 or server_round == rounds:
            load_adapter_state(model.peft, from_arrayrecord(arrays))
            write_base(model.peft, strategy.base.cumulative if strategy.base else {})
            record["accuracy"], record["loss"] = evaluate(model, test)
            if prefix:
                asked = strategy.evaluation_requests(server_round, sent_config)
                record.update(strategy.aggregate_evaluation(
                    server_round, replies_as_they_arrive(grid, asked, timeout, in_flight),
                    prefix))
        record["seconds"] = time.perf_counter() - round_start
        writer.add_round(record)
        print(progress_line(record, rounds), flush=True)
    load_adapter_state(model.peft, from_arrayrecord(arrays))
    if strategy.base is not None:
        save_base_delta(out_dir / BASE_DELTA_FILE, strategy.base.cumulative)
    writer.save_adapter(model.peft)
    write_base(model.peft, {})  # the process-wide model serves other runs too
    return writer.finish({"strategy": config["strategy"],
                          "label_names": list(model.spec.label_names),  # for `evaluate`
                          "epsilon_per_client": {str(k): v for k, v in
                                                 sorted(strategy.epsilons.items())} or None,
                          "wall_seconds": time.perf_counter() - started,
                          "out_dir": str(out_dir)})
