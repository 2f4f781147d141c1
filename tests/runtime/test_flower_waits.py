"""Flower's fixed waits, shortened (``fedlora.runtime.flower_waits``, ``fedlora supernode``).

The deployment tests run ``fedlora supernode`` as the compose file's SuperNode
and the ServerApp with the shorter retry; these check what the patches rely
on in the pinned flwr, what they change, and the command's own flag.
"""

from __future__ import annotations

import inspect
import queue
import subprocess
import sys
import threading
import time
import types

import pytest
from flwr.server.superlink.fleet.vce import vce_api
from flwr.supercore.inflatable import inflatable_utils
from flwr.superlink.grid import http_grid
from flwr.supernode import start_client_internal as node_loop

from fedlora.runtime.flower_waits import (
    capped_time,
    lighten_simulation_polling,
    shorten_node_waits,
    shorten_server_waits,
    shorten_simulation_waits,
    waiting_nodes_sweep,
)


@pytest.fixture
def flower_restored(monkeypatch):
    """Whatever a test patches in Flower's modules is put back afterwards."""
    for module, name in ((node_loop, "time"), (node_loop, "pull_objects"),
                         (http_grid, "pull_objects"), (vce_api, "Queue"),
                         (vce_api, "add_messages_to_queue")):
        monkeypatch.setattr(module, name, getattr(module, name))


def test_flower_still_waits_where_the_patches_apply():
    """The SuperNode loop sleeps through its module's ``time`` (3 s idle, 0.5 s
    for a reply or an object) and both it and the ServerApp's grid pull
    objects through their module's ``pull_objects``. If an upgrade moves them
    the patches would silently stop working: this fails instead."""
    source = inspect.getsource(node_loop)
    assert node_loop.time is time
    assert source.count("time.sleep(3)") == 1 and source.count("time.sleep(0.5)") == 2
    assert node_loop.pull_objects is inflatable_utils.pull_objects
    assert http_grid.pull_objects is inflatable_utils.pull_objects
    assert "pull_objects(" in inspect.getsource(http_grid.HttpGrid.pull_messages)
    assert inspect.signature(inflatable_utils.pull_objects).parameters[
        "initial_backoff"].default == 1


def test_the_simulation_engine_still_waits_on_its_module_queues():
    """Flower's engine threads wait on ``Queue`` objects made by ``vce_api``
    itself, 1 s at a time, and look at the stop flag between waits: the patch
    replaces that module's ``Queue``."""
    source = inspect.getsource(vce_api)
    assert "from queue import Empty, Queue" in source  # (an in-process simulation
    # earlier in this process may have replaced the module's name already)
    assert issubclass(vce_api.Queue, queue.Queue)
    assert source.count("Queue()") == 2 and source.count("get(timeout=1.0)") == 2
    assert "while not f_stop.is_set():" in inspect.getsource(vce_api.worker)


def test_the_engine_still_asks_every_node_through_its_module_function():
    """Flower's engine starts its message thread with its module's
    ``add_messages_to_queue``, which asks every node for one message with
    the in-memory state's ``get_message_ins``; that state keeps its messages
    in ``message_ins_store`` behind ``lock``. The sweep relies on all four."""
    from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState

    assert "target=add_messages_to_queue" in inspect.getsource(vce_api.run_api)
    # (an in-process simulation earlier in this process may have replaced it already)
    flower_loop = getattr(vce_api.add_messages_to_queue, "flower_loop",
                          vce_api.add_messages_to_queue)
    assert flower_loop.__module__ == vce_api.__name__
    loop = inspect.getsource(flower_loop)
    assert "for node_id in nodes_mapping.keys():" in loop
    assert "state.get_message_ins(node_id=node_id, limit=1)" in loop
    init = inspect.getsource(InMemoryLinkState.__init__)
    assert "self.message_ins_store: dict[str, Message] = {}" in init
    assert "self.lock = " in init
    assert 'msg_ins.metadata.delivered_at == ""' in inspect.getsource(
        InMemoryLinkState.get_message_ins)


