"""The server side of a run: config → strategy → rounds → evaluation → results.

``run_federation`` is the whole of it; ``server/app.py`` calls it with the
run config Flower hands over (``flwr run``), and ``fedlora simulate`` with
the config it resolved. Each round is ``fedlora.federation.round.ServerRound``'s
(requests, replies, the fold, the record); this loop adds central and
federated evaluation, writes the record and checkpoints.

Crash safety: after every round (its metrics line written) the server's
state is checkpointed (``fedlora.federation.checkpoint``), and a run with
``resume-from`` goes on after its last checkpointed round
(``fedlora.federation.resume``). Every message names the run, its lineage and the run
directory's client store, so that clients keep their state where it
survives too (``fedlora.node.client_state``). A stop request
(``fedlora.runtime.stopping``) ends the loop at its next wait.
"""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path

from flwr.app import ConfigRecord
from flwr.serverapp import Grid

from fedlora.core.adapters import load_adapter_state
from fedlora.core.config import KEYS, RunConfig
from fedlora.core.fields import Summary, client_fields
from fedlora.federation import checkpoint, snapshots, trackers
from fedlora.federation.checkpoint import Checkpoint
from fedlora.federation.replies import replies_as_they_arrive
from fedlora.federation.resume import start_run
from fedlora.federation.round import ServerRound
from fedlora.learning.features import central_test_set, model_for, partitioner_for
from fedlora.learning.tasks import task_for
from fedlora.runtime.progress import Lines, round_line
from fedlora.strategies import strategy_class
from fedlora.wire.basedelta import BASE_DELTA_FILE, save_base_delta, write_base
from fedlora.wire.messages import (
    CLIENT_STORE,
    LABEL_NAMES,
    LINEAGE,
    RUN_ID,
    STORE_REQUIRED,
    clients_in,
)

NO_LIMIT_S = float("inf")  # round-timeout 0: wait until each reply (or the SuperLink's error)


CLIENT_STORE_DIR = "clients"  # clients' state in the run directory (fedlora.node.client_state)


def run_federation(grid: Grid, config: RunConfig, in_flight: int = 0,
                   simulation: bool = False, progress: Lines | None = None) -> dict:
    """Run all rounds (after the last checkpointed one, with ``resume-from``)
    and write the outputs contract; returns the summary. ``in_flight`` caps
    the messages outstanding at once (0 = a round's all at once; see
    ``fedlora.federation.replies``); ``simulation``: every client must keep its state
    in the run directory (``fedlora.node.client_state``); ``progress`` shows the
    run as it goes (``fedlora.runtime.progress``; by default the round lines only)."""
    progress = progress or Lines()
    tracking = trackers.open_tracking(config)  # one that cannot start: one line, before any file
    start = start_run(config, Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S"))
    config, out_dir, writer = start.config, start.out_dir, start.writer
    tracking.start(config.to_dict(), out_dir, writer.rounds)
    model, task = model_for(config), task_for(config)
    test = central_test_set(config)
    partitioner_for(config)  # bad partition settings fail here, before any round
    strategy_type = strategy_class(config.strategy)
    server = ServerRound(strategy_type(config, model.initial_state), progress.rejected)
    if start.checkpoint is not None:
        server.load_state_dict(start.checkpoint.server_state())
    prefix = strategy_type.evaluation_prefix(config)
    # sent with every message: the run config (core keys and the chosen
    # strategy's: a node need not have other packages' strategies installed)
    # and the classes, onto which a deployed node maps its own data; and
    # where the clients keep their state (fedlora.node.client_state)
    own_keys = set(KEYS) | set(strategy_type.keys)
    (out_dir / CLIENT_STORE_DIR).mkdir(exist_ok=True)
    store = {CLIENT_STORE: str(out_dir / CLIENT_STORE_DIR), STORE_REQUIRED: simulation}
    sent_config = ConfigRecord({**{k: v for k, v in config.to_dict().items() if k in own_keys},
                                LABEL_NAMES: list(model.spec.label_names),
                                RUN_ID: start.run_id, LINEAGE: str(start.lineage), **store})
    rounds, started = config.rounds, time.perf_counter()
    earlier_s = start.checkpoint.wall_seconds if start.checkpoint is not None else 0.0
    timeout = config.round_timeout or NO_LIMIT_S
    for server_round in range(start.completed + 1, rounds + 1):
        round_start = time.perf_counter()
        messages = server.train_requests(server_round, sent_config, grid)
        progress.round_started(server_round, rounds, sum(map(clients_in, messages)))
        replies = progress.counted(replies_as_they_arrive(grid, messages, timeout, in_flight),
                                   clients_in)
        record = server.aggregate_train(server_round, replies)
        record.central = dict.fromkeys(task.metrics)
        if server_round % config.eval_every == 0 or server_round == rounds:
            progress.evaluating()
            evaluation_start = time.perf_counter()
            load_adapter_state(model.peft, server.adapter)
            write_base(model.peft, server.base_delta or {})
            record.central.update(task.evaluate(model, test))
            record.evaluate_s = time.perf_counter() - evaluation_start
            if prefix:
                asked = server.evaluation_requests(server_round, sent_config)
                record.evaluation = server.aggregate_evaluation(
                    server_round, replies_as_they_arrive(grid, asked, timeout, in_flight),
                    prefix, task.primary.name)
        record.seconds = time.perf_counter() - round_start
        row = record.to_dict()
        writer.add_round(row, task.metrics)
        if snapshots.due(config.save_every, server_round):  # before the checkpoint:
            # a crash between them runs the round again, and writes it again
            snapshots.save(out_dir, server_round, model.peft, server.adapter, server.base_delta)
        checkpoint.save(out_dir, Checkpoint(
            run_id=start.run_id, lineage=str(start.lineage),
            wall_seconds=earlier_s + time.perf_counter() - started, **server.state_dict()))
        tracking.log_round(row)  # after the checkpoint: a resume never logs it twice
        progress.round_ended(round_line(row, rounds, task.progress(row),
                                        client_fields(task.primary.name)))
    load_adapter_state(model.peft, server.adapter)
    if server.base_delta is not None:
        save_base_delta(out_dir / BASE_DELTA_FILE, server.base_delta)
    writer.save_adapter(model.peft)
    write_base(model.peft, {})  # the process-wide model serves other runs too
    summary = writer.finish({
        Summary.STRATEGY: config.strategy,
        Summary.LABEL_NAMES: list(model.spec.label_names),  # for `evaluate`
        Summary.EPSILON_PER_CLIENT: {str(k): v for k, v in
                                     sorted(server.epsilons.items())} or None,
        Summary.WALL_SECONDS: earlier_s + time.perf_counter() - started,
        Summary.OUT_DIR: str(out_dir)}, task.metrics, task.primary)
    tracking.finish(summary)
    return summary
