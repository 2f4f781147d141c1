"""The one process-tree stopper (fedlora.runtime.stopping.stop_tree, tree_of):
SIGTERM, the grace, SIGKILL for what ignored it, and a tree found from its
root. Plain sleeping Python children, a second or two."""

from __future__ import annotations

import subprocess
import sys
import time

import psutil
import pytest

from fedlora.runtime.stopping import stop_tree, tree_of

pytestmark = pytest.mark.e2e  # each test starts real processes

STUBBORN = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
POLITE = "import time; time.sleep(60)"
PARENT = ("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', "
          "'import time; time.sleep(60)']); time.sleep(60)")


def _start(code: str) -> subprocess.Popen:
    child = subprocess.Popen([sys.executable, "-c", code])
    time.sleep(0.5)  # let it install its handler
    return child


def test_stop_tree_terminates_then_kills_what_ignored_it():
    polite, stubborn = _start(POLITE), _start(STUBBORN)
    tree = [psutil.Process(polite.pid), psutil.Process(stubborn.pid)]
    started = time.monotonic()
    killed = stop_tree(tree, 1.0)
    assert [p.pid for p in killed] == [stubborn.pid]
    assert time.monotonic() - started < 5
    assert [p.returncode for p in tree] == [-15, -9]  # psutil reaped them
    assert stop_tree(tree, 1.0) == []  # already gone: no error, nothing to kill


def test_tree_of_finds_the_descendants_and_nothing_once_gone():
    parent = _start(PARENT)
    deadline = time.monotonic() + 10
    while len(tree := tree_of(parent.pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert tree[0].pid == parent.pid and len(tree) == 2
    assert stop_tree(tree, 5.0) == []
    assert not any(p.is_running() for p in tree)
    parent.wait(5)
    assert tree_of(parent.pid) == []
