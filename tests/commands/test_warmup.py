"""Fast starts and stops (``fedlora.commands.warmup``, ``fedlora.runtime.partitioners``, lazy
imports, ``fedlora.commands.simulation.stop_together_at_shutdown``).

A local Ray's workers import the training stack and build the run's model as
they start, before Flower gives them an actor; the driver resolves a config
without importing that stack (so Ray starts at once); a worker imports neither
Opacus (without DP) nor Flower Datasets' plotting helpers. Each process-level
check runs in a fresh interpreter: what a module imports is only visible
there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from processes import ours, stop

from fedlora.commands import warmup
from fedlora.strategies import resolve

HEAVY = ("torch", "transformers", "peft", "datasets", "opacus", "seaborn", "matplotlib")


def _python(code: str, env: dict | None = None, timeout: int = 240) -> dict:
    """Run ``code`` in a fresh interpreter; it prints one JSON object last."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=timeout, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _loaded(modules: tuple[str, ...] = HEAVY) -> str:
    return f"[m for m in {modules!r} if m in sys.modules]"


@pytest.mark.e2e
def test_resolving_a_config_imports_no_training_stack():
    """The driver resolves the run config (every strategy's keys) before it
    starts Ray: with torch in that path Ray would start seconds later."""
    loaded = _python("import json, sys\n"
                     "from fedlora.strategies import resolve\n"
                     "resolve({'dataset': 'x', 'strategy': 'lora-fair'})\n"
                     "import fedlora.commands.simulation, fedlora.commands.cli\n"
                     f"print(json.dumps({_loaded()}))")
    assert loaded == []


@pytest.mark.e2e
def test_a_client_imports_neither_opacus_nor_plotting_and_plotting_still_works():
    """Without DP no Opacus (SciPy's statistics); never seaborn/matplotlib,
    which Flower Datasets' package imports for plots we do not draw. Code that
    does plot still gets the real module on first use."""
    result = _python(
        "import json, sys\n"
        "import fedlora.node.client_loop\n"
        f"before = {_loaded(('opacus', 'seaborn', 'matplotlib'))}\n"
        "import flwr_datasets\n"
        "plot = flwr_datasets.visualization.plot_label_distributions\n"
        "from flwr_datasets.visualization import plot_comparison_label_distribution\n"
        "print(json.dumps({'before': before, 'plot': callable(plot),\n"
        "                  'real': type(sys.modules['flwr_datasets.visualization']).__name__,\n"
        "                  'seaborn': 'seaborn' in sys.modules}))")
    assert result == {"before": [], "plot": True, "real": "module", "seaborn": True}


@pytest.mark.e2e
def test_local_ray_workers_are_warm_before_their_first_task(tmp_path, tiny_bert,
                                                              topic_dataset):
    """``start_ray`` hands the hook to the raylet's environment: the workers it
    prestarts import the stack and build the run's model, and an actor created
    afterwards runs in one of them, with the model already in its cache.
    Each reports itself warm to the driver (``WorkerReadiness``), the Probe's
    worker among them. At
    ``ray.shutdown`` the local Ray's processes are asked to stop together
    before Ray's own one-at-a-time loop reaches them."""
    env = dict(os.environ, FLWR_HOME=str(tmp_path / "home"))
    code = f"""
import json, os, sys, time
import ray
from fedlora.commands.simulation import start_ray
from fedlora.commands.warmup import WorkerReadiness
from fedlora.strategies import resolve

config = resolve({{"model": {str(tiny_bert)!r}, "dataset": {str(topic_dataset)!r},
                  "num-clients": 4, "clients-per-round": 4}})
readiness = WorkerReadiness()
workers = start_ray(config, readiness=readiness)
assert {warmup.CONFIG_ENV!r} not in os.environ  # nothing started later warms up
all_warm = readiness.wait(workers, timeout_s=180)
readiness.close()

@ray.remote(num_cpus=1)
class Probe:
    def look(self):
        from fedlora.learning.models import lora_model
        return {{"stack": 'peft' in sys.modules, "models": lora_model.cache_info().currsize,
                 "pid": os.getpid()}}

# the stop: which of Ray's processes are still running when ray.shutdown's own
# loop reaches them (fedlora.commands.simulation.stop_together_at_shutdown asks first)
node = ray._private.worker._global_node
processes = {{kind: [info.process for info in infos]
             for kind, infos in node.all_processes.items()}}
reached = {{}}
ray_kill_one = type(node)._kill_process_type

def kill_one(self, kind, **flags):
    reached[kind] = [process.poll() is None for process in processes[kind]]
    return ray_kill_one(self, kind, **flags)

type(node)._kill_process_type = kill_one
try:
    seen = ray.get(Probe.remote().look.remote())
finally:
    ray.shutdown()
ended = all(process.poll() is not None for group in processes.values() for process in group)
print(json.dumps({{"workers": workers, **seen, "reached": reached, "ended": ended,
                  "all_warm": all_warm, "reported": sorted(readiness.reported)}}))
"""
    try:
        seen = _python(code, env=env)
    finally:
        stop(ours(env["FLWR_HOME"]))
    assert seen["workers"] >= 1
    assert seen["stack"] and seen["models"] == 1, seen
    assert seen["all_warm"] and len(seen["reported"]) >= seen["workers"], seen
    assert seen["pid"] in seen["reported"], seen
    # Ray's sequential stop found every process (but a reaper, if any) gone
    # already: each one it finds running costs up to a second. All ended.
    running = {kind for kind, alive in seen["reached"].items() if any(alive)}
    assert running <= {"reaper"} and {"raylet", "gcs_server", "monitor"} <= set(
        seen["reached"]), seen["reached"]
    assert seen["ended"]


