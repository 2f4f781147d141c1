"""The client side of a round: request → strategy client half → local
training (or evaluation) → reply. ``client/app.py`` is this, registered with
Flower; ``fedlora simulate`` builds the same ClientApp
(``fedlora.commands.simulation.project_client_app``).

The loop is the same for every strategy: read the request
(``fedlora.wire.messages``), build this client's model at the rank it was asked
for, bring its base weights to the version the server names
(``fedlora.wire.basedelta``, for strategies that change them), let the strategy's
client half say where training starts (it sees the client's persistent
memory) and what trains, train on this client's data (with DP-SGD when
``dp=local``; a client whose next round would exceed its ε budget declines
instead), let the strategy say what goes back, encode. The base model and the
tokenised partitions are cached in the worker process (``fedlora.learning.features``);
the adapter and the optimiser are rebuilt here for every message.

A client's data: in a deployment, the node's own directory (node config
``data-path``), labelled by the classes the server sends; its node id is its
identity (seeds, DP accounting). Otherwise (simulation, demos) the partition
of the run's shared ``dataset`` that the message names (the server draws them
from the run seed: ``fedlora.core.seeding``), or the node's own ``partition-id``
when it names none. With federated evaluation a seeded share of it is held
out (``fedlora.learning.features.held_out_split``) and never trained on.

Randomness: every draw of a local round (shuffling, dropout) comes from
``fedlora.core.seeding.client_seed`` (seed, round, client), so a reply does not
depend on which Ray worker computed it or what that worker did before; DP
noise and Poisson sampling come from their own, secret, generator.

Attack harness (robustness research, ``fedlora.learning.attacks``): in a simulation
the run seed's malicious partitions poison their data (label-flip), rewrite
their trained change before the strategy computes the upload (scale,
sign-flip, noise) or inflate their example count (inflate-weight); a deployed
node sent a run with an attack refuses it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from datasets import Dataset
from flwr.app import Context, Message
from flwr.common import MessageType

from fedlora.core.adapters import (
    State,
    adapter_state,
    load_adapter_state,
    set_trainable,
    tensor_kind,
)
from fedlora.core.config import RunConfig
from fedlora.core.seeding import attack_rng, client_seed, dp_generator
from fedlora.learning import attacks
from fedlora.learning.features import (
    client_dataset,
    held_out_split,
    model_for,
    model_with_labels,
    node_dataset,
)
from fedlora.learning.models import LoraModel
from fedlora.learning.privacy import PrivateTraining
from fedlora.learning.tasks import Task, task_for
from fedlora.learning.training import train_local
from fedlora.node.client_state import ClientStore, Lineage, store_for
from fedlora.strategies import from_message, strategy_class
from fedlora.strategies.base import ClientHalf
from fedlora.wire import codec
from fedlora.wire.basedelta import NodeBase, shapes_of, write_base
from fedlora.wire.messages import EvaluateReply, Request, TrainReply


@dataclass
class Session:
    """One message's client: its config, model, data and starting adapter."""

    request: Request
    config: RunConfig
    task: Task
    role: ClientHalf
    model: LoraModel
    train: Dataset
    held_out: Dataset
    identity: int  # partition id (simulation) or node id (deployment)
    start: State
    base_version: int
    store: ClientStore | None  # where the client's memory is kept between processes


