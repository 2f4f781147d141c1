"""Stopping a run on SIGINT or SIGTERM: promptly, completely, and resumably.

Why not Python's default: Ctrl-C raises ``KeyboardInterrupt`` in the main
thread only. In ``fedlora simulate`` the main thread waits inside Flower's
simulation engine while the round loop runs in a ServerApp thread, which
polled for replies forever after Ray was gone, so the process never ended.

What happens instead (``stop_on_signals``): the first signal sets
``STOP``. The round loop and the reply loop check it at every poll
(``raise_if_stopped``, ``wait``) and end with ``Interrupted``. A watchdog
thread gives the ServerApp ``SERVER_GRACE_S`` to get there, then stops Ray
and every process this one started, prints one line saying where the
partial results are and how to resume, and ends the process with 128 +
the signal's number (130 for SIGINT, 143 for SIGTERM). A second signal
skips the grace. Nothing here needs the round loop's cooperation to be
safe: checkpoints and client state are written atomically, so a run
stopped at any instant resumes from its last complete round.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import psutil

LOGGER = logging.getLogger(__name__)
STOP = threading.Event()  # set by the first SIGINT/SIGTERM of a stoppable command
SERVER_GRACE_S = 2.0  # how long the round loop gets to notice STOP
RAY_SHUTDOWN_S = 3.0  # how long ray.shutdown() may take before its processes are killed
KILL_WAIT_S = 2.0  # how long child processes get between SIGTERM and SIGKILL
SIGNALS = (signal.SIGINT, signal.SIGTERM)
_handler: Callable[[int, object], None] | None = None  # stop_on_signals's, while active


class Interrupted(Exception):
    """The run was asked to stop (SIGINT or SIGTERM)."""


def raise_if_stopped() -> None:
    if STOP.is_set():
        raise Interrupted("stop requested")


def wait(seconds: float) -> None:
    """Sleep ``seconds``, or until a stop is requested (then ``Interrupted``)."""
    if STOP.wait(seconds):
        raise Interrupted("stop requested")


def reclaim_signals() -> None:
    """Put the stop handler back: ``ray.init`` installs its own SIGTERM handler
    in the driver, which logs a stack and aborts (exit 134, no farewell)."""
    if _handler is not None:
        for sig in SIGNALS:
            signal.signal(sig, _handler)


def exit_code(signum: int) -> int:
    """The shell's convention: 128 + the signal's number."""
    return 128 + signum


def stop_children() -> None:
    """Stop every process this one started (a local Ray cluster among them),
    SIGTERM then SIGKILL; a remote Ray cluster (``ray-address``) is told to
    drop this driver's actors with ``ray.shutdown()``, given
    ``RAY_SHUTDOWN_S``. A local cluster is not asked: when a terminal's
    Ctrl-C has already reached it, ``ray.shutdown()`` waits on it in vain."""
    children = psutil.Process().children(recursive=True)
    if "ray" in sys.modules and not any(_is_ray_node(child) for child in children):
        import ray

        shutdown = threading.Thread(target=ray.shutdown, daemon=True)
        shutdown.start()
        shutdown.join(RAY_SHUTDOWN_S)
        children = psutil.Process().children(recursive=True)
    stop_tree(children)


def stop_tree(processes: Iterable[psutil.Process], grace_s: float = KILL_WAIT_S,
              sig: int = signal.SIGTERM) -> list[psutil.Process]:
    """Send ``sig`` (SIGTERM) to ``processes`` (a process tree: ``tree_of``),
    give them ``grace_s`` to end, then SIGKILL those still alive and wait as
    long again; returns those that needed the kill. A process already gone
    is no error. The one stopper of the library, ``fedlora compare``, the
    local deployment (``deploy/local.py``) and the tests."""
    processes = list(processes)
    for process in processes:
        try:
            process.send_signal(sig)
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(processes, timeout=grace_s)
    for process in alive:
        try:
            process.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=grace_s)
    return alive


def tree_of(pid: int) -> list[psutil.Process]:
    """``pid`` and its descendants (empty once it is gone)."""
    try:
        process = psutil.Process(pid)
        return [process, *process.children(recursive=True)]
    except psutil.Error:
        return []


def _is_ray_node(process: psutil.Process) -> bool:
    try:
        return process.name() in ("raylet", "gcs_server")
    except psutil.Error:
        return False


@contextmanager
def stop_on_signals(farewell: Callable[[int], str], server_done: threading.Event
                    ) -> Iterator[None]:
    """Handle SIGINT/SIGTERM as the module docstring says while the block runs.
    ``farewell(signum)`` is the line printed at the end (where the results
    are, how to resume); ``server_done`` is set when the round loop has ended
    (or never started)."""
    finished = threading.Lock()  # whoever holds it prints the farewell and exits
    received: list[int] = []  # the first signal's number

    def finish(signum: int, wait: bool = False) -> None:
        if not finished.acquire(blocking=wait):
            return
        stop_children()
        print(farewell(signum), file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(exit_code(signum))

    def watchdog(signum: int) -> None:
        server_done.wait(SERVER_GRACE_S)
        finish(signum)

    def handler(signum: int, frame) -> None:
        if STOP.is_set():  # a second signal: no more grace
            threading.Thread(target=finish, args=(signum,), daemon=True).start()
            return
        received.append(signum)
        STOP.set()
        # the errors of clients dying with the run (a terminal's Ctrl-C reaches
        # the Ray workers too) are expected now, not news
        logging.getLogger("flwr").setLevel(logging.CRITICAL)
        print(f"fedlora: {signal.Signals(signum).name} received, stopping",
              file=sys.stderr, flush=True)
        threading.Thread(target=watchdog, args=(signum,), daemon=True).start()

    global _handler
    STOP.clear()
    previous = {sig: signal.signal(sig, handler) for sig in SIGNALS}
    _handler = handler
    try:
        yield
    except BaseException:
        if not received:
            raise
        # the round loop ended with Interrupted, or Flower with what followed
        # it: the stop under way, not an error to print
    finally:
        if received:  # whichever thread gets here first exits; the other waits
            finish(received[0], wait=True)
        _handler = None
        for sig, old in previous.items():
            signal.signal(sig, old)
