"""The server round (``fedlora.federation.round``): each reply bound to the
request it answers (duplicates and stale replies fed straight to the
aggregation path, below Flower's link, change nothing), federated
evaluation's aggregate, per-node downloads, the record and the state."""

from __future__ import annotations

import math

import numpy as np
import pytest
from by_hand import NODES, adapter_shapes, ask, random_adapter, strategy_config
from fakes import SMALL_SHAPES as SHAPES
from fakes import aggregate, message, pushed, request_id, start_round, train_reply
from fakes import random_state as _random_state
from flwr.app import ConfigRecord, Error, Message

from fedlora.federation import intake
from fedlora.federation.checkpoint import SERVER_STATE, Checkpoint
from fedlora.federation.round import ServerRound
from fedlora.strategies import resolve, strategies
from fedlora.strategies.base import ClientUpdate
from fedlora.strategies.fedavg import FedAvgLoRA
from fedlora.wire import codec
from fedlora.wire.messages import EvaluateReply, Request

pytestmark = pytest.mark.usefixtures("run_identity")  # server messages need a task identity

ASKED = (11, 12, 13, 14, 15)
MODES = ("none", "norm-bound", "trimmed-mean", "median", "krum")


def _server(mode: str = "none", nodes=ASKED, **keys) -> ServerRound:
    config = resolve({"num-clients": 10, "clients-per-round": len(nodes), "lora-rank": 4,
                      "robust": mode, **keys})
    strategy = strategies()[config["strategy"]]
    return ServerRound(strategy(config, _random_state(np.random.default_rng(0))))


def _uploads(seed: int) -> dict[int, dict[str, np.ndarray]]:
    """Each asked node's trained adapter, near the others."""
    rng = np.random.default_rng(seed)
    base = _random_state(rng)
    return {node: {n: v + 0.1 * rng.standard_normal(v.shape).astype(np.float32)
                   for n, v in base.items()} for node in ASKED}


def _honest(server: ServerRound, uploads, server_round: int = 1) -> list[Message]:
    return [train_reply(node, uploads[node], 100 + node, 1.0, server.plans[node].partition_id,
                        server_round) for node in ASKED]


def _two_rounds(mode: str, extra) -> tuple[dict, dict, int]:
    """(the global after two rounds, round 2's row, how many replies
    ``extra`` added); ``extra(round 2's replies, round 1's)`` gives the
    replies fed in round 2 beside its honest ones."""
    server = _server(mode)
    start_round(server, ASKED)
    first = _honest(server, _uploads(1))
    assert aggregate(server, first)[0] is not None
    start_round(server, ASKED, server_round=2)
    second = _honest(server, _uploads(2), server_round=2)
    added = extra(second, first)
    adapter, row = aggregate(server, [*second, *added], server_round=2)
    assert adapter is not None
    return adapter, row, len(added)


def _duplicates(second, first):
    return [second[0], second[0], second[3]]  # node 11 three times, node 14 twice


def _stale(second, first):
    return list(first)  # every round-1 reply again, in round 2


def _honest_only(second, first):
    return []


@pytest.mark.parametrize("extra", [_duplicates, _stale])
@pytest.mark.parametrize("mode", MODES)
def test_duplicate_and_stale_replies_are_rejected_and_change_nothing(mode, extra, caplog):
    want, honest, _ = _two_rounds(mode, _honest_only)
    with caplog.at_level("WARNING"):
        got, row, fed = _two_rounds(mode, extra)
    for name in want:
        assert got[name].tobytes() == want[name].tobytes(), name
    assert row["rejected"] == honest["rejected"] + fed
    assert row["clients"] == honest["clients"] and row["missing"] == 0
    reason = ("a second reply to one request (duplicate)" if extra is _duplicates
              else "it answers no request of this round (stale or forged)")
    assert caplog.text.count("round 2: reply from node 1") >= fed  # nodes 11-15
    assert caplog.text.count(f"rejected: {reason}") == fed


@pytest.mark.parametrize("extra", [_duplicates, _stale])
@pytest.mark.parametrize("mode", ("none", "trimmed-mean", "krum"))
def test_without_the_binding_they_would_move_the_global(mode, extra, monkeypatch):
    """The harness bites: with replies taken by their sender (the check
    removed), the same duplicates and stale replies change the global."""
    want, _, _ = _two_rounds(mode, _honest_only)

    def by_sender(self, reply):
        return reply.metadata.src_node_id

    monkeypatch.setattr(intake.Requests, "bind", by_sender)
    got, _, _ = _two_rounds(mode, extra)
    assert any(got[name].tobytes() != want[name].tobytes() for name in want)


