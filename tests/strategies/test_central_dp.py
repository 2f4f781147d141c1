"""Central DP (``dp=central``): clipping, equal weights, noise level, accounting,
and the strategies it covers or refuses."""

from __future__ import annotations

import numpy as np
import pytest
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

from fedlora.core.config import ConfigError
from fedlora.strategies import resolve
from fedlora.strategies.base import ClientUpdate
from fedlora.strategies.cellm import Cellm
from fedlora.strategies.fedavg import FedAvgLoRA
from fedlora.strategies.ffa import FfaLoRA

RANK = 4
SHAPES = {"m.q.lora_A.weight": (RANK, 50), "m.q.lora_B.weight": (50, RANK),
          "m.classifier.weight": (3, 50)}


def _strategy(cls, noise: float, clients: int = 2, **keys):
    config = resolve({"strategy": cls.name, "num-clients": 10, "clients-per-round": clients,
                      "dp": "central", "dp-noise-multiplier": noise,
                      "dp-max-grad-norm": 1.0, "agg-residual": True, "lora-rank": RANK,
                      **keys})
    rng = np.random.default_rng(0)
    state = {n: rng.standard_normal(s).astype(np.float32) for n, s in SHAPES.items()}
    strategy = cls(config, state)
    strategy.sent, _ = strategy.download(strategy.state)
    return strategy


def _change(scale: float, seed: int) -> dict[str, np.ndarray]:
    """A change of total L2 norm ``scale``."""
    rng = np.random.default_rng(seed)
    change = {n: rng.standard_normal(s) for n, s in SHAPES.items()}
    norm = np.sqrt(sum(np.sum(v ** 2) for v in change.values()))
    return {n: (scale / norm * v).astype(np.float32) for n, v in change.items()}


def _update(strategy, change: dict, examples: float, node: int) -> ClientUpdate:
    factors = {n: strategy.sent[n] + change[n] for n in SHAPES}
    return ClientUpdate(node, node, RANK, examples, strategy.upload_of(factors))


def test_updates_are_clipped_and_weighted_equally():
    strategy = _strategy(FedAvgLoRA, noise=1e-12)
    small, large = _change(0.5, 1), _change(40.0, 2)
    updates = [_update(strategy, small, 10.0, 1), _update(strategy, large, 990.0, 2)]
    merged = strategy.merge(strategy.sums(updates))
    for name in SHAPES:  # (Δ₁ + clip(Δ₂)) / m, m = 2, whatever the example counts
        expected = strategy.sent[name] + (small[name] + large[name] / 40.0) / 2
        np.testing.assert_allclose(merged[name], expected, rtol=1e-5, atol=1e-6)


def test_noise_has_the_dp_fedavg_scale():
    """std = σ·C/m on every trained coordinate."""
    strategy = _strategy(FedAvgLoRA, noise=2.0, clients=4)
    updates = [_update(strategy, {n: np.zeros(s, np.float32) for n, s in SHAPES.items()},
                       5.0, k) for k in range(4)]
    merged = strategy.merge(strategy.sums(updates))
    noise = np.concatenate([(merged[n] - strategy.sent[n]).ravel() for n in SHAPES])
    assert noise.std() == pytest.approx(2.0 * 1.0 / 4, rel=0.1)
    # unbiased: the mean of n draws is within 5 standard errors of 0 (the noise
    # comes from the OS, so a tighter bound would fail now and then)
    assert abs(noise.mean()) < 5 * (2.0 * 1.0 / 4) / np.sqrt(noise.size)


def test_ffa_noise_spares_the_frozen_a():
    strategy = _strategy(FfaLoRA, noise=1.0)
    change = {n: np.zeros(s, np.float32) for n, s in SHAPES.items()}
    merged = strategy.merge(strategy.sums([_update(strategy, change, 1.0, 1)]))
    np.testing.assert_array_equal(merged["m.q.lora_A.weight"], strategy.state["m.q.lora_A.weight"])
    assert not np.array_equal(merged["m.q.lora_B.weight"], strategy.state["m.q.lora_B.weight"])


def test_cellm_sparse_deltas_are_clipped_in_the_same_space():
    strategy = _strategy(Cellm, noise=1e-12, **{"cellm-server-lr": 1.0})
    large = _change(10.0, 3)
    merged = strategy.merge(strategy.sums([_update(strategy, large, 1.0, 1)]))
    for name in SHAPES:  # server SGD with lr 1 applies the averaged clipped change
        np.testing.assert_allclose(merged[name], strategy.sent[name] + large[name] / 10.0 / 2,
                                   rtol=1e-5, atol=1e-6)


def test_epsilon_matches_an_independent_accountant():
    strategy = _strategy(FedAvgLoRA, noise=1.1, clients=2)
    change = _change(0.1, 4)
    for server_round in (1, 2, 3):
        _, metrics = strategy.aggregate_train(server_round, [])  # no replies: nothing released
        assert metrics["epsilon"] == 0.0
    for _ in range(3):
        strategy.merge(strategy.sums([_update(strategy, change, 1.0, 1)]))
    reference = RDPAccountant()
    for _ in range(3):
        reference.step(noise_multiplier=1.1, sample_rate=2 / 10)
    assert strategy.central.epsilon() == pytest.approx(reference.get_epsilon(1e-5), rel=1e-9)


@pytest.mark.slow
def test_target_epsilon_sets_the_noise_for_the_planned_rounds():
    strategy = _strategy(FedAvgLoRA, noise=0.0, **{"dp-target-epsilon": 3.0, "rounds": 7})
    assert strategy.central.noise_multiplier == pytest.approx(get_noise_multiplier(
        target_epsilon=3.0, target_delta=1e-5, sample_rate=0.2, steps=7, accountant="rdp"))


def test_metrics_of_a_central_dp_round_hold_no_raw_factor_products():
    strategy = _strategy(FedAvgLoRA, noise=1.0)
    sums = strategy.sums([_update(strategy, _change(0.3, 5), 1.0, 1)])
    assert not sums.products


def test_lora_fair_is_refused_under_central_dp():
    with pytest.raises(ConfigError, match="central DP cannot cover strategy lora-fair"):
        resolve({"strategy": "lora-fair", "dp": "central", "dp-noise-multiplier": 1.0})
