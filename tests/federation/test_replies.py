"""The round's message flow (fedlora.federation.replies): every reply comes back, at most
``in_flight`` messages are outstanding, and missing replies are given up.

The grid here is a stand-in that answers each pushed message on the next
pull: the flow control is what is under test (real SuperLinks serve it in
test_simulation, test_scale and test_flwr_run)."""

from __future__ import annotations

import time

import fakes
import pytest
from flwr.app import Message

from fedlora.federation.replies import replies_as_they_arrive


def _message(node: int) -> Message:
    return fakes.message(0, node)


class AnsweringGrid:
    """Answers every pushed message on the next pull, except for ``silent`` nodes."""

    def __init__(self, silent: frozenset[int] = frozenset()) -> None:
        self.silent = silent
        self.outstanding: dict[str, int] = {}
        self.most_outstanding = 0
        self.pushed = 0

    def push_messages(self, messages):
        ids = []
        for message in messages:
            self.pushed += 1
            ids.append(f"m{self.pushed}")
            self.outstanding[ids[-1]] = message.metadata.dst_node_id
        self.most_outstanding = max(self.most_outstanding, len(self.outstanding))
        return ids

    def pull_messages(self, message_ids):
        replies = []
        for message_id in list(message_ids):
            node = self.outstanding.get(message_id)
            if node is None or node in self.silent:
                continue
            del self.outstanding[message_id]
            replies.append(fakes.message(node, 0, message_id=f"r{message_id}",
                                   reply_to=message_id))
        return replies


@pytest.mark.parametrize("in_flight, most", [(0, 25), (3, 3), (40, 25)])
def test_every_reply_arrives_within_the_window(in_flight, most):
    grid = AnsweringGrid()
    replies = list(replies_as_they_arrive(grid, [_message(n) for n in range(25)], 60.0,
                                          in_flight))
    assert sorted(r.metadata.src_node_id for r in replies) == list(range(25))
    assert grid.most_outstanding == most


def test_missing_replies_are_given_up_after_the_timeout(caplog):
    grid = AnsweringGrid(silent=frozenset({3}))
    started = time.monotonic()
    with caplog.at_level("WARNING"):
        replies = list(replies_as_they_arrive(grid, [_message(n) for n in range(6)], 0.3, 2))
    assert sorted(r.metadata.src_node_id for r in replies) == [0, 1, 2, 4, 5]
    assert time.monotonic() - started < 5
    assert "1 replies missing after 0 s" in caplog.text
