"""Run a federation as a Flower simulation on Ray, in this process.

The ServerApp (the round loop of ``fedlora.federation``) runs in a thread of
this process and the ClientApp (``fedlora.client_loop``) in a pool of
long-lived Ray actors, one per ``client-cpus``/``client-gpus`` share of the
machine (or of the Ray cluster at ``ray-address``). A local Ray binds to
127.0.0.1 only. These are the loops server/app.py and client/app.py wrap for
``flwr run``; the library builds its own apps from them instead of importing
the project's.

Flower's ``run_simulation`` hands the ServerApp an empty run config, so the
ServerApp used here is a thin one bound to the resolved config; the
ClientApp reads the config from each message.

Loopback: Ray resolves ``_node_ip_address="127.0.0.1"`` (and a ``ray-address``
of 127.0.0.1) to the machine's routable address unless
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` is set before Ray is imported (then a
local Ray binds 127.0.0.1 only); ``start_ray`` sets it for a local Ray and for
a loopback ``ray-address`` and leaves it alone for a remote cluster.

Ray is started here, before Flower's backend (which reuses an initialised
Ray), so that an unreachable ``ray-address`` or resources no node has fail in
one line instead of hanging.

Without ``ray-address`` a run always starts its own private Ray
(``address="local"``): ``ray.init()`` with no address would attach to
``RAY_ADDRESS`` or to the cluster last recorded in Ray's temp directory
(``ray_current_cluster``, left behind by a ``ray start`` that was never
stopped, even a dead one), and then refuse our ``num_cpus``.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import warnings

import torch
from flwr.app import Context
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedlora.config import ConfigError, RunConfig
from fedlora.stopping import reclaim_signals

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
CONNECT_TIMEOUT_S = 5.0
# messages outstanding per Ray worker: enough that none waits for work
# (see fedlora.replies for why not all of a round's at once)
IN_FLIGHT_PER_WORKER = 4


def backend_config(config: RunConfig) -> dict:
    """Flower's Ray backend settings for this run."""
    init_args: dict = {"include_dashboard": False, "logging_level": logging.ERROR,
                       "log_to_driver": True}
    if config["ray-address"]:
        init_args["address"] = config["ray-address"]
    else:
        init_args["address"] = "local"  # never RAY_ADDRESS or a recorded cluster
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


def _check_reachable(address: str) -> None:
    """Fail in one line when nothing listens at ``host:port`` (Ray itself
    retries an unreachable GCS for minutes)."""
    if address == "auto":
        return  # Ray finds the local cluster itself, or says there is none
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"config key 'ray-address': {address!r} is not host:port or 'auto'")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as err:
        raise ConfigError(f"config key 'ray-address': cannot reach a Ray head at {address} "
                          f"({err.strerror or err}); start one with `ray start --head`"
                          ) from None


def start_ray(config: RunConfig) -> int:
    """Start (or attach to) Ray for this run; returns how many client workers
    (Ray actors) it can run at once. Fails in one line when the cluster cannot
    host a single client with ``client-cpus``/``client-gpus``."""
    address = config["ray-address"]
    host = address.removeprefix("ray://").rpartition(":")[0]
    if not address or host in LOOPBACK_HOSTS:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    backend = backend_config(config)
    if address:
        _check_reachable(address)
    import ray
    from flwr.simulation.ray_transport.ray_actor import pool_size_from_resources

    if not ray.is_initialized():
        try:
            ray.init(**backend["init_args"])
        except ConnectionError as err:
            raise ConfigError(f"config key 'ray-address': {str(err).splitlines()[0]}"
                              ) from None
        reclaim_signals()
    try:
        workers = pool_size_from_resources(backend["client_resources"])
    except ValueError:  # Flower's "ActorPool is empty", with the reason only logged
        workers = 0
    if workers == 0:
        nodes = ", ".join(f"{n['Resources'].get('CPU', 0):g} CPU/"
                          f"{n['Resources'].get('GPU', 0):g} GPU"
                          for n in ray.nodes() if n["Resources"])
        ray.shutdown()
        raise ConfigError(f"config keys 'client-cpus'/'client-gpus': no Ray node can host "
                          f"a client with {config['client-cpus']:g} CPU and "
                          f"{config['client-gpus']:g} GPU (nodes: {nodes or 'none'})")
    return workers


def simulate(config: RunConfig, verbose: bool = False,
             client_app: ClientApp | None = None,
             server_done: threading.Event | None = None) -> int:
    """Run the federation described by ``config`` to completion (blocking);
    returns the number of client workers it ran. ``client_app`` replaces the
    project's ClientApp (the scale benchmark's stock mode); ``server_done``
    is cleared while the round loop runs (``fedlora.stopping`` waits on it)."""
    from fedlora.client_loop import client_app as project_client_app
    from fedlora.federation import run_federation

    client_app = client_app or project_client_app()
    if not verbose:
        logging.getLogger("flwr").setLevel(logging.ERROR)
    workers = start_ray(config)
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        if server_done is not None:
            server_done.clear()
        try:
            run_federation(grid, config, in_flight=IN_FLIGHT_PER_WORKER * workers,
                           simulation=True)
        finally:
            if server_done is not None:
                server_done.set()

    from flwr.simulation import run_simulation

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        run_simulation(server_app=server_app, client_app=client_app,
                       num_supernodes=config["num-clients"], backend_name="ray",
                       backend_config=backend_config(config), verbose_logging=verbose)
    return workers
