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

Randomness: every draw of a local round (shuffling, dropout) comes from
``fedlora.core.seeding.client_seed`` (seed, round, client), so a reply does not
depend on which Ray worker computed it or what that worker did before; DP
noise and Poisson sampling come from their own, secret, generator.

Attack harness (robustness research): the training step is wrapped by the
client's mod (``fedlora.node.mods``), which is the step itself for an honest
client and an attack around it for the run seed's malicious partitions.
"""

from __future__ import annotations

from functools import partial

import torch
from flwr.app import Context, Message, RecordDict

from fedlora.core.adapters import adapter_state, set_trainable
from fedlora.core.seeding import client_seed, dp_generator
from fedlora.learning.privacy import PrivateTraining
from fedlora.learning.schedule import round_lr
from fedlora.learning.training import train_local
from fedlora.node.mods import Trained, attack_for
from fedlora.node.session import Session, open_session
from fedlora.wire import codec
from fedlora.wire.messages import EvaluateReply, TrainReply


def handle_train(message: Message, context: Context) -> Message:
    """Train this client's adapter as the request asks; reply with the upload."""
    return local_update(message, context, open_session(message, context))


def local_update(message: Message, context: Context, session: Session) -> Message:
    """The training reply for a prepared session (the client's memory is
    saved to its store before the reply goes)."""
    config, task = session.config, session.request.task
    torch.set_num_threads(max(1, int(config.client_cpus)))
    private = _local_dp(session, context.state)  # None unless dp=local
    if private is not None and private.exceeds_budget():  # decline, spend nothing
        return TrainReply(session.identity, base_version=session.base_version,
                          epsilon=private.epsilon(),
                          epsilon_after_round=private.epsilon_after_round()
                          ).to_message(message)
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
                      private.epsilon() if private is not None else None
                      ).to_message(message)


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
