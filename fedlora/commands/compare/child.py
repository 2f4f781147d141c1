"""One child simulation, run with its output in a log, and the signals that
stop the comparison passed on to it (the package docstring says how)."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import psutil

from fedlora.runtime.stopping import stop_tree, tree_of

SIGNALS = (signal.SIGINT, signal.SIGTERM)
CHILD_STOP_S = 15.0  # how long a signalled child gets (it needs a few seconds) before SIGKILL


class CompareInterrupted(Exception):
    """SIGINT or SIGTERM arrived while a child ran; it has exited."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class _Forward:
    """The SIGINT/SIGTERM handler while a child runs: remembers the first
    signal and passes each one on to the child. The child's processes are
    listed at the first one, so that those it leaves behind can be killed."""

    def __init__(self) -> None:
        self.child: subprocess.Popen | None = None
        self.signum: int | None = None
        self.tree: list[psutil.Process] = []

    def __call__(self, signum: int, frame: object) -> None:
        if self.signum is None:
            self.signum = signum
        if self.child is not None:
            self.send(signum)

    def send(self, signum: int) -> None:
        if not self.tree:
            self.tree = tree_of(self.child.pid)
        self.child.send_signal(signum)  # a no-op once it has exited

    def kill(self) -> None:
        """The child took too long: kill it and every process of its tree."""
        stop_tree({*self.tree, *tree_of(self.child.pid)})


def run_child(command: list[str], log: Path, append: bool = False) -> int:
    """Run one simulation with its output in ``log`` (a line per round would
    flood the terminal); returns its exit code, or raises
    ``CompareInterrupted`` once the child has exited if SIGINT or SIGTERM
    arrived meanwhile (see the module docstring)."""
    forward = _Forward()
    previous = {sig: signal.signal(sig, forward) for sig in SIGNALS}
    try:
        with open(log, "a" if append else "w") as handle:
            forward.child = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL)
            if forward.signum is not None:  # it came while the child was starting
                forward.send(forward.signum)
            code = _wait(forward)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if forward.signum is not None:
        raise CompareInterrupted(forward.signum)
    return code


def _wait(forward: _Forward) -> int:
    """The child's exit code; after a signal it gets ``CHILD_STOP_S`` to exit.
    (A plain ``wait()`` would go on waiting after the handler ran.)"""
    deadline = None
    while True:
        try:
            return forward.child.wait(timeout=0.5)
        except subprocess.TimeoutExpired:
            if forward.signum is None:
                continue
            deadline = deadline or time.monotonic() + CHILD_STOP_S
            if time.monotonic() > deadline:
                forward.kill()
                return forward.child.wait()
