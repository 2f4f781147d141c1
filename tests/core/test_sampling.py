"""Which nodes a round asks, and who a reply is about.

A round samples ``clients-per-round`` of the connected nodes, all of them
when fewer are connected. The first round waits for ``clients-per-round``
nodes (the federation forms); later rounds only for ``min-clients``, so a
dead node cannot stall the rest of the run. The SuperLink answers for a node
that stopped responding; the rejection names that node, not the SuperLink.
The grid here is a stand-in listing node ids; the real SuperLink path runs in
test_deployment."""

from __future__ import annotations

import json

import fakes
import numpy as np
import pytest
from flwr.app import ConfigRecord, Error, Message
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message

from fedlora.federation import round as server_round
from fedlora.federation.loop import run_federation
from fedlora.federation.round import ServerRound
from fedlora.strategies import resolve
from fedlora.strategies.fedavg import FedAvgLoRA
from fedlora.wire.messages import TASK

pytestmark = pytest.mark.usefixtures("run_identity")

STATE = {"m.q.lora_A.weight": np.ones((2, 3), np.float32),
         "m.q.lora_B.weight": np.zeros((3, 2), np.float32)}


class NodeList:
    """A grid that only lists connected nodes: ``counts[i]`` on the i-th ask
    (the last one from then on)."""

    def __init__(self, *counts: int) -> None:
        self.counts = list(counts)
        self.asked = 0

    def get_node_ids(self):
        count = self.counts[min(self.asked, len(self.counts) - 1)]
        self.asked += 1
        return list(range(100, 100 + count))


def _server(**keys) -> ServerRound:
    return ServerRound(FedAvgLoRA(resolve({"num-clients": 10, "lora-rank": 2, **keys}), STATE))


def _round(server: ServerRound, grid: NodeList, server_round: int = 1):
    return server.train_requests(server_round, ConfigRecord({}), grid)


def test_a_round_asks_clients_per_round_distinct_connected_nodes():
    messages = _round(_server(**{"clients-per-round": 4}), NodeList(10))
    nodes = [m.metadata.dst_node_id for m in messages]
    assert len(nodes) == 4 == len(set(nodes)) and set(nodes) <= set(range(100, 110))
    assert all(m.content.config_records[TASK]["server-round"] == 1 for m in messages)


def _formed(**keys) -> ServerRound:
    """A server whose first round found all 5 nodes."""
    server = _server(**keys)
    _round(server, NodeList(5))
    return server


def test_fewer_connected_than_clients_per_round_asks_them_all(caplog):
    server = _formed(**{"clients-per-round": 4, "min-clients": 2})
    with caplog.at_level("WARNING"):
        messages = _round(server, NodeList(3), server_round=3)
    assert sorted(m.metadata.dst_node_id for m in messages) == [100, 101, 102]
    assert "round 3: 3 nodes connected, fewer than clients-per-round=4" in caplog.text


def test_the_first_round_waits_for_clients_per_round_nodes(monkeypatch, caplog):
    monkeypatch.setattr(server_round, "WAIT_FOR_NODES_S", 0.0)
    grid = NodeList(0, 2, 3, 6)
    server = _server(**{"clients-per-round": 4, "min-clients": 2})
    with caplog.at_level("WARNING"):
        messages = _round(server, grid)
    assert grid.asked == 4  # 0, 2 and 3 connected: wait; 6 connected: go
    nodes = [m.metadata.dst_node_id for m in messages]
    assert len(set(nodes)) == 4 and set(nodes) <= set(range(100, 106))
    assert "round 1: 3 nodes connected, waiting for clients-per-round=4" in caplog.text


def test_later_rounds_wait_only_for_min_clients_nodes(monkeypatch, caplog):
    monkeypatch.setattr(server_round, "WAIT_FOR_NODES_S", 0.0)
    server = _formed(**{"clients-per-round": 4, "min-clients": 2})
    grid = NodeList(0, 1, 2, 5)
    with caplog.at_level("WARNING"):
        messages = _round(server, grid, server_round=2)
    assert grid.asked == 3  # 0 and 1 connected: wait; 2 connected: go
    assert sorted(m.metadata.dst_node_id for m in messages) == [100, 101]
    assert "round 2: 1 nodes connected, waiting for min-clients=2" in caplog.text


def test_the_superlinks_answer_for_a_dead_node_names_that_node(caplog):
    server = _server(**{"clients-per-round": 3})
    messages = _round(server, NodeList(3))
    for number, message in enumerate(messages):  # what a grid does on push
        message.metadata.__dict__["_message_id"] = f"id-{number}"
    dead = messages[1]
    answer = create_message_error_unavailable_res_message(dead.metadata, "node_unavail")
    assert answer.metadata.src_node_id == SUPERLINK_NODE_ID
    with caplog.at_level("WARNING"):
        record = server.aggregate_train(1, [answer])
    assert not record.updated and record.rejected == 1 and record.missing == 2
    assert (f"round 1: reply from node {dead.metadata.dst_node_id} rejected: client failed: "
            "Error: Node Unavailable") in caplog.text


class SilentOrFailing:
    """A grid of ``nodes`` connected nodes: node 100 never answers, the others
    answer each message with a client error on the next pull."""

    def __init__(self, nodes: int) -> None:
        self.nodes = nodes
        self.outstanding: dict[str, Message] = {}

    def get_node_ids(self):
        return list(range(100, 100 + self.nodes))

    def push_messages(self, messages):
        """As Flower's grids do: each message gets its id, on itself too."""
        ids = []
        for message in messages:
            ids.append(f"id-{len(self.outstanding)}-{message.metadata.dst_node_id}")
            message.metadata.__dict__["_message_id"] = ids[-1]
            self.outstanding[ids[-1]] = message
        return ids

    def pull_messages(self, message_ids):
        replies = []
        for message_id in message_ids:
            asked = self.outstanding[message_id]
            if asked.metadata.dst_node_id == 100:
                continue
            replies.append(fakes.message(asked.metadata.dst_node_id, 0,
                                   error=Error(code=0, reason="ValueError: broken"),
                                   message_id=f"r-{message_id}", reply_to=message_id,
                                   run_id=7))
        return replies


def test_a_round_goes_on_without_a_node_that_never_answers(tmp_path, tiny_bert,
                                                           topic_dataset, caplog):
    """``round-timeout``: the server loop gives the silent node up, counts it
    as missing (beside the sampled, rejected and averaged ones) and the run
    finishes with its outputs."""
    config = resolve({"model": str(tiny_bert), "dataset": str(topic_dataset),
                      "num-clients": 3, "clients-per-round": 3, "rounds": 2,
                      "round-timeout": 0.5, "out-dir": str(tmp_path / "run")})
    with caplog.at_level("WARNING"):
        summary = run_federation(SilentOrFailing(3), config)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert [(r["sampled"], r["clients"], r["rejected"], r["missing"]) for r in rows] == [
        (3, 0, 2, 1), (3, 0, 2, 1)]
    assert not any(r["updated"] for r in rows)
    assert "1 replies missing after 0 s" in caplog.text
    assert summary["rounds"] == 2
