"""A strategy from another package: examples/custom-strategy (``fedavg-momentum``,
FedAvgM server momentum) registered through the ``fedlora.strategies`` entry
point group. Its math and state, how the registry finds it, its key's scope,
and one real simulation with it. CI installs the example (`.ci/run`)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import numpy as np
import psutil
import pytest
import tomllib
from fakes import SMALL_SHAPES as SHAPES
from fakes import random_state as _random_state
from processes import describe, ours, stop, watch

from fedlora.core.config import ConfigError
from fedlora.strategies import resolve, strategies, strategy_keys
from fedlora.strategies.base import ClientUpdate
from fedlora.strategies.fedavg import FedAvgClient, FedAvgLoRA
from fedlora.strategies.registry import BUILT_IN, ENTRY_POINT_GROUP

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "custom-strategy"
NAME = "fedavg-momentum"
try:
    from fedavg_momentum import FedAvgMomentum
except ImportError:  # the assertion below says what to do
    FedAvgMomentum = None


@pytest.fixture(autouse=True)
def _installed():
    assert FedAvgMomentum is not None, (
        f"the example strategy is not installed: pip install -e {EXAMPLE.relative_to(REPO)}")


def _strategy(cls=None, initial=None, **keys):
    cls = cls or FedAvgMomentum
    config = resolve({"num-clients": 10, "clients-per-round": 3, "strategy": NAME, **keys})
    strategy = cls(config, initial if initial is not None
                   else _random_state(np.random.default_rng(0)))
    strategy.sent, _ = strategy.download(strategy.state)
    return strategy


def _round(strategy, uploads: list[dict], weights: list[float]) -> dict[str, np.ndarray]:
    """One round as the server runs it: fold the updates, merge, adopt the
    result as the global adapter and send it."""
    updates = [ClientUpdate(node_id=100 + i, partition_id=i, rank=strategy.global_rank,
                            weight=w, tensors=u)
               for i, (u, w) in enumerate(zip(uploads, weights, strict=True))]
    merged = strategy.merge(strategy.sums(updates))
    strategy.state = merged
    strategy.sent, _ = strategy.download(merged)
    return merged


# -- the math ---------------------------------------------------------------------
def test_momentum_over_two_rounds_by_hand():
    """θ0 = P (a random pattern); clients send P + c with scalar offsets c so
    the arithmetic can be written out, β = 0.5:
    round 1: c = 2 (1 example), 6 (3 examples): θ̄ = P+5, v = 5, θ = P+5
    round 2: c = 4, 8 (1 example each):         θ̄ = P+6, v = 0.5·5 + 1 = 3.5,
                                                θ = P+8.5  (fedavg would give P+6)."""
    pattern = _random_state(np.random.default_rng(1))
    strategy = _strategy(initial=pattern, **{"momentum-beta": 0.5})
    assert strategy.beta == 0.5

    def sent(offset: float) -> dict[str, np.ndarray]:
        return {n: p + np.float32(offset) for n, p in pattern.items()}

    first = _round(strategy, [sent(2), sent(6)], [1.0, 3.0])
    for name in SHAPES:
        np.testing.assert_allclose(first[name], pattern[name] + 5.0, atol=1e-5)
        np.testing.assert_allclose(strategy.state_dict()[f"velocity/{name}"], 5.0, atol=1e-5)
    second = _round(strategy, [sent(4), sent(8)], [1.0, 1.0])
    for name in SHAPES:
        np.testing.assert_allclose(second[name], pattern[name] + 8.5, atol=1e-5)
        np.testing.assert_allclose(strategy.state_dict()[f"velocity/{name}"], 3.5, atol=1e-5)


def test_momentum_follows_the_recursion_on_random_updates():
    """v ← β·v + (θ̄ − θ), θ ← θ + v against NumPy in float64, 3 rounds."""
    rng = np.random.default_rng(2)
    strategy = _strategy(**{"momentum-beta": 0.7})
    theta = {n: v.astype(np.float64) for n, v in strategy.state.items()}
    velocity = {n: np.zeros(s) for n, s in SHAPES.items()}
    for _ in range(3):
        uploads, weights = [_random_state(rng) for _ in range(3)], [10.0, 30.0, 60.0]
        merged = _round(strategy, uploads, weights)
        for name in SHAPES:
            average = sum(w / 100.0 * u[name] for w, u in zip(weights, uploads))
            velocity[name] = 0.7 * velocity[name] + (average - theta[name])
            theta[name] = theta[name] + velocity[name]
            np.testing.assert_allclose(merged[name], theta[name], rtol=1e-5, atol=1e-5)


def test_beta_zero_is_fedavg():
    rng = np.random.default_rng(3)
    momentum = _strategy(**{"momentum-beta": 0.0})
    fedavg = _strategy(FedAvgLoRA)
    for _ in range(2):
        uploads, weights = [_random_state(rng) for _ in range(3)], [1.0, 2.0, 3.0]
        got, want = _round(momentum, uploads, weights), _round(fedavg, uploads, weights)
        for name in SHAPES:
            np.testing.assert_allclose(got[name], want[name], rtol=1e-6, atol=1e-6)


def test_client_half_is_fedavgs():
    assert FedAvgMomentum.client_half is FedAvgClient


# -- strategy state ---------------------------------------------------------------
class ForgetfulMomentum(FedAvgMomentum):
    """The same strategy with LoraStrategy's default, a no-op load_state_dict."""

    def load_state_dict(self, state):
        pass


