"""One message's client, prepared: the request read, this client's model built
at the rank it was asked for, its base weights brought to the version the
server names (``fedlora.wire.basedelta``, for strategies that change them), its
memory restored from its store, and the strategy's client half asked where
training starts (it sees the client's persistent memory). The client loop
(``fedlora.node.client_loop``) trains or evaluates it; the attack mods
(``fedlora.node.mods``) wrap its training.

A client's data: in a deployment, the node's own directory (node config
``data-path``), labelled by the classes the server sends; its node id is its
identity (seeds, DP accounting). Otherwise (simulation, demos) the partition
of the run's shared ``dataset`` that the message names (the server draws them
from the run seed: ``fedlora.core.seeding``), or the node's own ``partition-id``
when it names none. With federated evaluation a seeded share of it is held
out (``fedlora.learning.features.held_out_split``) and never trained on. A
deployed node sent a run with an attack refuses it
(``fedlora.learning.attacks.refuse_deployed``).

The base model and the tokenised partitions are cached in the worker process
(``fedlora.learning.features``); the adapter is rebuilt here for every message.
"""

from __future__ import annotations

from dataclasses import dataclass

from datasets import Dataset
from flwr.app import Context, Message
from flwr.common import MessageType

from fedlora.core.adapters import State, load_adapter_state
from fedlora.core.config import RunConfig
from fedlora.learning import attacks
from fedlora.learning.features import (
    client_dataset,
    held_out_split,
    model_for,
    model_with_labels,
    node_dataset,
)
from fedlora.learning.models import LoraModel
from fedlora.learning.tasks import Task, task_for
from fedlora.node.client_state import ClientStore, Lineage, store_for
from fedlora.strategies import from_message, strategy_class
from fedlora.strategies.base import ClientHalf
from fedlora.wire import codec
from fedlora.wire.basedelta import NodeBase, shapes_of, write_base
from fedlora.wire.messages import Request


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
    return open_request(Request.from_message(message), context,
                        evaluate=message.metadata.message_type == MessageType.EVALUATE,
                        model=model, data=data)


def open_request(request: Request, context: Context, *, evaluate: bool = False,
                 model: LoraModel | None = None, data: Dataset | None = None) -> Session:
    """``open_session`` for a request already read (one client of a cohort
    message, ``fedlora.node.client_loop.train_cohort``); ``evaluate``: an
    evaluation request (its memory restored after the round's training)."""
    config = from_message(request.run_config())
    strategy = strategy_class(config.strategy)
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
                      inclusive=evaluate)
    train, held_out = ((held_out_split(config, data) if strategy.evaluation_prefix(config)
                        else (data, data)))
    node_base = NodeBase(context.state)
    node_base.update(request.base, request.task.base_from, request.task.base_version,
                     shapes_of(model.peft))
    write_base(model.peft, node_base.delta)
    role = strategy.client_half(config)
    template = model.initial_state
    expected = {n: template[n].shape for n in role.download_names(template)}
    received = codec.decode(request.payload, expected, config.payload_dtype_down)
    start = role.start_state(received, template, context.state)
    load_adapter_state(model.peft, start)
    return Session(request, config, task_for(config), role, model, train, held_out, identity,
                   start, node_base.version, store)
