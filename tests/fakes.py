"""Stand-ins the unit tests share: a grid that lists nodes, and the messages
a ServerApp and its nodes exchange, built without a SuperLink.

Replies are made by the same typed schema the client loop uses
(``fedlora.wire.messages``), so a test's reply is what a real node would send; a
malformed one is built from raw records with ``message``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from uuid import uuid4

import numpy as np
from flwr.app import ConfigRecord, Context, Error, Message, Metadata, RecordDict
from flwr.app.message.message import make_message
from flwr.common import MessageType

from fedlora.wire import codec
from fedlora.wire.messages import Request, Task, TrainReply

SERVER = 0  # the node id the ServerApp's messages come from in these tests


@contextmanager
def server_identity() -> Iterator[None]:
    """Messages take their ids from Flower's task identity, which a ServerApp
    sets: code that builds server messages outside one runs under this."""
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    fields = ("_task_id", "_run_id", "_node_id")
    before = [getattr(TaskIdentity, name) for name in fields]
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 3, 7, SUPERLINK_NODE_ID
    try:
        yield
    finally:
        for name, value in zip(fields, before, strict=True):
            setattr(TaskIdentity, name, value)


class Grid:
    """A grid that lists ``ids`` as the connected nodes (enough for sampling)."""

    def __init__(self, ids: Iterable[int]) -> None:
        self.ids = list(ids)

    def get_node_ids(self) -> list[int]:
        return list(self.ids)


def message(src: int, dst: int, content: RecordDict | None = None,
            error: Error | None = None, *, message_id: str = "", reply_to: str = "",
            group: str = "1", message_type: str = "train", run_id: int = 1) -> Message:
    """A message with the metadata a SuperLink would have given it."""
    metadata = Metadata(run_id=run_id, message_id=message_id, src_node_id=src,
                        dst_node_id=dst, reply_to_message_id=reply_to, group_id=group,
                        created_at=time.time(), ttl=3600.0, message_type=message_type)
    if error is not None:
        return make_message(metadata=metadata, error=error)
    return make_message(metadata=metadata, content=content or RecordDict())


def request(node: int, config: Mapping, task: Task, payload: bytes,
            message_id: str = "q") -> Message:
    """The training request the server sends ``node`` (``fedlora.wire.messages.Request``)."""
    with server_identity():
        content = Request(dict(config), task, payload).to_message(node).content
    return message(SERVER, node, content, message_id=message_id,
                   group=str(task.server_round))


def request_id(server_round: int, node: int, phase: str = "train") -> str:
    """The id these tests' link gives the ``phase`` request of ``server_round``
    to ``node`` (a real link gives a random or content-derived one)."""
    return f"{phase}-{server_round}-{node}"


def pushed(messages: Iterable[Message], server_round: int,
           phase: str = "train") -> list[Message]:
    """``messages`` with the ids a link gives them at push: Flower's grids set
    the id on the message itself (``Grid.push_messages``), and the server
    binds each reply to the request it answers by that id."""
    messages = list(messages)
    for m in messages:
        m.metadata.__dict__["_message_id"] = request_id(server_round, m.metadata.dst_node_id,
                                                        phase)
    return messages


def train_reply(node: int, upload: Mapping, examples: float, loss: float = 0.0,
                partition: int = 0, server_round: int = 1) -> Message:
    """A node's training reply with ``upload`` (``codec.encode``d) trained on
    ``examples`` examples, answering the request ``start_round`` sent it for
    ``partition`` in ``server_round``."""
    asked = request(node, {}, Task(server_round, partition, 0), b"",
                    message_id=request_id(server_round, node))
    return TrainReply(partition, examples, loss, payload=codec.encode(dict(upload))
                      ).to_message(asked)


def start_round(server, nodes: Iterable[int], server_round: int = 1) -> list[Message]:
    """A ``ServerRound``'s training requests over a grid of exactly ``nodes``,
    all of which must be asked (clients-per-round = their number), pushed:
    the server then expects a reply from each."""
    nodes = list(nodes)
    with server_identity():
        messages = server.train_requests(server_round, ConfigRecord({}), Grid(nodes))
    assert sorted(m.metadata.dst_node_id for m in messages) == sorted(nodes)
    return pushed(messages, server_round)


def aggregate(server, replies: Iterable[Message], server_round: int = 1
              ) -> tuple[dict[str, np.ndarray] | None, dict]:
    """``aggregate_train``: (the new global adapter, None when the round left
    it unchanged; the round's metrics.jsonl row)."""
    record = server.aggregate_train(server_round, replies)
    return (server.adapter if record.updated else None), record.to_dict()


def partition_of(server, node: int) -> int:
    """The partition the server asked ``node`` to train this round."""
    return server.plans[node].partition_id


# -- adapters the strategy tests share ------------------------------------------
SMALL_SHAPES = {
    "m.q.lora_A.weight": (4, 6), "m.q.lora_B.weight": (5, 4),
    "m.v.lora_A.weight": (4, 6), "m.v.lora_B.weight": (5, 4),
    "m.classifier.weight": (3, 5), "m.classifier.bias": (3,),
}


def random_state(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in SMALL_SHAPES.items()}


WIDE_RANK = 3
WIDE_SHAPES = {
    "m.q.lora_A.weight": (WIDE_RANK, 7), "m.q.lora_B.weight": (6, WIDE_RANK),
    "m.v.lora_A.weight": (WIDE_RANK, 7), "m.v.lora_B.weight": (6, WIDE_RANK),
    "m.classifier.weight": (4, 6),
}


def wide_state(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Entries spread over ten orders of magnitude: float sums of these depend
    on the order of the terms."""
    return {n: (rng.standard_normal(s) * 10.0 ** rng.integers(-6, 4, s)).astype(np.float32)
            for n, s in WIDE_SHAPES.items()}


def round_replies(server, rng: np.random.Generator) -> list[Message]:
    """Each asked client's upload as its client half would make it, from a
    random adapter trained away from what it was sent (by node id)."""
    replies = []
    strategy = server.strategy
    role = strategy.roles
    for node, plan in sorted(server.plans.items()):
        trained = {**strategy.sent, **wide_state(rng)}
        if strategy.name == "cellm":
            upload = role.upload(strategy.sent, trained, RecordDict())
        else:
            upload = {n: trained[n] for n in strategy.upload_shapes}
        replies.append(train_reply(node, upload, int(rng.integers(1, 5000)),
                                   float(rng.random() * 3), plan.partition_id))
    return replies


class InProcessGrid:
    """Flower's Grid as the round loop uses it, whose nodes are this
    process's client loop: a pushed message is answered at once, each node
    keeping its own state between messages as a ClientApp's context does."""

    def __init__(self, nodes: list[int]) -> None:
        self.states = {node: RecordDict() for node in nodes}
        self.replies: dict[str, Message] = {}
        self.pushed: list[Message] = []  # every message pushed, in order

    def get_node_ids(self) -> list[int]:
        return list(self.states)

    def push_messages(self, messages) -> list[str]:
        from fedlora.node.client_loop import handle_evaluate, handle_train

        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = str(uuid4())  # as Flower's grids do
            node = message.metadata.dst_node_id
            context = Context(run_id=1, node_id=node, node_config={}, state=self.states[node],
                              run_config={})
            self.pushed.append(message)
            handler = (handle_train if message.metadata.message_type == MessageType.TRAIN
                       else handle_evaluate)
            self.replies[message.metadata.message_id] = handler(message, context)
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, ids) -> list[Message]:
        return [self.replies.pop(i) for i in list(ids) if i in self.replies]
