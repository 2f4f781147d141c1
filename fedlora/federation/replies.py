"""One round's messages out and replies in, as a stream.

``Grid.send_and_receive`` returns a round's replies all at once; this module
yields each reply as soon as it is pulled, so the strategy decodes, folds in
and drops it while the other clients are still training (the server never
holds a round's replies), and it can keep only a few messages outstanding.

Why the window: Flower's simulation engine (``flwr.server.superlink.fleet.vce``)
polls every 0.1 s, for every node, the outstanding messages, scanning all of
them each time. With all K of a round's messages outstanding that is K × K
checks per poll: at 500 clients it keeps one of the driver's cores busy,
the core the clients needed. ``fedlora simulate`` therefore keeps a few
messages per Ray worker outstanding (the workers could not run more at once
anyway); in deployment every message goes out at once (``in_flight=0``).

The loop never blocks shutdown: it waits on ``fedlora.runtime.stopping``'s stop
request, not a plain sleep, and ends with ``Interrupted`` when one comes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from itertools import islice

from flwr.app import Message
from flwr.serverapp import Grid

from fedlora.runtime.stopping import raise_if_stopped, wait

PULL_INTERVAL_S = 0.05  # how often the SuperLink is asked for new replies
LOGGER = logging.getLogger("fedlora.server")


def replies_as_they_arrive(grid: Grid, messages: Iterable[Message], timeout: float,
                           in_flight: int = 0) -> Iterator[Message]:
    """Push ``messages`` (at most ``in_flight`` outstanding at a time; 0 = all at
    once) and yield each reply as soon as it is pulled. Replies still missing
    after ``timeout`` seconds are given up (logged)."""
    waiting = iter(messages)
    pending: set[str] = set()

    def top_up() -> None:
        while in_flight == 0 or len(pending) < in_flight:
            batch = list(islice(waiting, in_flight - len(pending) if in_flight else None))
            if not batch:
                return
            pending.update(grid.push_messages(batch))

    raise_if_stopped()
    top_up()
    deadline = time.monotonic() + timeout
    while pending:
        replies = list(grid.pull_messages(pending))
        for reply in replies:
            pending.discard(reply.metadata.reply_to_message_id)
        top_up()
        yield from replies
        del replies
        if pending and time.monotonic() >= deadline:
            LOGGER.warning("%d replies missing after %.0f s; the round goes on without them",
                           len(pending), timeout)
            return
        if pending:
            wait(PULL_INTERVAL_S)
