"""``fedlora supernode``: Flower's ``flower-supernode`` with a shorter poll.

Why: Flower 1.41's SuperNode asks the SuperLink for a message and, when there
is none, sleeps a fixed 3 s before asking again; it also checks for its
ClientApp's reply every 0.5 s (``flwr/supernode/start_client_internal.py``).
Neither is a flag or an environment variable. A node that has just sent its
reply asks at once, finds nothing (the server is still aggregating), and then
sleeps: the next round's message waits up to 3 s. With a warm trainer that
wait was most of what a deployed round cost beyond training (BENCHMARKS.md,
"Deployment").

This runs the same SuperNode, with every flag of ``flower-supernode``, and caps
those waits at ``--poll-interval`` seconds (default 0.2), as well as the
first retry of a message whose payload is still on its way
(``fedlora.runtime.flower_waits``). The price: an idle node asks the SuperLink up to
1 / poll-interval times a second (5 instead of 1/3); ``--poll-interval 3`` is
Flower's own behaviour for the idle wait.
"""

from __future__ import annotations

import argparse
import sys

DEFAULT_POLL_S = 0.2


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="fedlora supernode", add_help=False,
        description="flower-supernode with its idle and reply polls capped at "
                    "--poll-interval seconds; every other flag is flower-supernode's")
    parser.add_argument("--poll-interval", type=float, default=DEFAULT_POLL_S,
                        metavar="SECONDS", help=f"default {DEFAULT_POLL_S}; 3 is Flower's")
    ours, flower_args = parser.parse_known_args(argv)
    if not 0.01 <= ours.poll_interval <= 3:
        print(f"fedlora supernode: error: --poll-interval {ours.poll_interval:g}: needs "
              "seconds in [0.01, 3]", file=sys.stderr)
        return 2
    if "-h" in flower_args or "--help" in flower_args:
        parser.print_help()
        print()
    from flwr.supernode.cli import flower_supernode

    from fedlora.runtime.flower_waits import shorten_node_waits

    shorten_node_waits(ours.poll_interval)
    sys.argv = ["flower-supernode", *flower_args]
    flower_supernode()
    return 0
