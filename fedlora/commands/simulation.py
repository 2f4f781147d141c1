"""Run a federation as a Flower simulation on Ray, in this process.

The ServerApp (the round loop of ``fedlora.federation.loop``) runs in a thread of
this process and the ClientApp (``fedlora.node.client_loop``) in a pool of
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
import subprocess
import threading
import time
import warnings
from collections.abc import Callable

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedlora.commands import warmup
from fedlora.core.config import ConfigError, RunConfig
from fedlora.runtime.flower_waits import lighten_simulation_polling, shorten_simulation_waits
from fedlora.runtime.progress import Lines
from fedlora.runtime.stopping import reclaim_signals

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
CONNECT_TIMEOUT_S = 5.0
# messages outstanding per Ray worker: enough that none waits for work
# (see fedlora.federation.replies for why not all of a round's at once)
IN_FLIGHT_PER_WORKER = 4
ENGINE_POLL_S = 0.05  # how soon Flower's engine threads see the run end
RAY_STOP_GRACE_S = 1.0  # what Ray gives each of its processes to exit on SIGTERM


def backend_config(config: RunConfig) -> dict:
    """Flower's Ray backend settings for this run. A local Ray finds the GPUs
    itself (``start_ray`` checks them): asking torch would import it first."""
    init_args: dict = {"include_dashboard": False, "logging_level": logging.ERROR,
                       "log_to_driver": True}
    if config.ray_address:
        init_args["address"] = config.ray_address
    else:
        init_args["address"] = "local"  # never RAY_ADDRESS or a recorded cluster
        init_args["_node_ip_address"] = "127.0.0.1"
        init_args["num_cpus"] = os.cpu_count() or 1
        if config.client_cpus > init_args["num_cpus"]:
            raise ConfigError(f"config key 'client-cpus': {config.client_cpus} but "
                              f"this machine has {init_args['num_cpus']} CPUs")
    return {"init_args": init_args,
            "client_resources": {"num_cpus": config.client_cpus,
                                 "num_gpus": config.client_gpus}}


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
    if not address.startswith("ray://"):
        _check_answers_as_gcs(address)


def _check_answers_as_gcs(address: str) -> None:
    """Something listens at ``address``: fail in one line unless it answers as
    a Ray head's GCS does (its cluster id) within ``CONNECT_TIMEOUT_S``.
    Otherwise (another server on the port, a head that hangs) ``ray.init``
    retries for minutes, its C++ client logging a line every few seconds."""
    import grpc
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    channel = grpc.insecure_channel(address)
    try:
        gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel).GetClusterId(
            gcs_service_pb2.GetClusterIdRequest(), timeout=CONNECT_TIMEOUT_S)
    except grpc.RpcError as err:
        raise ConfigError(f"config key 'ray-address': {address} does not answer as a Ray "
                          f"head ({err.code().name} after {CONNECT_TIMEOUT_S:g} s); is it "
                          "the head's GCS port (`ray start --head --port`)?") from None
    finally:
        channel.close()


def start_ray(config: RunConfig, verbose: bool = False,
              readiness: warmup.WorkerReadiness | None = None) -> int:
    """Start (or attach to) Ray for this run; returns how many client workers
    (Ray actors) it can run at once. Fails in one line when the cluster cannot
    host a single client with ``client-cpus``/``client-gpus``. ``readiness``
    listens for the warmed workers' reports where a local Ray's prestarted
    workers warm up (``fedlora.commands.warmup``)."""
    address = config.ray_address
    host = address.removeprefix("ray://").rpartition(":")[0]
    if not address or host in LOOPBACK_HOSTS:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    backend = backend_config(config)
    if address:
        _check_reachable(address)
    import ray
    from flwr.simulation.ray_transport.ray_actor import pool_size_from_resources

    if not ray.is_initialized():
        environment = warmup.worker_environment(config, verbose)
        try:
            if not address and warmup.every_prestarted_worker_serves(config):
                if readiness is not None:
                    environment.update(readiness.listen())
                with warmup.inherited(environment):  # those it prestarts included
                    ray.init(**backend["init_args"])
            else:  # the workers started for Flower's actors only
                ray.init(**backend["init_args"],
                         runtime_env=warmup.runtime_env(environment))
        except ConnectionError as err:
            raise ConfigError(f"config key 'ray-address': {str(err).splitlines()[0]}"
                              ) from None
        reclaim_signals()
        if not address:
            stop_together_at_shutdown()
        if not address and config.client_gpus > 0 and not ray.cluster_resources().get(
                "GPU"):
            ray.shutdown()
            raise ConfigError("config key 'client-gpus': > 0 but no CUDA GPU is visible")
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
                          f"a client with {config.client_cpus:g} CPU and "
                          f"{config.client_gpus:g} GPU (nodes: {nodes or 'none'})")
    return workers


def stop_together_at_shutdown() -> None:
    """Have ``ray.shutdown`` end this process's local Ray in about 0.35 s
    instead of 1.1–1.3 s.

    Ray ends a local head's processes in turn (``Node.kill_all_processes``):
    SIGTERM, then up to 1 s for that process to exit. Here they go in three
    steps, each step's processes asked together: the raylet (first, as in
    Ray: it ends its workers), then the helpers that talk to the GCS, then
    the GCS (about 0.1 s in all). The autoscaler monitor is killed outright:
    its SIGTERM handler spends about 0.6 s publishing "the autoscaler failed"
    to a cluster that is being taken down. Ray's own method then finds the
    processes gone and ends the reaper, its safety net, last; the rest of
    ``ray.shutdown`` is the driver's own disconnect. Ray comes pinned with flwr;
    ``tests/test_warmup.py`` fails if an upgrade changes what this relies on."""
    from ray._private import ray_constants as kinds
    from ray._private import worker

    node = worker._global_node
    if node is None or not node.is_head():
        return
    ray_kill_all = node.kill_all_processes
    first, last = kinds.PROCESS_TYPE_RAYLET, kinds.PROCESS_TYPE_GCS_SERVER

    def kill_all_processes(check_alive: bool = True, allow_graceful: bool = False,
                           wait: bool = False) -> None:
        if allow_graceful and not check_alive:  # what ray.shutdown asks
            running = node.all_processes
            helpers = [kind for kind in running
                       if kind not in (first, last, kinds.PROCESS_TYPE_REAPER)]
            for step in ([first], helpers, [last]):
                _stop_together({kind: [info.process for info in running[kind]]
                                for kind in step if kind in running},
                               killed=(kinds.PROCESS_TYPE_MONITOR,))
        ray_kill_all(check_alive=check_alive, allow_graceful=allow_graceful, wait=wait)

    node.kill_all_processes = kill_all_processes


def _stop_together(processes: dict[str, list[subprocess.Popen]],
                   killed: tuple[str, ...]) -> None:
    """SIGTERM to every running process at once (SIGKILL to the ``killed``
    kinds); SIGKILL to those still running ``RAY_STOP_GRACE_S`` later."""
    running = [(kind, process) for kind, group in processes.items() for process in group
               if process.poll() is None]
    for kind, process in running:
        if kind in killed:
            process.kill()
        else:
            process.terminate()
    deadline = time.monotonic() + RAY_STOP_GRACE_S
    for _, process in running:
        try:
            process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def project_client_app() -> ClientApp:
    """The project's ClientApp (``fedlora.node.client_loop``). It imports the
    training stack where it runs, in the Ray workers (warmed up already), so
    that the driver's main thread only starts Ray and Flower meanwhile."""
    app = ClientApp()

    @app.train()
    def _train(message: Message, context: Context) -> Message:
        from fedlora.node.client_loop import handle_train

        return handle_train(message, context)

    @app.evaluate()
    def _evaluate(message: Message, context: Context) -> Message:
        from fedlora.node.client_loop import handle_evaluate

        return handle_evaluate(message, context)

    return app