def _resumed_second_round(cls) -> tuple[dict, dict]:
    """(round 2 of an uninterrupted run, round 2 of a run restarted after
    round 1 from the global adapter and state_dict, as ``cls``)."""
    rng = np.random.default_rng(4)
    rounds = [([_random_state(rng) for _ in range(3)], [5.0, 7.0, 11.0]) for _ in range(2)]
    first = _strategy(**{"momentum-beta": 0.5})
    _round(first, *rounds[0])
    saved = first.state_dict()
    resumed = _strategy(cls, initial=first.state, **{"momentum-beta": 0.5})
    resumed.load_state_dict(saved)
    return _round(first, *rounds[1]), _round(resumed, *rounds[1])


def test_momentum_buffer_survives_state_dict_round_trip():
    uninterrupted, resumed = _resumed_second_round(FedAvgMomentum)
    for name in SHAPES:
        np.testing.assert_array_equal(resumed[name], uninterrupted[name])


def test_a_no_op_load_state_dict_would_fail_the_round_trip():
    """The round trip above checks something: forgetting v changes round 2."""
    uninterrupted, resumed = _resumed_second_round(ForgetfulMomentum)
    assert any(not np.allclose(resumed[n], uninterrupted[n], atol=1e-4) for n in SHAPES)


def test_state_dict_is_a_snapshot():
    """The server takes state_dict before a merge and restores it when the merge
    fails (base.LoraStrategy._checked_merge): a later merge must not change it."""
    rng = np.random.default_rng(5)
    strategy = _strategy()
    _round(strategy, [_random_state(rng) for _ in range(2)], [1.0, 1.0])
    before = strategy.state_dict()
    copy = {k: v.copy() for k, v in before.items()}
    _round(strategy, [_random_state(rng) for _ in range(2)], [1.0, 1.0])
    assert set(before) == {f"velocity/{n}" for n in SHAPES}
    for key, value in copy.items():
        np.testing.assert_array_equal(before[key], value)
        assert not np.array_equal(strategy.state_dict()[key], value)
    strategy.load_state_dict(before)
    for key, value in copy.items():
        np.testing.assert_array_equal(strategy.state_dict()[key], value)


# -- the registry -------------------------------------------------------------------
def test_registry_finds_it_through_the_entry_point():
    example = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())
    points = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == NAME]
    assert len(points) == 1, points
    point = points[0]
    assert point.dist is not None and point.dist.name == example["project"]["name"]
    assert point.value == example["project"]["entry-points"][ENTRY_POINT_GROUP][NAME]
    assert point.load() is FedAvgMomentum
    assert strategies()[NAME] is FedAvgMomentum
    assert not any(ref.startswith("fedavg_momentum") for ref in BUILT_IN)
    # the installed code is this example (editable), not a stale copy
    origin = Path(importlib.util.find_spec("fedavg_momentum").origin).resolve()
    assert origin.is_relative_to(EXAMPLE)
    # and fedlora itself does not import it
    assert not any("fedavg_momentum" in p.read_text() for p in (REPO / "fedlora").rglob("*.py"))


def test_its_key_is_declared_and_checked():
    assert set(strategy_keys()[NAME]) == {"momentum-beta"}
    assert resolve({"strategy": NAME})["momentum-beta"] == 0.9
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(ConfigError, match=r"'momentum-beta': must be in \[0, 1\)"):
            resolve({"strategy": NAME, "momentum-beta": bad})


@pytest.mark.e2e
def test_momentum_beta_with_fedavg_is_refused_in_one_line(tmp_path):
    with pytest.raises(ConfigError) as info:
        resolve({"strategy": "fedavg", "momentum-beta": 0.5})
    message = str(info.value)
    assert "\n" not in message
    assert message == ("config key 'momentum-beta' applies to strategy fedavg-momentum, "
                       "not fedavg")
    # the same from the command line: exit 2, one line, nothing started
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "fedlora", "simulate", "--set",
                           "strategy=fedavg", "momentum-beta=0.5", "--out", str(out)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [f"fedlora: error: {message}"]
    assert not out.exists()


# -- end to end ----------------------------------------------------------------------
@pytest.mark.e2e
def test_simulation_with_the_plugin_strategy(tmp_path, tiny_bert, topic_dataset):
    """`fedlora simulate` with strategy=fedavg-momentum: the server and the Ray
    clients find the strategy through the entry point alone."""
    out = tmp_path / "run"
    settings = {"model": str(tiny_bert), "dataset": str(topic_dataset), "strategy": NAME,
                "momentum-beta": 0.5, "num-clients": 3, "clients-per-round": 3,
                "rounds": 2, "local-steps": 2, "max-seq-len": 32, "batch-size": 8,
                "partition": "iid", "client-cpus": 1}
    env = dict(os.environ, FLWR_HOME=str(tmp_path / "flwr-home"))
    log = tmp_path / "simulate.log"
    command = [sys.executable, "-m", "fedlora", "simulate", "--set",
               *[f"{k}={v}" for k, v in settings.items()], "--out", str(out)]
    try:
        code, _, _ = watch(command, env, env["FLWR_HOME"], log, timeout=600)
        assert code == 0, log.read_text()[-3000:]
        _, alive = psutil.wait_procs(ours(env["FLWR_HOME"]), timeout=30)
        assert not alive, f"left running: {[describe(p) for p in alive]}"
    finally:
        stop(ours(env["FLWR_HOME"]))
    config = json.loads((out / "config.json").read_text())
    assert config["strategy"] == NAME and config["momentum-beta"] == 0.5
    assert (out / "summary.json").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["client_updates"] > 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2] and all(r["clients"] == 3 for r in rows)