class _State:
    """The part of Flower's in-memory state the sweep reads: messages by id,
    a lock, and ``get_message_ins`` (here: the node's first undelivered
    message, marked delivered, and the run stopped once none is left)."""

    def __init__(self, destinations: dict[str, int], stop: threading.Event) -> None:
        self.lock = threading.RLock()
        self.message_ins_store = {
            message_id: types.SimpleNamespace(message_id=message_id, metadata=types.SimpleNamespace(
                dst_node_id=node, delivered_at="")) for message_id, node in destinations.items()}
        self.asked: list[int] = []
        self._stop = stop

    def get_message_ins(self, node_id: int, limit: int) -> list:
        self.asked.append(node_id)
        found = [m for m in self.message_ins_store.values()
                 if m.metadata.dst_node_id == node_id and m.metadata.delivered_at == ""][:limit]
        for message in found:
            message.metadata.delivered_at = "now"
        if all(m.metadata.delivered_at for m in self.message_ins_store.values()):
            self._stop.set()
        return found


def test_the_sweep_asks_only_the_nodes_with_a_message_waiting(flower_restored):
    """Of 500 virtual nodes, only those with an undelivered message are
    asked, in Flower's node order, one message each per sweep, until every
    message is in the engine's queue."""
    stop = threading.Event()
    state = _State({"a": 7, "b": 300, "c": 7, "d": 42}, stop)
    nodes = {node: node for node in range(500)}
    handed = queue.Queue()
    waiting_nodes_sweep(0.01)(state, handed, nodes, stop)
    assert state.asked == [7, 42, 300, 7]  # sweep 1: each waiting node once; sweep 2: node 7
    assert [handed.get_nowait().message_id for _ in range(4)] == ["a", "d", "b", "c"]
    lighten_simulation_polling(0.05)
    assert vce_api.add_messages_to_queue.flower_loop is not vce_api.add_messages_to_queue
    lighten_simulation_polling(0.05)  # again (a second simulation): still Flower's loop below
    assert "get_message_ins(node_id=node_id, limit=1)" in inspect.getsource(
        vce_api.add_messages_to_queue.flower_loop)


def test_a_capped_queue_gives_up_early_and_still_delivers(flower_restored):
    shorten_simulation_waits(0.05)
    waiting = vce_api.Queue()
    started = time.monotonic()
    with pytest.raises(queue.Empty):
        waiting.get(timeout=1.0)
    assert time.monotonic() - started < 0.5
    waiting.put("message")
    assert waiting.get(timeout=1.0) == "message"
    assert queue.Queue().get.__func__ is queue.Queue.get  # elsewhere untouched


def test_capped_time_caps_sleep_and_keeps_the_rest():
    proxy = capped_time(0.05)
    started = time.monotonic()
    proxy.sleep(3)
    assert time.monotonic() - started < 1.0
    assert proxy.monotonic is time.monotonic and proxy.time is time.time
    assert time.sleep is not proxy.sleep  # the real module is untouched


def test_the_node_and_server_waits_are_shortened_in_their_modules_only(flower_restored):
    shorten_node_waits(0.2)
    assert node_loop.time.sleep is not time.sleep
    assert node_loop.pull_objects.keywords == {"initial_backoff": 0.2}
    assert http_grid.pull_objects is inflatable_utils.pull_objects  # the server's untouched
    shorten_node_waits(3)  # Flower's idle wait: object retries stay at Flower's 1 s
    assert node_loop.pull_objects.keywords == {"initial_backoff": 1}
    shorten_server_waits(0.05)
    assert http_grid.pull_objects.keywords == {"initial_backoff": 0.05}
    assert http_grid.pull_objects.func is inflatable_utils.pull_objects


@pytest.mark.e2e
def test_a_poll_interval_out_of_range_is_one_line():
    done = subprocess.run([sys.executable, "-m", "fedlora", "supernode", "--poll-interval",
                           "5", "--insecure"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip() == ("fedlora supernode: error: --poll-interval 5: needs seconds "
                                   "in [0.01, 3]")