class Preparation:
    """The driver's own preparation (``fedlora.commands.prepare.preflight``: imports,
    data, model) in a thread, so that it runs while Ray starts, its workers
    warm up (``fedlora.commands.warmup``) and Flower starts; ``wait`` joins it and
    raises what it raised."""

    def __init__(self, prepare: Callable[[], None] | None) -> None:
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(prepare,), daemon=True,
                                        name="fedlora-prepare")
        self._thread.start()

    def _run(self, prepare: Callable[[], None] | None) -> None:
        try:
            if prepare is not None:
                prepare()
        except BaseException as err:  # noqa: BLE001  (re-raised by wait, in the caller)
            self._error = err

    def wait(self) -> None:
        self._thread.join()
        if self._error is not None:
            raise self._error


def simulate(config: RunConfig, verbose: bool = False,
             client_app: ClientApp | None = None,
             server_done: threading.Event | None = None,
             prepare: Callable[[], None] | None = None,
             phases: dict[str, float] | None = None,
             progress: Lines | None = None) -> int:
    """Run the federation described by ``config`` to completion (blocking);
    returns the number of client workers it ran.

    ``prepare`` (the driver's preflight: imports, data, model) starts first,
    in a thread, and Ray starts meanwhile; a local Ray's workers begin warming
    up (``fedlora.commands.warmup``) before ``ray.init`` returns. The round loop starts
    when the preparation is done. Overlapping the three is what keeps a run's
    fixed cost down (BENCHMARKS.md, "Scale"). ``client_app`` replaces the
    project's ClientApp (the scale benchmark's stock mode); ``server_done`` is
    cleared while the round loop runs (``fedlora.runtime.stopping`` waits on it);
    ``phases``, when given, receives the ``time.perf_counter()`` at which Ray
    was ready (``ray_ready``), the round loop started (``rounds_start``) and
    Flower and Ray had stopped (``stopped``); ``progress`` is told when Ray
    is up and shows the rounds (``fedlora.runtime.progress``; by default the round
    lines only).

    An error of the preparation or of the round loop is raised here, in the
    caller's thread, after Flower and Ray have stopped (not logged by Flower's
    server thread as a traceback)."""
    if not verbose:
        logging.getLogger("flwr").setLevel(logging.ERROR)
    phases = {} if phases is None else phases
    preparation = Preparation(prepare)
    with warmup.WorkerReadiness() as readiness:
        try:
            workers = start_ray(config, verbose, readiness)
        except BaseException:
            preparation.wait()  # a problem with the run's own data or model comes first
            raise
        phases["ray_ready"] = time.perf_counter()
        if progress is not None:
            progress.warming(workers)
        client_app = client_app or project_client_app()
        server_app = ServerApp()
        failure: list[BaseException] = []

        @server_app.main()
        def _main(grid: Grid, context: Context) -> None:
            if server_done is not None:
                server_done.clear()
            try:
                preparation.wait()
                readiness.wait(workers)
                phases["rounds_start"] = time.perf_counter()
                from fedlora.federation.loop import run_federation

                run_federation(grid, config, in_flight=IN_FLIGHT_PER_WORKER * workers,
                               simulation=True, progress=progress)
            except Exception as err:  # noqa: BLE001  (raised below, once Flower has stopped)
                failure.append(err)
            finally:
                if server_done is not None:
                    server_done.set()

        from flwr.simulation import run_simulation

        shorten_simulation_waits(ENGINE_POLL_S)
        lighten_simulation_polling(ENGINE_POLL_S)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            run_simulation(server_app=server_app, client_app=client_app,
                           num_supernodes=config.num_clients, backend_name="ray",
                           backend_config=backend_config(config),
                           verbose_logging=verbose)
        phases["stopped"] = time.perf_counter()
        if failure:
            raise failure[0]
        return workers
