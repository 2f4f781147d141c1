"""Payload precision (``payload-dtype-down``, ``payload-dtype-up``): downloads
and uploads in float16 or int8 cost a half and a quarter of float32's bytes,
counted as sent; server and client agree on the start byte for byte; CELLM's
error feedback keeps the quantisation error; every strategy runs with int8
both ways; same seed, same bytes; a payload the run did not ask for, or an
int8 one with a scale the encoder never writes, is refused.

Rounds here are real but in this process: the strategy's own requests, the
client loop (``handle_train``, local training included) and the strategy's
aggregation, without Ray (``Federation``); the metrics are the row
``fedlora simulate`` writes to metrics.jsonl.
"""

from __future__ import annotations

import numpy as np
import pytest
from fakes import Grid, request, server_identity
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedlora.core.adapters import adapter_state
from fedlora.core.config import KEYS, ConfigError
from fedlora.learning.features import model_for
from fedlora.node.client_loop import handle_train, local_update
from fedlora.node.session import open_session
from fedlora.strategies import resolve, strategies
from fedlora.strategies.base import to_arrayrecord
from fedlora.strategies.cellm import RESIDUAL_KEY
from fedlora.v1 import update_pb2 as pb
from fedlora.wire import codec
from fedlora.wire.messages import LABEL_NAMES, Request, TrainReply

pytestmark = pytest.mark.usefixtures("run_identity")

INT8 = {"payload-dtype-down": "int8", "payload-dtype-up": "int8"}
CELLM = {"strategy": "cellm", "cellm-down-density": 0.5, "cellm-up-density": 0.3,
         "cellm-error-feedback": True, **INT8}
SHAPES = {"m.q.lora_A.weight": (4, 16), "m.q.lora_B.weight": (16, 4), "m.head.bias": (3,)}


def _config(model, dataset, **keys):
    return resolve({"model": str(model), "dataset": str(dataset), "num-clients": 4,
                    "clients-per-round": 2, "partition": "iid", "batch-size": 4,
                    "local-steps": 1, "max-seq-len": 32, "lr": 0.01, **keys})


class Federation:
    """A strategy and its clients in this process: ``fedlora.federation.loop``'s
    round without Ray (each node's memory kept in its own Context)."""

    def __init__(self, config) -> None:
        model = model_for(config)
        self.strategy = strategies()[config["strategy"]](config, model.initial_state)
        self.record = ConfigRecord({**config.to_dict(),
                                    LABEL_NAMES: list(model.spec.label_names)})
        self.nodes = list(range(100, 100 + config["num-clients"]))
        self.contexts = {n: Context(run_id=1, node_id=n, node_config={}, state=RecordDict(),
                                    run_config={}) for n in self.nodes}

    def ask(self, server_round: int = 1) -> list[Message]:
        with server_identity():
            return list(self.strategy.configure_train(
                server_round, to_arrayrecord(self.strategy.state), self.record,
                Grid(self.nodes)))

    def round(self, server_round: int = 1) -> tuple[list[Message], list[Message], dict]:
        """(requests, replies, the round's metrics)."""
        requests = self.ask(server_round)
        replies = [handle_train(m, self.contexts[m.metadata.dst_node_id]) for m in requests]
        arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        assert arrays is not None, dict(metrics)
        return requests, replies, dict(metrics)


def _payload(message: Message) -> bytes:
    content = message.content
    if content.config_records:  # a request
        return Request.from_message(message).payload
    return TrainReply.from_message(message).payload


def _encodings(blob: bytes) -> set[int]:
    parsed = pb.AdapterPayload()
    parsed.ParseFromString(blob)
    return {(t.sparse.values if t.WhichOneof("layout") == "sparse" else t.dense).encoding
            for t in parsed.tensors}


# ----------------------------------------------------------------- keys and codec


def test_the_keys_offer_the_codecs_encodings():
    for key in ("payload-dtype-down", "payload-dtype-up"):
        assert KEYS[key].check.choices == codec.ENCODINGS and KEYS[key].default == "float32"
        with pytest.raises(ConfigError, match=f"'{key}'"):
            resolve({key: "bfloat16"})