def test_the_hook_never_fails_a_worker(monkeypatch, tmp_path, caplog):
    """A config the worker cannot act on (a dataset that is not there, JSON
    that is not a config) leaves the worker running; the first message meets
    the problem again and reports it."""
    bad = resolve({"dataset": str(tmp_path / "missing"), "num-clients": 4,
                   "clients-per-round": 4})
    for value in (json.dumps(bad.to_dict()), "{not json"):
        monkeypatch.setenv(warmup.CONFIG_ENV, value)
        caplog.clear()
        with caplog.at_level("DEBUG", logger="fedlora.commands.warmup"):
            assert warmup.prepare_worker() is None
        assert "worker warm-up skipped" in caplog.text


def _report_from_a_process(env: dict) -> int:
    """``report_ready`` in a fresh process with ``env``; that process's pid."""
    done = subprocess.run([sys.executable, "-c",
                           "import os\nfrom fedlora.commands import warmup\n"
                           "warmup.report_ready()\nprint(os.getpid())"],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, **env})
    assert done.returncode == 0, done.stderr[-2000:]
    return int(done.stdout)


@pytest.mark.e2e
def test_the_round_waits_for_each_worker_to_report_warm():
    """Distinct pids count, a repeated pid or a datagram that is not a pid
    does not, and a worker that never reports ends the wait at its timeout
    (False); the socket's directory is gone after the ``with`` block."""
    import socket

    with warmup.WorkerReadiness() as readiness:
        environment = readiness.listen()
        path = environment[warmup.READY_ENV]
        first = _report_from_a_process(environment)
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as stranger:
            stranger.sendto(b"not a pid", path)
            stranger.sendto(str(first).encode(), path)  # the same worker again
        assert readiness.wait(1, timeout_s=30)
        assert readiness.reported == {first}
        assert not readiness.wait(2, timeout_s=0.3)  # nobody else reports
        second = _report_from_a_process(environment)
        assert readiness.wait(2, timeout_s=30)
        assert readiness.reported == {first, second}
    assert not Path(path).parent.exists()


def test_waiting_for_workers_ends_on_a_stop_request(monkeypatch):
    from fedlora.runtime import stopping

    monkeypatch.setattr(stopping, "STOP", stopping.threading.Event())
    stopping.STOP.set()
    with warmup.WorkerReadiness() as readiness:
        readiness.listen()
        with pytest.raises(stopping.Interrupted):
            readiness.wait(1, timeout_s=30)


def test_without_listening_there_is_nothing_to_wait_for():
    """A cluster's workers report to nobody: the round starts at once."""
    with warmup.WorkerReadiness() as readiness:
        assert readiness.wait(5, timeout_s=30)


@pytest.mark.e2e
def test_a_worker_without_a_listening_driver_reports_nothing_and_never_fails(tmp_path):
    """No socket named (a cluster's workers), or a socket that is gone: the
    hook's report is a no-op either way."""
    _report_from_a_process({warmup.READY_ENV: ""})
    _report_from_a_process({warmup.READY_ENV: str(tmp_path / "gone")})


def test_the_environment_is_inherited_only_while_ray_starts(monkeypatch):
    monkeypatch.setenv(warmup.VERBOSE_ENV, "before")
    monkeypatch.delenv(warmup.CONFIG_ENV, raising=False)
    config = resolve({"dataset": "x", "num-clients": 4, "clients-per-round": 4})
    environment = warmup.worker_environment(config, verbose=True)
    with warmup.inherited(environment):
        assert os.environ[warmup.CONFIG_ENV] == json.dumps(config.to_dict())
        assert os.environ[warmup.VERBOSE_ENV] == "1"
    assert os.environ[warmup.VERBOSE_ENV] == "before"
    assert warmup.CONFIG_ENV not in os.environ
    cluster = warmup.runtime_env(environment)
    assert cluster["worker_process_setup_hook"] == warmup.HOOK
    assert set(cluster["env_vars"]) == {warmup.CONFIG_ENV, warmup.VERBOSE_ENV}


def test_worker_hook_is_importable_by_name():
    """Ray imports the hook by its dotted name in every worker."""
    module, _, name = warmup.HOOK.rpartition(".")
    assert module == warmup.__name__ and callable(getattr(warmup, name))
    assert Path(warmup.__file__).name == "warmup.py"
