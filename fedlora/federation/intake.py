"""Taking in a round's replies: each bound to the request it answers, then
typed and checked against what its node was asked.

Binding: a reply counts only if its ``reply_to_message_id`` is the id of one
of this round's requests (the link gives each request its id when it is
pushed: ``Grid.push_messages`` sets it on the message itself), only if it
comes from the node that request went to (or from the SuperLink answering
for it), and only the first time: a second reply to one request is a
duplicate. Flower's link refuses a second reply to one request today, but
nothing of ours relied on that, and a reply sent three times was folded
three times (issue #28: 24× an honest step under trimmed mean). Each planned
client gets exactly one request a round, so this is at most one reply per
planned client per round.

A reply that fails to bind, type, or decode raises ``codec.PayloadError``
with the reason; the round logs it ("reply from node N rejected: …"), counts
it and never folds it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from flwr.app import Message
from flwr.common.constant import SUPERLINK_NODE_ID

from fedlora.strategies.base import Plan
from fedlora.strategies.ranks import shapes_at
from fedlora.strategies.sums import ClientUpdate
from fedlora.wire import codec
from fedlora.wire.basedelta import BaseLedger
from fedlora.wire.messages import TrainReply


class Requests:
    """One phase's requests (a round's training, or its evaluation), by the
    id the link gave each at push; each client a request asks may be
    answered once. A request asks one client (its node), or a cohort's
    (``cohorts``: the node ids of each message's clients, in order)."""

    def __init__(self, messages: Iterable[Message] = (),
                 cohorts: Iterable[tuple[int, ...]] | None = None) -> None:
        self.messages = list(messages)
        self.cohorts = list(cohorts) if cohorts is not None else None
        self._by_id: dict[str, int] = {}  # message id → index in messages
        self._indexed = 0  # messages[:_indexed] are in _by_id
        self._answered: set[tuple[str, int]] = set()  # (request id, client's node)

    def __len__(self) -> int:
        """The clients asked."""
        if self.cohorts is None:
            return len(self.messages)
        return sum(len(cohort) for cohort in self.cohorts)

    @property
    def answered(self) -> int:
        """Clients a reply was bound to."""
        return len(self._answered)

    def _index(self, reply: Message) -> int | None:
        """The index of the request of this phase that ``reply`` answers, or
        None. Ids are read when needed: with a window of messages in flight
        (``fedlora.federation.replies``) some are pushed after others are
        answered. They are pushed in order, so the ids are read on from where
        the last look stopped (a round's lookups cost O(messages) in all);
        only a reply that still matches nothing makes a look at them all."""
        answers = reply.metadata.reply_to_message_id
        if not answers:
            return None
        while answers not in self._by_id and self._indexed < len(self.messages):
            message = self.messages[self._indexed]
            if not message.metadata.message_id:
                self._by_id.update({m.metadata.message_id: i
                                    for i, m in enumerate(self.messages)
                                    if m.metadata.message_id})
                break
            self._by_id[message.metadata.message_id] = self._indexed
            self._indexed += 1
        return self._by_id.get(answers)

    def asked(self, reply: Message) -> Message | None:
        """The request of this phase that ``reply`` answers, or None."""
        index = self._index(reply)
        return self.messages[index] if index is not None else None

    def node_of(self, reply: Message) -> int:
        """The node a reply is about. The SuperLink answers for a node that
        stopped responding, as node ``SUPERLINK_NODE_ID``; that node is found
        by the message the answer replies to."""
        if reply.metadata.src_node_id != SUPERLINK_NODE_ID:
            return reply.metadata.src_node_id
        asked = self.asked(reply)
        return asked.metadata.dst_node_id if asked is not None else SUPERLINK_NODE_ID

    def bind(self, reply: Message) -> int:
        """The node whose request ``reply`` answers, that request now
        answered; ``PayloadError`` when it answers none of this phase's
        requests, another node's, or one already answered."""
        asked, _ = self.cohort_of(reply)
        node = asked.metadata.dst_node_id
        self.claim(asked, node)
        return node

    def cohort_of(self, reply: Message) -> tuple[Message, tuple[int, ...]]:
        """The request ``reply`` answers and the clients (node ids) it asked,
        none of them answered yet by this; ``PayloadError`` when it answers
        none of this phase's requests, or one sent to another node."""
        index = self._index(reply)
        if index is None:
            raise codec.PayloadError("it answers no request of this round (stale or forged)")
        asked = self.messages[index]
        node = asked.metadata.dst_node_id
        if reply.metadata.src_node_id not in (node, SUPERLINK_NODE_ID):
            raise codec.PayloadError(f"it answers the request sent to node {node}")
        return asked, (self.cohorts[index] if self.cohorts is not None else (node,))

    def claim(self, asked: Message, node: int) -> None:
        """Mark the client ``node`` of request ``asked`` answered;
        ``PayloadError`` when it was already (a duplicate)."""
        key = (asked.metadata.message_id, node)
        if key in self._answered:
            raise codec.PayloadError("a second reply to one request (duplicate)")
        self._answered.add(key)


def typed_reply(node: int, message: Message, base: BaseLedger | None,
                index: int | None = None) -> TrainReply:
    """The typed reply. For a strategy that changes the base, one that
    trained on another base version than the one sent is refused, and a
    failed node is sent every change again next time (it may have lost what
    it held). ``index``: client ``index``'s reply in a cohort reply."""
    try:
        reply = TrainReply.from_message(message, index)
        if base is not None and reply.base_version != base.version:
            raise codec.PayloadError(f"trained on base version {reply.base_version}, "
                                     f"not {base.version}")
    except codec.PayloadError:
        if base is not None:
            base.forget(node)
        raise
    if base is not None:
        base.acknowledge(node, reply.base_version)
    return reply


def decode_update(plan: Plan, reply: TrainReply, upload_shapes: Mapping[str, tuple[int, ...]],
                  dtype: str) -> ClientUpdate:
    """The update in ``reply``, validated against what ``plan``'s node was
    asked (its rank's shapes, the run's upload precision)."""
    tensors = codec.decode(reply.payload, shapes_at(upload_shapes, plan.rank), dtype)
    return ClientUpdate(plan.node_id, plan.partition_id, plan.rank,
                        float(reply.num_examples), tensors, reply.train_loss,
                        reply.compute_seconds)
