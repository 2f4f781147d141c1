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
one after another through the same path, and the reply carries one update
per client; a deployed node refuses it.

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
from functools import partial

import torch
from flwr.app import Context, Message, RecordDict

from fedlora.core.adapters import adapter_state, set_trainable
from fedlora.core.config import ConfigError
from fedlora.core.seeding import client_seed, dp_generator
from fedlora.learning.privacy import PrivateTraining
from fedlora.learning.schedule import round_lr
from fedlora.learning.training import train_local
from fedlora.node.mods import Trained, attack_for
from fedlora.node.session import Session, open_request, open_session
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
    worker's cached one. Today they train one after another; this is the
    seam where a batched multi-LoRA pass would go (issue #29, item 2).

    A deployed node (``data-path``: its own data) is one client and refuses
    a cohort: ``ConfigError`` in one line."""
    if context.node_config.get("data-path"):
        raise ConfigError(f"a cohort of {len(requests)} clients sent to a deployed node: "
                          "a node with its own data-path is one client (cohort-size is "
                          "for simulations; set cohort-size=1)")
    replies: list[TrainReply | str] = []
    for request in requests:
        if not request.run_id:
            raise codec.PayloadError("a cohort message without the run's id (its clients "
                                     "keep their state in the run's store)")
        client = Context(context.run_id, context.node_id, context.node_config,
                         RecordDict(), context.run_config)
        try:
            replies.append(train_reply(client, open_request(request, client)))
        except Exception as err:  # noqa: BLE001 - one client's failure is its own reply
            LOGGER.exception("cohort client %d failed", request.task.partition_id)
            lines = str(err).strip().splitlines()
            replies.append(f"{type(err).__name__}: {lines[-1] if lines else ''}")
    return replies


def local_update(message: Message, context: Context, session: Session) -> Message:
    """The training reply for a prepared session (the client's memory is
    saved to its store before the reply goes)."""
    return train_reply(context, session).to_message(message)


def train_reply(context: Context, session: Session) -> TrainReply:
    """``local_update``'s reply, typed."""
    config, task = session.config, session.request.task
    torch.set_num_threads(max(1, int(config.client_cpus)))
    private = _local_dp(session, context.state)  # None unless dp=local
    if private is not None and private.exceeds_budget():  # decline, spend nothing
        return TrainReply(session.identity, base_version=session.base_version,
                          epsilon=private.epsilon(),
                          epsilon_after_round=private.epsilon_after_round())
    # an honest client's mod is the identity; an attacker's wraps the honest step
    train = attack_for(config, session.identity)(partial(train_step, private=private))
    trained = train(session)
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
