"""Ray workers that are ready before their first message.

A Ray worker is a fresh Python process. Left alone, the first message each
one runs pays for importing the training stack (torch, transformers, PEFT,
datasets: about 5 s of CPU) and building the run's base model, after the
driver has done the same: on a small machine that was most of a short run.

``prepare_worker`` is Ray's worker setup hook: Ray runs it in each worker
process as the process starts, before the worker takes its actor. It imports
the stack and builds the run's base model into the process-wide cache the
client loop reads (``fedlora.learning.features.model_for``), so the first message
finds it (a message that asks for another model or rank builds its own, as
before). On a GPU run it only imports: the GPU a worker may use is known
when Ray gives it its actor.

How the hook reaches the workers:
- a local Ray whose every CPU hosts a client (``client-cpus`` ≤ 1, no GPU):
  through the environment the raylet inherits from ``ray.init``
  (``inherited``). The raylet starts one worker per CPU before anyone asks,
  and Flower's actors take those, so the warm-up runs while Ray is still
  starting. The variable that names the hook is Ray's own
  (``WORKER_PROCESS_SETUP_HOOK_ENV_VAR``, read by every Python worker at
  start); ``tests/test_warmup.py`` fails if a Ray upgrade stops honouring it.
- otherwise (a Ray cluster, fewer clients than CPUs, GPU clients): through
  the job's ``runtime_env``, which reaches only the workers started for
  Flower's actors, when Flower creates them (while the driver prepares its
  own data). Warming every prestarted worker there would import the stack in
  processes that never serve: on a 16-core GPU machine with 4 GPU clients
  that slowed the driver's own start by several seconds.

Round 1 starts when the workers are warm. A local Ray's warm-up takes
seconds (about 5 s of imports per process, more when the driver imports at
the same time on few cores); a round started before it ends would spend them
waiting, so its time would be warm-up, not the round, and a short
``round-timeout`` would drop its clients. So in the inherited case each
warmed worker reports its pid on a Unix datagram socket of the driver's
(``WorkerReadiness``, in a private directory) and the round loop waits for
as many reports as there are client workers, for at most ``READY_WAIT_S``
(then it goes on: Flower waits for a slow worker as it always did). On a
cluster there is nothing to wait for here: the workers warm up when Flower
creates its actors.

The hook must never fail a worker: Ray would end the process and Flower would
lose the actor. Whatever goes wrong here (a dataset the driver has not yet
checked, say) is logged at debug level; the first message meets it again and
reports it as any message does.

The same hook keeps the workers quiet unless the run is verbose: no model
loading bars, no library deprecation notices, and none of Flower's
"Manually terminating ClientAppActor" warnings when the run ends.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

from fedlora.core.config import RunConfig
from fedlora.runtime import quiet, stopping

CONFIG_ENV = "FEDLORA_WARMUP_CONFIG"  # the run's resolved config, as JSON
VERBOSE_ENV = "FEDLORA_VERBOSE"
READY_ENV = "FEDLORA_WARMUP_READY"  # the driver's socket a warmed worker reports to
# How long round 1 waits for the workers' warm-up: several times the slowest
# seen (a GGUF model converted for the first time, on a loaded machine).
READY_WAIT_S = 120.0
STOP_POLL_S = 0.2  # how soon the wait sees a stop request (fedlora.runtime.stopping)
HOOK = "fedlora.commands.warmup.prepare_worker"

LOGGER = logging.getLogger(__name__)


def worker_environment(config: RunConfig, verbose: bool) -> dict[str, str]:
    """What a worker of this run needs in its environment to warm up."""
    from ray._private.ray_constants import WORKER_PROCESS_SETUP_HOOK_ENV_VAR

    return {WORKER_PROCESS_SETUP_HOOK_ENV_VAR: HOOK,
            CONFIG_ENV: json.dumps(config.to_dict()),
            VERBOSE_ENV: "1" if verbose else ""}


def every_prestarted_worker_serves(config: RunConfig) -> bool:
    """Whether a local Ray's prestarted workers (one per CPU) all become
    client actors: only then is warming them all worth it."""
    return config.client_cpus <= 1 and config.client_gpus == 0


def runtime_env(environment: dict[str, str]) -> dict:
    """The same as a job's ``runtime_env`` (the workers started for it)."""
    from ray._private.ray_constants import WORKER_PROCESS_SETUP_HOOK_ENV_VAR

    return {"worker_process_setup_hook": HOOK,
            "env_vars": {k: v for k, v in environment.items()
                         if k != WORKER_PROCESS_SETUP_HOOK_ENV_VAR}}