@pytest.mark.parametrize("encoding", codec.ENCODINGS)
@pytest.mark.parametrize("sparse", [False, True])
def test_round_trip_is_what_the_receiver_decodes(encoding, sparse):
    from fedlora.wire.sparsity import top_k

    rng = np.random.default_rng(1)
    dense = {n: rng.standard_normal(s).astype(np.float32) for n, s in SHAPES.items()}
    tensors = top_k(dense, 0.4) if sparse else dense
    exact = {n: t.to_dense() for n, t in tensors.items()} if sparse else dense
    decoded, blob = codec.round_trip(tensors, encoding)
    assert blob == codec.encode(tensors, encoding)
    for name, value in codec.decode(blob, SHAPES, encoding).items():
        assert decoded[name].tobytes() == value.tobytes()
        step = {"float32": 0, "float16": 1e-3 * np.abs(exact[name]).max(),
                "int8": np.abs(exact[name]).max() / 127 / 2}[encoding]
        assert np.max(np.abs(value - exact[name])) <= step * 1.0001


def test_a_value_float16_cannot_carry_is_not_sent():
    with np.errstate(over="ignore"), pytest.raises(ValueError, match="float16 cannot carry"):
        codec.round_trip({"m.head.bias": np.array([1e6, 0, 0], np.float32)}, "float16")


# ----------------------------------------------------------------- bytes as sent


@pytest.mark.slow
def test_float16_and_int8_cut_the_bytes_to_a_half_and_a_quarter(topic_dataset):
    """The default model (all-MiniLM-L6-v2, whose adapter dwarfs the framing),
    one round of FedAvg at each precision; the metrics are the encoded sizes."""
    sent = {}
    for dtype in codec.ENCODINGS:
        config = _config("sentence-transformers/all-MiniLM-L6-v2", topic_dataset,
                         **{"payload-dtype-down": dtype, "payload-dtype-up": dtype})
        requests, replies, metrics = Federation(config).round()
        assert metrics["clients"] == 2 and metrics["rejected"] == 0
        assert metrics["uplink_bytes"] == sum(len(_payload(r)) for r in replies)
        assert metrics["downlink_bytes"] == sum(len(_payload(r)) for r in requests)
        sent[dtype] = metrics["uplink_bytes"], metrics["downlink_bytes"]
    for dtype, share in (("float16", 1 / 2), ("int8", 1 / 4)):
        for way in (0, 1):
            assert sent[dtype][way] / sent["float32"][way] == pytest.approx(share, rel=0.03)


# ----------------------------------------------------------------- CELLM


def test_cellm_server_and_client_start_from_the_same_bytes(tiny_bert, topic_dataset):
    federation = Federation(_config(tiny_bert, topic_dataset, **CELLM))
    strategy = federation.strategy
    requests = federation.ask()
    assert any(strategy.sent[n].tobytes() != v.tobytes() for n, v in strategy.state.items())
    for message in requests:
        node = message.metadata.dst_node_id
        session = open_session(message, federation.contexts[node])
        server_start = strategy.download_for(strategy.plans[node])[0]
        assert server_start.keys() == session.start.keys()
        for name, value in session.start.items():
            assert value.tobytes() == server_start[name].tobytes() == strategy.sent[name].tobytes()


def test_cellm_residual_is_what_was_meant_minus_what_the_server_decodes(tiny_bert,
                                                                      topic_dataset):
    federation = Federation(_config(tiny_bert, topic_dataset, **CELLM))
    message = federation.ask()[0]
    context = federation.contexts[message.metadata.dst_node_id]
    session = open_session(message, context)
    reply = local_update(message, context, session)
    trained = adapter_state(session.model.peft)
    received = codec.decode(_payload(reply), federation.strategy.upload_shapes, "int8")
    residual = {n: a.numpy() for n, a in context.state.array_records[RESIDUAL_KEY].items()}
    quantisation_error = 0.0
    for name, start in session.start.items():
        meant = start - trained[name]
        assert residual[name].tobytes() == (meant - received[name]).tobytes()
        kept = received[name] != 0  # sent entries: float32 would leave 0 here
        quantisation_error += float(np.abs(residual[name][kept]).sum())
    assert quantisation_error > 0