def test_a_reply_to_another_nodes_request_is_rejected(caplog):
    server = _server()
    requests = start_round(server, ASKED)
    uploads = _uploads(3)
    asked_12 = next(m for m in requests if m.metadata.dst_node_id == 12)
    forged = message(11, 0, train_reply(11, uploads[11], 10).content,
                     reply_to=asked_12.metadata.message_id)
    honest = [r for r in _honest(server, uploads) if r.metadata.src_node_id != 12]
    with caplog.at_level("WARNING"):
        _, row = aggregate(server, [forged, *honest])
    assert row["rejected"] == 1 and row["clients"] == 4 and row["missing"] == 1
    assert "reply from node 11 rejected: it answers the request sent to node 12" in caplog.text


def test_missing_counts_the_asked_nodes_that_never_answered():
    server = _server()
    start_round(server, ASKED)
    replies = _honest(server, _uploads(4))
    _, row = aggregate(server, [replies[0], replies[0], replies[2]])
    assert (row["sampled"], row["clients"], row["rejected"], row["missing"]) == (5, 2, 1, 3)


def test_requests_pushed_after_others_were_answered_still_bind():
    """With a window of messages in flight, ids appear as messages are pushed."""
    requests = [message(0, node) for node in (1, 2, 3)]
    bound = intake.Requests(requests)
    pushed(requests[:1], 1)
    assert bound.bind(message(1, 0, reply_to=request_id(1, 1))) == 1
    with pytest.raises(codec.PayloadError, match="answers no request"):
        bound.bind(message(3, 0, reply_to=request_id(1, 3)))  # not pushed yet
    pushed(requests[1:], 1)
    assert bound.bind(message(3, 0, reply_to=request_id(1, 3))) == 3
    assert bound.bind(message(2, 0, reply_to=request_id(1, 2))) == 2
    assert bound.answered == 3


# -- federated evaluation -------------------------------------------------------------
def _evaluation(nodes=(1, 2, 3, 4, 5, 6)) -> tuple[ServerRound, list[Message]]:
    """A server whose round 3 asked ``nodes`` to evaluate; the requests, pushed."""
    server = _server(nodes=nodes)
    start_round(server, nodes, server_round=3)
    return server, pushed(server.evaluation_requests(3, ConfigRecord()), 3, "evaluate")


def test_aggregate_evaluation_weighted_mean_sd_and_loss(caplog):
    server, asked = _evaluation()
    replies = [EvaluateReply(0, 10, 0.5, 1.0).to_message(asked[0]),
               EvaluateReply(1, 30, 0.9, 0.2).to_message(asked[1]),
               EvaluateReply(2, 60, 0.7, 0.4).to_message(asked[2]),
               EvaluateReply(3, 50, 1.5, 0.1).to_message(asked[3]),  # accuracy > 1
               EvaluateReply(4, 50, 0.5, math.nan).to_message(asked[4]),  # NaN loss
               Message(Error(code=1, reason="boom"), reply_to=asked[5])]
    with caplog.at_level("WARNING"):
        metrics = server.aggregate_evaluation(3, replies, "personal")
    # mean 0.74; SD² = (10·0.24² + 30·0.16² + 60·0.04²)/100 = 0.0144; loss 0.4
    assert metrics["personal_clients"] == 3
    assert metrics["personal_accuracy"] == pytest.approx(0.74, abs=1e-12)
    assert metrics["personal_accuracy_sd"] == pytest.approx(0.12, abs=1e-12)
    assert metrics["personal_loss"] == pytest.approx(0.4, abs=1e-12)
    for request in asked[3:]:
        node = request.metadata.dst_node_id
        assert f"evaluation reply from node {node} rejected" in caplog.text
    assert "accuracy" in caplog.text and "loss" in caplog.text


def test_aggregate_evaluation_of_a_primary_metric_other_than_accuracy(caplog):
    """An instruction-tuning run's replies carry exact match as ``primary``;
    one without it (an older node) is rejected, not read as accuracy."""
    server, asked = _evaluation((1, 2, 3))
    replies = [EvaluateReply(0, 10, 0.9, 1.0, primary=0.2).to_message(asked[0]),
               EvaluateReply(1, 30, 0.9, 2.0, primary=0.6).to_message(asked[1]),
               EvaluateReply(2, 30, 0.9, 2.0).to_message(asked[2])]
    with caplog.at_level("WARNING"):
        metrics = server.aggregate_evaluation(3, replies, "fed", "exact_match")
    assert metrics == pytest.approx({
        "fed_clients": 2, "fed_exact_match": 0.5, "fed_exact_match_sd": math.sqrt(0.03),
        "fed_loss": 1.75})
    assert "node 3 rejected: no exact_match" in caplog.text


