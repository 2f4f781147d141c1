"""Flower ServerApp: the run config Flower hands over → ``fedlora.federation.loop``.

In a deployment, the grid's retry of a reply whose payload is still being
uploaded starts at the reply loop's own interval instead of Flower's 1 s
(``fedlora.runtime.flower_waits``)."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedlora.federation.loop import run_federation
from fedlora.federation.replies import PULL_INTERVAL_S
from fedlora.runtime.flower_waits import shorten_server_waits
from fedlora.strategies import from_flower

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    shorten_server_waits(PULL_INTERVAL_S)
    run_federation(grid, from_flower(context.run_config))
