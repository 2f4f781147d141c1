"""The client trains round t with ``round_lr(config, t)`` (``lr-schedule``)."""

from __future__ import annotations

import pytest
from fakes import request
from flwr.app import Context, RecordDict

from fedlora.learning.schedule import round_lr
from fedlora.node import client_loop
from fedlora.strategies import resolve, strategies
from fedlora.wire.messages import LABEL_NAMES, Task


class _Trained(Exception):
    pass


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_the_client_trains_with_the_rate_of_its_round(tiny_bert, topic_dataset, monkeypatch,
                                                      schedule):
    from fedlora.learning.features import model_for

    config = resolve({"model": str(tiny_bert), "dataset": str(topic_dataset),
                      "num-clients": 4, "clients-per-round": 2, "partition": "iid",
                      "rounds": 5, "lr": 0.01, "lr-schedule": schedule})
    seen = []

    def train_local(*args, lr, **kwargs):
        seen.append(lr)
        raise _Trained

    monkeypatch.setattr(client_loop, "train_local", train_local)
    model = model_for(config)
    _, blob = strategies()["fedavg"](config, model.initial_state).download(model.initial_state)
    sent = {**config.to_dict(), LABEL_NAMES: list(model.spec.label_names)}
    for server_round in (1, 3, 5):
        message = request(2, sent, Task(server_round, 0, config["lora-rank"]), blob,
                          message_id=f"r{server_round}")
        context = Context(run_id=1, node_id=5, node_config={"partition-id": 0},
                          state=RecordDict(), run_config={})
        with pytest.raises(_Trained):
            client_loop.handle_train(message, context)
    assert seen == [round_lr(config, t) for t in (1, 3, 5)]
    assert (len(set(seen)) == 1) == (schedule == "constant")