def test_aggregate_evaluation_without_valid_replies():
    server, asked = _evaluation()
    metrics = server.aggregate_evaluation(
        3, [EvaluateReply(0, 10, 2.0, 0.1).to_message(asked[0])], "fed")
    assert metrics == {"fed_clients": 0}


def test_an_evaluation_reply_counts_once_and_only_for_its_own_request(caplog):
    server, asked = _evaluation((1, 2))
    twice = EvaluateReply(0, 10, 0.5, 1.0).to_message(asked[0])
    training = message(2, 0, EvaluateReply(1, 10, 0.9, 1.0).to_message(asked[1]).content,
                       reply_to=request_id(3, 2))  # answers round 3's training request
    with caplog.at_level("WARNING"):
        metrics = server.aggregate_evaluation(3, [twice, twice, training], "fed")
    assert metrics["fed_clients"] == 1 and metrics["fed_accuracy"] == 0.5
    node = asked[0].metadata.dst_node_id
    assert f"evaluation reply from node {node} rejected: a second reply" in caplog.text
    assert "evaluation reply from node 2 rejected: it answers no request" in caplog.text


# -- requests ---------------------------------------------------------------------------
def test_a_strategy_can_send_each_node_its_own_download():
    """``download_for(plan)`` is per node: each node gets (and is judged
    against) its own start, here the global scaled by its partition."""
    class PerNode(FedAvgLoRA):
        def download_for(self, plan):
            start = {n: v * np.float32(plan.partition_id + 1) for n, v in self.sent.items()}
            return start, codec.encode(start)

    rng = np.random.default_rng(11)
    state = random_adapter(rng)
    server = ServerRound(PerNode(strategy_config("fedavg"), state))
    strategy = server.strategy
    messages = ask(server).values()
    sent = {m.metadata.dst_node_id: codec.decode(Request.from_message(m).payload,
                                                 adapter_shapes()) for m in messages}
    assert sorted(sent) == list(NODES)
    for node, plan in server.plans.items():
        name = "m.q.lora_A.weight"
        np.testing.assert_array_equal(sent[node][name], state[name] * (plan.partition_id + 1))
        # a reply that sends only part back is completed from that node's own start
        update = ClientUpdate(node, plan.partition_id, plan.rank, 1.0, {})
        factors = strategy.client_factors(update)
        np.testing.assert_array_equal(factors[name], sent[node][name])


# -- the record and the state ------------------------------------------------------------
def test_the_record_is_the_metrics_row():
    server = _server(attack="scale", **{"attack-fraction": 0.2})
    start_round(server, ASKED)
    record = server.aggregate_train(1, _honest(server, _uploads(5)))
    row = record.to_dict()
    assert list(row)[:10] == ["round", "accuracy", "loss", "epsilon", "sampled", "missing",
                              "clients", "rejected", "declined", "uplink_bytes"]
    assert "clipped" not in row
    assert record.attackers is not None and row["attackers"] == record.attackers
    assert row["updated"] is True and row["agg_residual"] == record.agg_residual
    assert list(row)[-2:] == ["updated", "seconds"]


def test_state_dict_is_what_a_checkpoint_holds_and_goes_on_the_same():
    """A server restored from another's ``state_dict`` (through a Checkpoint)
    makes the same next round, byte for byte."""
    name = "cellm"
    keys = {"strategy": name, "cellm-server-optimizer": "adam", "cellm-up-density": 1.0}
    one, two = _server(**keys), _server(**keys)
    for server_round in (1, 2):
        start_round(one, ASKED, server_round)
        aggregate(one, _honest(one, _uploads(server_round), server_round), server_round)
    state = one.state_dict()
    assert set(state) == set(SERVER_STATE) and state["round"] == 2
    saved = Checkpoint(run_id="r", lineage="l", **state)
    two.load_state_dict(saved.server_state())
    results = []
    for server in (one, two):
        start_round(server, ASKED, 3)
        results.append(aggregate(server, _honest(server, _uploads(3), 3), 3)[0])
    assert all(results[0][n].tobytes() == results[1][n].tobytes() for n in SHAPES)
    assert strategies()[name] is type(two.strategy)


def test_a_round_with_no_nodes_asked_changes_nothing():
    server = _server()
    record = server.aggregate_train(1, [])
    assert (record.sampled, record.clients, record.updated) == (0, 0, False)
