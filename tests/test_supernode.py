"""``fedlora supernode``: flower-supernode with its message loop's waits capped.

The deployment tests run it as the compose file's SuperNode; these check
what it relies on in the pinned flwr, and its own flag.
"""

from __future__ import annotations

import inspect
import subprocess
import sys
import time

from fedlora.supernode import capped_time


def test_the_node_loop_still_waits_where_the_cap_applies():
    """Flower's SuperNode loop sleeps through its own module's ``time``: the
    3 s idle wait and the 0.5 s reply waits. If an upgrade moves them, the cap
    would silently stop working: this fails instead."""
    from flwr.supernode import start_client_internal as node_loop

    source = inspect.getsource(node_loop)
    assert node_loop.time is time
    assert source.count("time.sleep(3)") == 1 and source.count("time.sleep(0.5)") == 2


def test_capped_time_caps_sleep_and_keeps_the_rest():
    proxy = capped_time(0.05)
    started = time.monotonic()
    proxy.sleep(3)
    assert time.monotonic() - started < 1.0
    assert proxy.monotonic is time.monotonic and proxy.time is time.time
    assert time.sleep is not proxy.sleep  # the real module is untouched


def test_a_poll_interval_out_of_range_is_one_line():
    done = subprocess.run([sys.executable, "-m", "fedlora.cli", "supernode", "--poll-interval",
                           "5", "--insecure"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip() == ("fedlora supernode: error: --poll-interval 5: needs seconds "
                                   "in [0.01, 3]")
