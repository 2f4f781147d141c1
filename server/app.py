"""Flower ServerApp: the run config Flower hands over → ``fedlora.federation``."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedlora.federation import run_federation
from fedlora.strategies import from_flower

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_federation(grid, from_flower(context.run_config))