def open_session(message: Message, context: Context, model: LoraModel | None = None,
                 data: Dataset | None = None) -> Session:
    """Read the request and prepare this client's model for it, its memory
    (``context.state``) restored from its store. ``model`` and ``data``
    replace the cached ones (``fedlora.commands.bench_scale`` builds them per message
    to measure the stock pattern)."""
    request = Request.from_message(message)
    config = from_message(request.run_config())
    strategy = strategy_class(config["strategy"])
    rank = request.task.rank
    data_path = context.node_config.get("data-path")
    if data_path:
        attacks.refuse_deployed(config)  # attacks are for simulated clients only
        model = model or model_with_labels(config, request.label_names, rank)
        data = data if data is not None else node_dataset(config, model, str(data_path))
        identity = context.node_id
    else:
        identity = request.task.partition_id
        model = model or model_for(config, rank)
        data = data if data is not None else client_dataset(config, identity)
    store = None
    if request.run_id:  # every fedlora server names its run
        store = store_for(context.node_config, request.client_store,
                          request.store_required, request.run_id,
                          request.task.partition_id, Lineage.parse(request.lineage))
        store.restore(context.state, request.task.server_round,
                      inclusive=message.metadata.message_type == MessageType.EVALUATE)
    train, held_out = ((held_out_split(config, data) if strategy.evaluation_prefix(config)
                        else (data, data)))
    node_base = NodeBase(context.state)
    node_base.update(request.base, request.task.base_from, request.task.base_version,
                     shapes_of(model.peft))
    write_base(model.peft, node_base.delta)
    role = strategy.client_half(config)
    template = model.initial_state
    expected = {n: template[n].shape for n in role.download_names(template)}
    received = codec.decode(request.payload, expected, config["payload-dtype-down"])
    start = role.start_state(received, template, context.state)
    load_adapter_state(model.peft, start)
    return Session(request, config, task_for(config), role, model, train, held_out, identity,
                   start, node_base.version, store)


def handle_train(message: Message, context: Context) -> Message:
    """Train this client's adapter as the request asks; reply with the upload."""
    return local_update(message, context, open_session(message, context))


def local_update(message: Message, context: Context, session: Session) -> Message:
    """The training reply for a prepared session (the client's memory is
    saved to its store before the reply goes)."""
    config, task = session.config, session.request.task
    attack = attacks.attack_for(config, session.identity)  # "none" unless malicious
    train = session.train
    if attack == "label-flip":
        train = attacks.flip_labels(train, session.task, session.model)
    torch.set_num_threads(max(1, int(config["client-cpus"])))
    params = set_trainable(session.model.peft, session.role.trains)
    private = None
    if config["dp"] == "local":
        private = PrivateTraining(config, context.state, len(train), dp_generator(
            config["dp-seeded-noise"], config["seed"], task.server_round, session.identity))
        if private.exceeds_budget():
            return TrainReply(session.identity, base_version=session.base_version,
                              epsilon=private.epsilon(),
                              epsilon_after_round=private.epsilon_after_round()
                              ).to_message(message)
    result = train_local(
        session.model, params, train, task=session.task,
        epochs=config["local-epochs"], max_steps=config["local-steps"],
        batch_size=config["batch-size"], lr=config["lr"], optimizer=config["optimizer"],
        seed=client_seed(config["seed"], task.server_round, session.identity),
        private=private,
    )
    trained = adapter_state(session.model.peft)
    if attack in attacks.CHANGE_ATTACKS:  # before the upload, so every strategy's carries it
        sent = [n for n in session.role.upload_names(trained)
                if session.role.trains(tensor_kind(n))]
        trained = attacks.attack_change(config, session.start, trained, sent, attack_rng(
            config["seed"], task.server_round, session.identity))
    upload = session.role.upload(session.start, trained, context.state)
    if session.store is not None:
        session.store.save(context.state, task.server_round)
    examples = result.num_examples
    if attack == "inflate-weight":
        examples = max(1, round(examples * config["attack-scale"]))
    return TrainReply(session.identity, examples, result.mean_loss, result.steps,
                      result.compute_seconds, codec.encode(upload, config["payload-dtype-up"]),
                      session.base_version,
                      private.epsilon() if private is not None else None
                      ).to_message(message)


def handle_evaluate(message: Message, context: Context) -> Message:
    """Evaluate the adapter this client would train from (the global one,
    with its personal tensors) on its held-out slice."""
    session = open_session(message, context)
    metrics = session.task.evaluate(session.model, session.held_out)
    return EvaluateReply(session.identity, len(session.held_out),
                         *session.task.reply_values(metrics)).to_message(message)

