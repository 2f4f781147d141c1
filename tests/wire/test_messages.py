"""The message schema (fedlora.wire.messages): round trips through Flower
``Message``s and the reply checks that name the offending field."""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.common import MessageType

from fedlora.wire import codec
from fedlora.wire.messages import (
    LABEL_NAMES,
    MAX_EXAMPLES,
    METRICS,
    PAYLOAD,
    TASK,
    EvaluateReply,
    Request,
    Task,
    TrainReply,
)

pytestmark = pytest.mark.usefixtures("run_identity")

BLOB = codec.encode({"m.q.lora_A.weight": np.arange(6, dtype=np.float32).reshape(2, 3)})
BASE = codec.encode({"1/m.q.weight/left": np.ones((4, 1), np.float32)})


def _request(base: bytes | None = BASE, message_type: str = MessageType.TRAIN) -> Message:
    config = {"strategy": "flora", "lora-rank": 8, LABEL_NAMES: ["world", "sports"]}
    return Request(config, Task(3, 5, 2, 7, 4), BLOB, base).to_message(42, message_type)


@pytest.mark.parametrize("base", [BASE, None])
@pytest.mark.parametrize("message_type", [MessageType.TRAIN, MessageType.EVALUATE])
def test_request_round_trip(base, message_type):
    message = _request(base, message_type)
    assert message.metadata.dst_node_id == 42 and message.metadata.message_type == message_type
    request = Request.from_message(message)
    assert request.task == Task(server_round=3, partition_id=5, rank=2, base_version=7,
                                base_from=4)
    assert request.payload == BLOB and request.base == base
    assert request.label_names == ("world", "sports")
    assert request.run_config() == {"strategy": "flora", "lora-rank": 8}


def test_request_shares_a_given_config_record():
    shared = ConfigRecord({"strategy": "fedavg", LABEL_NAMES: ["a", "b"]})
    message = Request({}, Task(1, 0, 8), BLOB).to_message(1, config_record=shared)
    assert Request.from_message(message).config == dict(shared)


def test_request_without_task_or_with_a_bad_one_is_refused():
    message = _request()
    del message.content[TASK]
    with pytest.raises(codec.PayloadError, match="task"):
        Request.from_message(message)
    message = _request()
    message.content[TASK] = ConfigRecord({"server-round": 1, "partition-id": 0})
    with pytest.raises(codec.PayloadError, match="task record"):
        Request.from_message(message)


def test_train_reply_round_trip():
    request = _request()
    reply = TrainReply(5, 120, 0.75, 8, 1.5, BLOB, base_version=7, epsilon=0.4)
    message = reply.to_message(request)
    assert message.metadata.src_node_id == 42  # from the node asked
    assert TrainReply.from_message(message) == reply
    assert not reply.declined


def test_declined_train_reply_round_trip():
    reply = TrainReply(5, base_version=7, epsilon=2.0, epsilon_after_round=2.5)
    back = TrainReply.from_message(reply.to_message(_request()))
    assert back.declined and back.payload is None
    assert (back.partition_id, back.base_version, back.epsilon, back.epsilon_after_round) == (
        5, 7, 2.0, 2.5)


def test_evaluate_reply_round_trip():
    reply = EvaluateReply(5, 40, 0.625, 0.9)
    assert EvaluateReply.from_message(reply.to_message(_request())) == reply
    assert "primary" not in reply.to_message(_request()).content[METRICS]  # as it always was


def test_evaluate_reply_carries_the_primary_metric_where_it_is_not_accuracy():
    reply = EvaluateReply(5, 40, 0.625, 0.9, primary=12.5)  # e.g. a perplexity
    back = EvaluateReply.from_message(reply.to_message(_request()))
    assert back == reply and back.value("perplexity") == 12.5
    assert EvaluateReply(5, 40, 0.625, 0.9).value("accuracy") == 0.625
    with pytest.raises(codec.PayloadError, match="no exact_match"):  # an older node's reply
        EvaluateReply(5, 40, 0.625, 0.9).value("exact_match")


def _train_message(**changes) -> Message:
    """A valid training reply with its metrics changed (None: removed)."""
    message = TrainReply(5, 120, 0.75, 8, 1.5, BLOB, 7).to_message(_request())
    metrics = message.content[METRICS]
    for key, value in changes.items():
        if value is None:
            del metrics[key]
        else:
            metrics[key] = value
    return message


@pytest.mark.parametrize("key, value", [
    ("num-examples", None), ("num-examples", math.nan), ("num-examples", math.inf),
    ("num-examples", -5), ("num-examples", 0), ("num-examples", MAX_EXAMPLES),
    ("num-examples", 1e300), ("partition-id", None), ("partition-id", -1),
    ("train-loss", math.nan), ("train-loss", -1.0), ("base-version", -1),
    ("steps", -3), ("compute-seconds", math.inf), ("epsilon", -0.5),
])
def test_train_reply_with_a_bad_field_is_refused_naming_it(key, value):
    with pytest.raises(codec.PayloadError, match=key):
        TrainReply.from_message(_train_message(**{key: value}))


def test_train_reply_accepts_the_largest_plausible_count():
    reply = TrainReply.from_message(_train_message(**{"num-examples": MAX_EXAMPLES - 1}))
    assert reply.num_examples == MAX_EXAMPLES - 1


def test_train_reply_without_payload_or_metrics_is_refused():
    message = _train_message()
    del message.content[PAYLOAD]
    with pytest.raises(codec.PayloadError, match="payload"):
        TrainReply.from_message(message)
    message = _train_message()
    del message.content[METRICS]
    with pytest.raises(codec.PayloadError, match="metrics"):
        TrainReply.from_message(message)


@pytest.mark.parametrize("parse", [TrainReply.from_message, EvaluateReply.from_message])
def test_error_replies_are_refused_with_the_clients_reason(parse):
    message = Message(Error(code=1, reason="Traceback (most recent call last):\n  ...\n"
                                         "RuntimeError: CUDA out of memory"),
                      reply_to=_request())
    with pytest.raises(codec.PayloadError, match="client failed: RuntimeError: CUDA out"):
        parse(message)


@pytest.mark.parametrize("key, value", [
    ("accuracy", 1.5), ("accuracy", -0.1), ("accuracy", math.nan), ("loss", math.nan),
    ("loss", -1.0), ("num-examples", 0), ("num-examples", None), ("partition-id", None),
])
def test_evaluate_reply_with_a_bad_field_is_refused_naming_it(key, value):
    message = EvaluateReply(5, 40, 0.625, 0.9).to_message(_request())
    metrics = message.content[METRICS]
    if value is None:
        del metrics[key]
    else:
        metrics[key] = value
    with pytest.raises(codec.PayloadError, match=key):
        EvaluateReply.from_message(message)


def test_evaluate_reply_without_metrics_is_refused():
    message = Message(RecordDict({"other": MetricRecord({"x": 1})}), reply_to=_request())
    with pytest.raises(codec.PayloadError, match="metrics"):
        EvaluateReply.from_message(message)