@contextmanager
def inherited(environment: dict[str, str]) -> Iterator[None]:
    """``environment`` in ``os.environ`` while the block starts a local Ray
    (its processes inherit it), and gone again after: nothing else this
    process starts later should warm up a run."""
    saved = {name: os.environ.get(name) for name in environment}
    os.environ.update(environment)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def prepare_worker() -> None:
    """Ray's worker setup hook (see the module docstring). Never raises."""
    verbose = bool(os.environ.get(VERBOSE_ENV))
    if not verbose:
        quiet.environment()
    try:
        from fedlora.learning.features import model_for
        from fedlora.strategies import from_message

        if not verbose:
            quiet.libraries()
            # after the imports: importing flwr sets its logger to DEBUG
            logging.getLogger("flwr").setLevel(logging.ERROR)
        config = from_message(json.loads(os.environ[CONFIG_ENV]))
        if config.client_gpus == 0:
            model_for(config)
    except Exception:  # noqa: BLE001  (the first message reports it; see above)
        LOGGER.debug("worker warm-up skipped", exc_info=True)
    finally:
        report_ready()


def report_ready() -> None:
    """Tell the driver this worker is warm (when it listens). Never raises."""
    path = os.environ.get(READY_ENV)
    if not path:
        return
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as reporter:
            reporter.sendto(str(os.getpid()).encode(), path)
    except OSError:
        LOGGER.debug("warm-up report not delivered", exc_info=True)


class WorkerReadiness:
    """The driver's end of the warm workers' reports (module docstring).

    ``listen`` opens the socket and gives the environment that points the
    workers at it; ``wait`` counts distinct reporting pids; ``close`` removes
    the socket. Without ``listen`` there is nothing to wait for. A report is
    a decimal pid and nothing else; anything else is ignored (the directory
    is the driver's own, mode 0700, but a datagram is still input)."""

    def __init__(self) -> None:
        self._directory: str | None = None
        self._socket: socket.socket | None = None
        self.reported: set[int] = set()

    def listen(self) -> dict[str, str]:
        self._directory = tempfile.mkdtemp(prefix="fedlora-ready-")
        path = os.path.join(self._directory, "socket")
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._socket.bind(path)
        return {READY_ENV: path}

    def wait(self, workers: int, timeout_s: float = READY_WAIT_S) -> bool:
        """Block until ``workers`` workers have reported, or ``timeout_s``
        has passed; whether they all did (True when not listening). A stop
        request (SIGINT, SIGTERM) ends the wait with ``stopping.Interrupted``."""
        if self._socket is None:
            return True
        deadline = time.monotonic() + timeout_s
        while len(self.reported) < workers:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                LOGGER.info("%d of %d Ray workers still warming up after %.0f s; round 1 "
                            "starts without them", workers - len(self.reported), workers,
                            timeout_s)
                return False
            stopping.raise_if_stopped()
            self._socket.settimeout(min(remaining, STOP_POLL_S))
            try:
                report = self._socket.recv(64)
            except TimeoutError:
                continue
            if report.isdigit():
                self.reported.add(int(report))
        return True

    def __enter__(self) -> WorkerReadiness:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
        if self._directory is not None:
            shutil.rmtree(self._directory, ignore_errors=True)
            self._directory = None
