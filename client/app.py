"""Flower ClientApp: message → strategy client half → local training → reply.

The loop is the same for every strategy: decode the download, let the
strategy's client half say where training starts and what trains, train on
this client's data (with DP-SGD when ``dp=local``; a client whose next
round would exceed its ε budget declines instead), let the strategy say what
goes back, encode. The base model
and the tokenised partitions are cached in the worker process
(``fedlora.features``); the adapter and the optimiser are rebuilt here for
every message.

A client's data: in a deployment, the node's own directory (node config
``data-path``), labelled by the classes the server sends; its node id is its
identity (seeds, DP accounting). Otherwise (simulation, demos) the partition
of the run's shared ``dataset`` that the message names (the server draws them
from the run seed: ``fedlora.seeding``), or the node's own ``partition-id``
when it names none.

Randomness: every draw of a local round (shuffling, dropout) comes from
``fedlora.seeding.client_seed`` (seed, round, client), so a reply does not
depend on which Ray worker computed it or what that worker did before; DP
noise and Poisson sampling come from their own, secret, generator.
"""

from __future__ import annotations

import torch
from datasets import Dataset
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedlora import codec
from fedlora.adapters import adapter_state, load_adapter_state, set_trainable
from fedlora.config import RunConfig, from_message
from fedlora.features import (
    LABEL_NAMES,
    client_dataset,
    model_for,
    model_with_labels,
    node_dataset,
)
from fedlora.models import LoraModel
from fedlora.privacy import PrivateTraining
from fedlora.seeding import client_seed, dp_generator
from fedlora.strategies import STRATEGIES
from fedlora.strategies.base import CONFIG, METRICS, PAYLOAD, TASK
from fedlora.training import train_local

app = ClientApp()


def message_config(message: Message) -> tuple[RunConfig, int]:
    """(run config, server round) sent with a training message."""
    sent = dict(message.content.config_records[CONFIG])
    server_round = int(sent.pop("server-round"))
    sent.pop(LABEL_NAMES, None)  # not a run-config key; see train()
    return from_message(sent), server_round


@app.train()
def train(message: Message, context: Context) -> Message:
    config, server_round = message_config(message)
    data_path = context.node_config.get("data-path")
    if data_path:
        labels = tuple(message.content.config_records[CONFIG][LABEL_NAMES])
        model = model_with_labels(config, labels)
        return local_update(message, context, config, server_round, model,
                            node_dataset(config, model, str(data_path)), context.node_id)
    partition_id = assigned_partition(message, context)
    return local_update(message, context, config, server_round, model_for(config),
                        client_dataset(config, partition_id), partition_id)


def assigned_partition(message: Message, context: Context) -> int:
    """The partition the server asks this message to train, else the node's own."""
    task = message.content.config_records.get(TASK)
    if task is not None and "partition-id" in task:
        return int(task["partition-id"])
    return int(context.node_config["partition-id"])


def local_update(message: Message, context: Context, config: RunConfig, server_round: int,
                 model: LoraModel, data: Dataset, partition_id: int) -> Message:
    """The reply to one training message, given this client's model and data
    (``fedlora.bench_scale`` passes freshly built ones to measure the stock
    pattern against the cached one)."""
    torch.set_num_threads(max(1, int(config["client-cpus"])))
    role = STRATEGIES[config["strategy"]].client_half(config)

    template = model.initial_state
    expected = {n: template[n].shape for n in role.download_names(template)}
    received = codec.decode(codec.from_record(message.content.array_records[PAYLOAD]),
                            expected)
    start = role.start_state(received, template)
    load_adapter_state(model.peft, start)
    params = set_trainable(model.peft, role.trains)

    seed = client_seed(config["seed"], server_round, partition_id)
    private = None
    if config["dp"] == "local":
        private = PrivateTraining(config, context.state, len(data), dp_generator(
            config["dp-seeded-noise"], config["seed"], server_round, partition_id))
        if private.exceeds_budget():
            return _decline(message, partition_id, private)
    result = train_local(
        model, params, data,
        epochs=config["local-epochs"], max_steps=config["local-steps"],
        batch_size=config["batch-size"], lr=config["lr"], optimizer=config["optimizer"],
        seed=seed, private=private,
    )
    blob = codec.encode(role.upload(start, adapter_state(model.peft), context.state))
    metrics = MetricRecord({
        "num-examples": result.num_examples, "train-loss": result.mean_loss,
        "steps": result.steps, "compute-seconds": result.compute_seconds,
        "partition-id": partition_id,
    })
    if private is not None:
        metrics["epsilon"] = private.epsilon()
    content = RecordDict({PAYLOAD: codec.to_record(blob), METRICS: metrics})
    return Message(content=content, reply_to=message)


def _decline(message: Message, partition_id: int, private: PrivateTraining) -> Message:
    """Reply without an update: one more round would exceed the ε budget."""
    metrics = MetricRecord({
        "declined": 1, "partition-id": partition_id, "epsilon": private.epsilon(),
        "epsilon-after-round": private.epsilon_after_round(),
    })
    return Message(content=RecordDict({METRICS: metrics}), reply_to=message)
