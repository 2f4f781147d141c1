"""The client side of a round: request → strategy client half → local
training (or evaluation) → reply. ``client/app.py`` is this, registered with
Flower; ``fedlora simulate`` builds the same ClientApp
(``fedlora.commands.simulation.project_client_app``).

The loop is the same for every strategy: open the session
(``fedlora.node.session``: the request read, the model built, the base
weights brought up to date, the start adapter chosen by the strategy's
client half), train what the client half says trains on this client's data
(with DP-SGD when ``dp=local``; a client whose next round would exceed its ε
budget declines instead), let the strategy say what goes back, save the
client's memory, encode. The adapter and the optimiser are rebuilt for every
message.

A cohort message (``cohort-size`` > 1, simulation only) carries several
clients' requests: ``train_cohort`` opens a session for each and trains them
in one batched pass (``fedlora.learning.cohort_pass``) or one after another
through the same path, and the reply carries one update per client; a
deployed node refuses it.

Randomness: every draw of a local round (shuffling, dropout) comes from
``fedlora.core.seeding.client_seed`` (seed, round, client), so a reply does not
depend on which Ray worker computed it or what that worker did before; DP
noise and Poisson sampling come from their own, secret, generator.

Attack harness (robustness research): the training step is wrapped by the
client's mod (``fedlora.node.mods``), which is the step itself for an honest
client and an attack around it for the run seed's malicious partitions.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial

import numpy as np
import torch
from flwr.app import Context, Message, RecordDict

from fedlora.core.adapters import TENSOR_KINDS, adapter_state, load_adapter_state, set_trainable
from fedlora.core.config import ConfigError
from fedlora.core.seeding import client_seed, dp_generator
from fedlora.learning.cohort_pass import Member, NotBatchable, train_members
from fedlora.learning.privacy import PrivateTraining
from fedlora.learning.schedule import round_lr
from fedlora.learning.training import train_local
from fedlora.node.mods import Trained, attack_for, honest
from fedlora.node.session import Session, open_request, open_session
from fedlora.strategies import strategy_class
from fedlora.wire import codec
from fedlora.wire.messages import (
    EvaluateReply,
    Request,
    TrainReply,
    cohort_reply,
    cohort_requests,
    is_cohort,
)

LOGGER = logging.getLogger(__name__)


def handle_train(message: Message, context: Context) -> Message:
    """Train this client's adapter as the request asks (each client's of a
    cohort message); reply with the upload (with each client's)."""
    if is_cohort(message):
        return cohort_reply(message, train_cohort(cohort_requests(message), context))
    return local_update(message, context, open_session(message, context))


def train_cohort(requests: list[Request], context: Context) -> list[TrainReply | str]:
    """Train a cohort's clients (``cohort-size`` > 1): one reply per client,
    in the cohort's order, or the one-line reason that client failed (the
    server rejects that client alone). Each client is a session of its own,
    as if its request had come alone: its partition's data, its memory
    restored from and saved to its own store (so from a fresh ``RecordDict``:
    the worker holds no client between messages), its seed
    (``client_seed``), its mod and its DP ledger. The base model is the
    worker's cached one.

    ``cohort-pass=batched`` trains the clients in one batched pass
    (``fedlora.learning.cohort_pass``) where it applies, and the others one
    after another, with one log line saying why; ``sequential`` trains all
    one after another (the bytes of ``cohort-size=1``).

    A deployed node (``data-path``: its own data) is one client and refuses
    a cohort: ``ConfigError`` in one line."""
    if context.node_config.get("data-path"):
        raise ConfigError(f"a cohort of {len(requests)} clients sent to a deployed node: "
                          "a node with its own data-path is one client (cohort-size is "
                          "for simulations; set cohort-size=1)")
    replies: list[TrainReply | str | None] = [None] * len(requests)
    batch: list[tuple[int, Context, Session]] = []
    for index, request in enumerate(requests):
        if not request.run_id:
            raise codec.PayloadError("a cohort message without the run's id (its clients "
                                     "keep their state in the run's store)")
        client = Context(context.run_id, context.node_id, context.node_config,
                         RecordDict(), context.run_config)
        with _one_client(replies, index, request):
            session = open_request(request, client)
            reason = _not_batched(session)
            if reason is None:
                batch.append((index, client, session))
            else:  # trained now, before the next session overwrites the model's adapter
                if reason:
                    LOGGER.info("cohort client %d trains alone: %s",
                                request.task.partition_id, reason)
                replies[index] = train_reply(client, session)
    if len(batch) == 1:
        index, client, session = batch[0]
        with _one_client(replies, index, requests[index]):
            load_adapter_state(session.model.peft, session.start)
            replies[index] = train_reply(client, session)
    elif batch:
        _train_batched(batch, requests, replies)
    return replies


@contextmanager
def _one_client(replies: list, index: int, request: Request) -> Iterator[None]:
    """One cohort client's failure becomes its reply: its one-line reason."""
    try:
        yield
    except Exception as err:  # noqa: BLE001 - one client's failure is its own reply
        LOGGER.exception("cohort client %d failed", request.task.partition_id)
        replies[index] = _reason(err)


def _reason(err: Exception) -> str:
    """A failed client's reply: the error's type and last line."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[-1] if lines else ''}"


def _not_batched(session: Session) -> str | None:
    """Why this cohort client trains alone ("" where nothing needs saying:
    ``cohort-pass=sequential``), or None where the batched pass takes it."""
    config = session.config
    if config.cohort_pass == "sequential":
        return ""
    if config.dp == "local":
        return "dp=local (Opacus clips each client's per-example gradients in its own model)"
    if config.gradient_checkpointing:
        return ("gradient-checkpointing (its recomputed forward pass would redraw dropout "
                "outside the clients' own generators)")
    if strategy_class(config.strategy).changes_base:
        return f"strategy {config.strategy} changes the base weights, which each client writes"
    if attack_for(config, session.identity) is not honest:
        return f"attack {config.attack} wraps this client's training step"
    return None


def _train_batched(batch: list[tuple[int, Context, Session]], requests: list[Request],
                   replies: list) -> None:
    """Train ``batch``'s sessions together, one batched pass per model
    (a model per rank); all one after another, with one log line, where the
    model cannot be batched."""
    by_model: dict[int, list[tuple[int, Context, Session]]] = {}
    for item in batch:
        by_model.setdefault(id(item[2].model), []).append(item)
    for group in by_model.values():
        first = group[0][2]
        config, server_round = first.config, first.request.task.server_round
        torch.set_num_threads(max(1, int(config.client_cpus)))
        members = [Member({n: torch.tensor(np.asarray(v, dtype=np.float32),  # a copy:
                                           device=first.model.device)  # start stays as sent
                           for n, v in session.start.items()},
                          frozenset(k for k in TENSOR_KINDS if session.role.trains(k)),
                          session.train,
                          client_seed(config.seed, server_round, session.identity))
                   for _, _, session in group]
        try:
            train_members(first.model, members, task=first.task, epochs=config.local_epochs,
                          max_steps=config.local_steps, batch_size=config.batch_size,
                          lr=round_lr(config, server_round), optimizer=config.optimizer)
        except NotBatchable as why:
            LOGGER.info("a cohort of %d clients trains one after another: %s", len(group), why)
            for index, client, session in group:
                with _one_client(replies, index, requests[index]):
                    load_adapter_state(session.model.peft, session.start)
                    replies[index] = train_reply(client, session)
            continue
        except Exception as err:  # noqa: BLE001 - the pass failed: each client's reply says so
            LOGGER.exception("the batched pass of %d cohort clients failed", len(group))
            for index, _, _ in group:
                replies[index] = _reason(err)
            continue
        for (index, client, session), member in zip(group, members):
            with _one_client(replies, index, requests[index]):
                state = {n: t.detach().to("cpu", torch.float32).numpy().copy()
                         for n, t in member.tensors.items()}
                replies[index] = reply_for(client, session, Trained(state, member.result()))


def local_update(message: Message, context: Context, session: Session) -> Message:
    """The training reply for a prepared session (the client's memory is
    saved to its store before the reply goes)."""
    return train_reply(context, session).to_message(message)


def train_reply(context: Context, session: Session) -> TrainReply:
    """``local_update``'s reply, typed."""
    config = session.config
    torch.set_num_threads(max(1, int(config.client_cpus)))
    private = _local_dp(session, context.state)  # None unless dp=local
    if private is not None and private.exceeds_budget():  # decline, spend nothing
        return TrainReply(session.identity, base_version=session.base_version,
                          epsilon=private.epsilon(),
                          epsilon_after_round=private.epsilon_after_round())
    # an honest client's mod is the identity; an attacker's wraps the honest step
    train = attack_for(config, session.identity)(partial(train_step, private=private))
    return reply_for(context, session, train(session), private)


def reply_for(context: Context, session: Session, trained: Trained,
              private: PrivateTraining | None = None) -> TrainReply:
    """The reply of a trained client: the strategy's upload, encoded, after
    the client's memory is saved to its store."""
    config, task = session.config, session.request.task
    upload = session.role.upload(session.start, trained.state, context.state)
    if session.store is not None:
        session.store.save(context.state, task.server_round)
    result = trained.result
    return TrainReply(session.identity, result.num_examples, result.mean_loss, result.steps,
                      result.compute_seconds, codec.encode(upload, config.payload_dtype_up),
                      session.base_version,
                      private.epsilon() if private is not None else None)


def _local_dp(session: Session, memory: RecordDict) -> PrivateTraining | None:
    """This client's DP-SGD for the round under ``dp=local`` (its ledger
    restored from ``memory``), else None."""
    config = session.config
    if config.dp != "local":
        return None
    return PrivateTraining(config, memory, len(session.train), dp_generator(
        config.dp_seeded_noise, config.seed, session.request.task.server_round,
        session.identity))


def train_step(session: Session, private: PrivateTraining | None = None) -> Trained:
    """The honest training step (``fedlora.node.mods.TrainStep``): train the
    tensors the strategy's client half trains on the session's data, from
    the client's seed for this round, privately when ``private`` is given."""
    config = session.config
    params = set_trainable(session.model.peft, session.role.trains)
    result = train_local(
        session.model, params, session.train, task=session.task,
        epochs=config.local_epochs, max_steps=config.local_steps,
        batch_size=config.batch_size,
        lr=round_lr(config, session.request.task.server_round), optimizer=config.optimizer,
        seed=client_seed(config.seed, session.request.task.server_round, session.identity),
        private=private,
    )
    return Trained(adapter_state(session.model.peft), result)


def handle_evaluate(message: Message, context: Context) -> Message:
    """Evaluate the adapter this client would train from (the global one,
    with its personal tensors) on its held-out slice."""
    session = open_session(message, context)
    metrics = session.task.evaluate(session.model, session.held_out)
    return EvaluateReply(session.identity, len(session.held_out),
                         *session.task.reply_values(metrics)).to_message(message)
