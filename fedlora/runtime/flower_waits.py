"""Flower's fixed waits on a message's path, shortened where fedlora polls.

Flower 1.41 waits in fixed steps that no flag or variable sets:

- a SuperNode that finds no message sleeps 3 s before asking again, and
  checks for its ClientApp's reply every 0.5 s
  (``flwr.supernode.start_client_internal``);
- whoever pulls a message whose objects (our payload) are still being
  uploaded retries after a backoff that starts at 1 s: the SuperNode pulling
  a request (same module), the ServerApp pulling a reply
  (``flwr.superlink.grid.http_grid``). A message becomes visible before its
  objects are uploaded, so the faster one polls, the more often one lands
  in that gap: with fedlora's 0.05 s reply loop it cost about 1 s in most
  rounds of a warm deployment (BENCHMARKS.md, "Deployment");
- the simulation engine's threads wait for work on queues in 1 s steps and
  look at the stop flag only between them
  (``flwr.server.superlink.fleet.vce.vce_api``): every simulation ended up
  to a second after its ServerApp had finished;
- the same engine's message thread asks every virtual node for a message
  every 0.1 s, and each ask checks every stored message: at 500 nodes that
  thread was half of the driver's CPU mid-round (BENCHMARKS.md, "Scale").

Each function below changes one Flower module's own reference (its ``time``,
its ``pull_objects``, its ``Queue``, its ``add_messages_to_queue``) and
leaves the rest of Flower alone. flwr is pinned
(pyproject.toml); ``tests/test_flower_waits.py`` fails if an upgrade moves
these waits.
"""

from __future__ import annotations

import functools
import queue
import time
import types
from collections.abc import Callable

from flwr.supercore.constant import PULL_INITIAL_BACKOFF as FLOWER_OBJECT_BACKOFF_S
from flwr.supercore.inflatable import inflatable_utils


def capped_time(poll_s: float) -> types.ModuleType:
    """A stand-in for the ``time`` module whose ``sleep`` lasts at most ``poll_s``."""
    proxy = types.ModuleType("time", f"time, with sleep capped at {poll_s} s (fedlora)")
    proxy.__dict__.update({name: getattr(time, name) for name in dir(time)
                           if not name.startswith("__")})
    proxy.sleep = lambda seconds: time.sleep(min(seconds, poll_s))
    return proxy


def capped_queue(poll_s: float) -> type[queue.Queue]:
    """A ``queue.Queue`` whose timed ``get`` waits at most ``poll_s``."""

    class CappedQueue(queue.Queue):
        def get(self, block: bool = True, timeout: float | None = None):
            return super().get(block, timeout if timeout is None else min(timeout, poll_s))

    return CappedQueue


def _quicker_object_pulls(module: types.ModuleType, initial_backoff_s: float) -> None:
    """``module``'s object pulls retry after ``initial_backoff_s`` (doubling, as
    Flower's, up to its cap) instead of 1 s."""
    module.pull_objects = functools.partial(inflatable_utils.pull_objects,
                                            initial_backoff=initial_backoff_s)


def shorten_node_waits(poll_s: float) -> None:
    """In this process's SuperNode loop: no wait longer than ``poll_s`` between
    asks for a message or a reply, and object retries from ``poll_s`` on (from
    Flower's 1 s when that is shorter)."""
    from flwr.supernode import start_client_internal as node_loop

    node_loop.time = capped_time(poll_s)
    _quicker_object_pulls(node_loop, min(poll_s, FLOWER_OBJECT_BACKOFF_S))


def shorten_server_waits(poll_s: float) -> None:
    """In this process's ServerApp grid: object retries from ``poll_s`` on (the
    reply loop polls that often, ``fedlora.federation.replies``)."""
    from flwr.superlink.grid import http_grid

    _quicker_object_pulls(http_grid, poll_s)


def shorten_simulation_waits(poll_s: float) -> None:
    """In this process's simulation engine: its threads see the end of a run
    within ``poll_s`` (Flower's queue waits are 1 s)."""
    from flwr.server.superlink.fleet.vce import vce_api

    vce_api.Queue = capped_queue(poll_s)


def waiting_nodes_sweep(poll_s: float) -> Callable:
    """A stand-in for Flower's ``vce_api.add_messages_to_queue`` (the thread
    that hands each virtual node its next message) that asks only the nodes
    with a message waiting, every ``poll_s``.

    Flower asks every node in turn, and each ask
    (``InMemoryLinkState.get_message_ins``) checks every stored message: K
    nodes × the messages in flight per sweep. Here the nodes to ask are read
    once per sweep from the in-memory state's store, under its lock, and
    each is asked, in Flower's order, with Flower's own ``get_message_ins``
    (its checks and its marking as delivered unchanged). A state without
    that store gets Flower's loop."""
    from flwr.server.superlink.fleet.vce import vce_api

    flower_loop = getattr(vce_api.add_messages_to_queue, "flower_loop",
                          vce_api.add_messages_to_queue)

    def add_messages_to_queue(state, queue, nodes_mapping, f_stop) -> None:
        store = getattr(state, "message_ins_store", None)
        if not isinstance(store, dict) or not hasattr(state, "lock"):
            flower_loop(state, queue, nodes_mapping, f_stop)
            return
        while not f_stop.is_set():
            with state.lock:
                waiting = {message.metadata.dst_node_id for message in store.values()
                           if message.metadata.delivered_at == ""}
            for node_id in nodes_mapping:
                if node_id in waiting:
                    for message in state.get_message_ins(node_id=node_id, limit=1):
                        queue.put(message)
            f_stop.wait(poll_s)

    add_messages_to_queue.flower_loop = flower_loop
    return add_messages_to_queue


def lighten_simulation_polling(poll_s: float) -> None:
    """In this process's simulation engine: only virtual nodes with a
    message waiting are asked for it, every ``poll_s``."""
    from flwr.server.superlink.fleet.vce import vce_api

    vce_api.add_messages_to_queue = waiting_nodes_sweep(poll_s)