# ----------------------------------------------------------------- every strategy

VARIANTS = {name: {"strategy": name} for name in strategies()}
VARIANTS.update({
    "hetlora": {"strategy": "hetlora", "client-ranks": "2,4"},
    "flexlora": {"strategy": "flexlora", "client-ranks": "2,4"},
    "flora": {"strategy": "flora", "client-ranks": "2,4"},
    "cellm-sparse": CELLM,
    "fedavg-robust": {"strategy": "fedavg", "robust": "norm-bound"},
    "fedavg-central-dp": {"strategy": "fedavg", "dp": "central", "dp-noise-multiplier": 0.5,
                          "dp-seeded-noise": True},
})


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_strategy_runs_a_round_with_int8_both_ways(tiny_bert, topic_dataset, variant):
    keys = {"lora-rank": 4, **INT8, **VARIANTS[variant]}
    federation = Federation(_config(tiny_bert, topic_dataset, **keys))
    requests, replies, metrics = federation.round()
    assert metrics["clients"] == 2 and metrics["rejected"] == 0
    assert all(_encodings(_payload(m)) == {pb.INT8} for m in requests + replies)
    assert metrics["uplink_bytes"] == sum(len(_payload(r)) for r in replies)
    assert all(np.all(np.isfinite(v)) for v in federation.strategy.state.values())


def test_same_seed_same_bytes_with_int8(tiny_bert, topic_dataset):
    def run() -> tuple[list[bytes], list[bytes]]:
        federation = Federation(_config(tiny_bert, topic_dataset, **CELLM))
        replies = [_payload(r) for r in federation.round(1)[1] + federation.round(2)[1]]
        return replies, [v.tobytes() for v in federation.strategy.state.values()]

    assert run() == run()


# ----------------------------------------------------------------- refused


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -1.0, 0.0, 1e37])
def test_an_int8_scale_the_encoder_never_writes_is_refused(scale):
    values = pb.Values(encoding=pb.INT8, data=np.ones(3, np.int8).tobytes(), scale=scale)
    blob = pb.AdapterPayload(format_version=codec.FORMAT_VERSION, tensors=[
        pb.Tensor(name="m.head.bias", shape=[3], dense=values)]).SerializeToString()
    with pytest.raises(codec.PayloadError, match="bad int8 scale"):
        codec.decode(blob, {"m.head.bias": (3,)})
    values.scale = 1e36  # 127 × it is still a float32: accepted
    blob = pb.AdapterPayload(format_version=codec.FORMAT_VERSION, tensors=[
        pb.Tensor(name="m.head.bias", shape=[3], dense=values)]).SerializeToString()
    assert codec.decode(blob, {"m.head.bias": (3,)})["m.head.bias"][0] == np.float32(1e36)


def test_an_int8_payload_is_held_to_int8s_size_limit():
    shapes = {"m.big": (200_000,)}
    blob = codec.encode({"m.big": np.ones(200_000, np.float32)}, "float32")
    assert len(blob) <= codec.size_limit(shapes)
    with pytest.raises(codec.PayloadError, match="limit"):
        codec.decode(blob, shapes, "int8")


def test_the_server_refuses_an_upload_in_another_precision(tiny_bert, topic_dataset, caplog):
    federation = Federation(_config(tiny_bert, topic_dataset, **INT8))
    requests = federation.ask()
    start = federation.strategy.sent
    replies = [TrainReply(0, 10, 0.5, payload=codec.encode(start, dtype)).to_message(m)
               for m, dtype in zip(requests, ("float32", "int8"), strict=True)]
    _, metrics = federation.strategy.aggregate_train(1, replies)
    assert metrics["rejected"] == 1 and metrics["clients"] == 1
    assert "float32 values, the run sends int8" in caplog.text


def test_a_client_refuses_a_download_in_another_precision(tiny_bert, topic_dataset):
    federation = Federation(_config(tiny_bert, topic_dataset, **INT8))
    asked = Request.from_message(federation.ask()[0])
    wrong = request(100, asked.config, asked.task, codec.encode(federation.strategy.sent))
    with pytest.raises(codec.PayloadError, match="float32 values, the run sends int8"):
        open_session(wrong, federation.contexts[100])
