"""``fedlora compare`` on SIGINT or SIGTERM: the signal reaches the running
child, the comparison stops there with 128 + the signal's number, and a child
that does not stop is killed with its processes.

The child is a small Python script standing in for ``fedlora simulate``
(``fedlora.commands.compare.simulate_command`` is replaced): it writes a file once its
handlers are installed, and the test signals this process when it sees that
file, as a user's ``kill`` or Ctrl-C would signal ``fedlora compare``.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from fedlora.commands import cli
from fedlora.commands import compare as cmp

pytestmark = pytest.mark.e2e

COMPARISON = """[base]
num-clients = 4
clients-per-round = 2
rounds = 2

[[run]]
label = "first"
group = "g"

[[run]]
label = "second"
group = "g"
"""
# argv: ready file, record file, "obey" (exit 128 + signal) or "ignore" (record it,
# go on; with a grandchild that must not outlive it)
CHILD = r"""
import os, signal, subprocess, sys, time
ready, record, obey = sys.argv[1], sys.argv[2], sys.argv[3] == "obey"
def handler(signum, frame):
    with open(record, "a") as handle:
        handle.write(f"{signum}\n")
    if obey:
        os._exit(128 + signum)
for sig in (signal.SIGINT, signal.SIGTERM):
    signal.signal(sig, handler)
note = "" if obey else str(subprocess.Popen([sys.executable, "-c",
                                             "import time; time.sleep(60)"]).pid)
with open(ready + ".tmp", "w") as handle:
    handle.write(note)
os.replace(ready + ".tmp", ready)
time.sleep(60)  # the test fails (exit 3, not 130 or 143) rather than hangs
sys.exit(3)
"""


@pytest.fixture
def survivable():
    """Until the test ends, SIGINT and SIGTERM to this process are recorded
    here instead of ending pytest (were compare's handler not there)."""
    got: list[int] = []

    def record(signum, frame):
        got.append(signum)

    previous = {sig: signal.signal(sig, record) for sig in cmp.SIGNALS}
    yield got, record
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def _fake_simulate(tmp_path: Path, monkeypatch, mode: str) -> list[Path]:
    """Every simulation started runs CHILD; returns the run dirs asked for."""
    started: list[Path] = []

    def command(settings, out_dir):
        started.append(out_dir)
        return [sys.executable, "-c", CHILD, str(tmp_path / "ready"), str(tmp_path / "record"),
                mode]

    monkeypatch.setattr(cmp.runs, "simulate_command", command)
    return started


def _signal_when_ready(ready: Path, signum: int) -> threading.Thread:
    """Signal this process once the child has written ``ready`` (at most 30 s on)."""
    def send():
        deadline = time.monotonic() + 30
        while not ready.exists():
            if time.monotonic() > deadline:
                return
            time.sleep(0.02)
        os.kill(os.getpid(), signum)

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread


def _compare(tmp_path: Path, capsys) -> tuple[int, str, str, Path]:
    path = tmp_path / "comparison.toml"
    path.write_text(COMPARISON)
    out = tmp_path / "out"
    code = cli.main(["compare", str(path), "--out", str(out)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err, out


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_reaches_the_child_and_stops_the_comparison(tmp_path, capsys, monkeypatch,
                                                             survivable, signum):
    started = _fake_simulate(tmp_path, monkeypatch, "obey")
    sender = _signal_when_ready(tmp_path / "ready", signum)
    code, stdout, err, out = _compare(tmp_path, capsys)
    sender.join()
    assert code == 128 + signum  # 130, 143
    assert (tmp_path / "record").read_text() == f"{signum}\n"  # passed on, once
    assert started == [out / "first" / "seed-1"]  # no further run started
    assert err == (f"fedlora: compare stopped by {signal.Signals(signum).name}: 0 of 2 runs "
                   f"finished in {out}; run the same command again to continue (an "
                   "interrupted run resumes from its last round)\n")
    assert "[1/2]" not in stdout
    assert not any((out / name).exists() for name in cmp.OUTPUTS)
    got, record = survivable
    assert got == []  # compare's handler had it, and put this one back after
    assert all(signal.getsignal(sig) is record for sig in cmp.SIGNALS)


def test_a_child_that_does_not_stop_is_killed_with_its_processes(tmp_path, capsys, monkeypatch,
                                                                 survivable):
    monkeypatch.setattr(cmp.child, "CHILD_STOP_S", 1.0)
    _fake_simulate(tmp_path, monkeypatch, "ignore")
    sender = _signal_when_ready(tmp_path / "ready", signal.SIGTERM)
    began = time.monotonic()
    code, _, err, _ = _compare(tmp_path, capsys)
    sender.join()
    assert code == 143 and "compare stopped by SIGTERM: 0 of 2 runs" in err
    assert time.monotonic() - began < 20  # not the child's 60 s
    # it had the signal and went on (the SIGTERM before the SIGKILL is recorded too)
    assert (tmp_path / "record").read_text().startswith("15\n")
    grandchild = int((tmp_path / "ready").read_text())
    try:
        assert psutil.Process(grandchild).status() == psutil.STATUS_ZOMBIE  # killed, unreaped
    except psutil.NoSuchProcess:
        pass
