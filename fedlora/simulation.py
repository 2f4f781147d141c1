"""Run a federation as a Flower simulation on Ray, in this process.

The ServerApp (server/app.py) runs in a thread of this process and the
ClientApp (client/app.py) in a pool of long-lived Ray actors, one per
``client-cpus``/``client-gpus`` share of the machine (or of the Ray cluster at
``ray-address``). A local Ray binds to 127.0.0.1 only.

Flower's ``run_simulation`` hands the ServerApp an empty run config, so the
ServerApp used here is a thin one bound to the resolved config; the
ClientApp is the module-level one that ``flwr run`` uses, and it reads the
config from each message.

Loopback: Ray resolves ``_node_ip_address="127.0.0.1"`` to the machine's
routable address unless ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` is set before
Ray is imported (then a local Ray binds 127.0.0.1 only); ``simulate`` sets it
for a local Ray and leaves it alone when attaching to ``ray-address``.
"""

from __future__ import annotations

import logging
import os
import warnings

import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedlora.config import ConfigError, RunConfig


def backend_config(config: RunConfig) -> dict:
    """Flower's Ray backend settings for this run."""
    init_args: dict = {"include_dashboard": False, "logging_level": logging.ERROR,
                       "log_to_driver": True}
    if config["ray-address"]:
        init_args["address"] = config["ray-address"]
    else:
        init_args["_node_ip_address"] = "127.0.0.1"
        init_args["num_cpus"] = os.cpu_count() or 1
        if config["client-cpus"] > init_args["num_cpus"]:
            raise ConfigError(f"config key 'client-cpus': {config['client-cpus']} but "
                              f"this machine has {init_args['num_cpus']} CPUs")
        gpus = torch.cuda.device_count()
        if config["client-gpus"] > 0 and gpus == 0:
            raise ConfigError("config key 'client-gpus': > 0 but no CUDA GPU is visible")
        init_args["num_gpus"] = gpus
    return {"init_args": init_args,
            "client_resources": {"num_cpus": config["client-cpus"],
                                 "num_gpus": config["client-gpus"]}}


def simulate(config: RunConfig, verbose: bool = False) -> None:
    """Run the federation described by ``config`` to completion (blocking)."""
    from client.app import app as client_app
    from server.app import run_federation

    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        run_federation(grid, config)

    if not verbose:
        logging.getLogger("flwr").setLevel(logging.ERROR)
    backend = backend_config(config)
    if not config["ray-address"]:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    from flwr.simulation import run_simulation

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        run_simulation(server_app=server_app, client_app=client_app,
                       num_supernodes=config["num-clients"], backend_name="ray",
                       backend_config=backend, verbose_logging=verbose)
