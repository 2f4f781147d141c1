"""FFA-LoRA, LoRA-FAIR and CELLM: exactness, residuals, sparse uploads, state."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import RecordDict

from fedlora.core.config import ConfigError
from fedlora.strategies import resolve, strategies
from fedlora.strategies.base import ClientUpdate
from fedlora.strategies.cellm import RESIDUAL_KEY, Cellm, CellmClient
from fedlora.strategies.fedavg import FedAvgLoRA
from fedlora.strategies.ffa import FfaLoRA
from fedlora.strategies.lora_fair import LoraFair
from fedlora.wire import codec
from fedlora.wire.sparsity import top_k

D, K, R = 12, 12, 3  # square modules, as the attention projections LoRA targets
SHAPES = {
    "m.q.lora_A.weight": (R, K), "m.q.lora_B.weight": (D, R),
    "m.v.lora_A.weight": (R, K), "m.v.lora_B.weight": (D, R),
    "m.classifier.weight": (4, D),
}
LORA = [n for n in SHAPES if ".lora_" in n]


def _state(rng: np.random.Generator, scale: float = 1.0) -> dict[str, np.ndarray]:
    return {n: (scale * rng.standard_normal(s)).astype(np.float32) for n, s in SHAPES.items()}


def _updates(rng, count=4, names=SHAPES) -> list[ClientUpdate]:
    """Heterogeneous clients: independent random factors, unequal weights."""
    return [ClientUpdate(i, i, R, float(10 + 20 * i), {n: s for n, s in _state(rng).items()
                                                       if n in names})
            for i in range(count)]


def _download_shapes(strategy) -> dict[str, tuple[int, ...]]:
    return {n: strategy.shapes[n] for n in strategy.roles.download_names(strategy.shapes)}


def _strategy(cls, rng, **keys):
    config = resolve({"num-clients": 10, "clients-per-round": 4, "lora-rank": R,
                      "strategy": cls.name, **keys})
    strategy = cls(config, _state(rng))
    strategy.sent, _ = strategy.download(strategy.state)
    return strategy


def _merged(strategy, updates: list[ClientUpdate]) -> dict[str, np.ndarray]:
    return strategy.merge(strategy.sums(updates))


def test_registry_has_the_built_in_strategies():
    built_in = {name for name, cls in strategies().items()
                if cls.__module__.startswith("fedlora.strategies.")}
    assert built_in == {"fedavg", "ffa", "lora-fair", "cellm", "fedsa", "hetlora",
                        "flexlora", "flora", "fedex"}


# -- FFA-LoRA -------------------------------------------------------------------
def test_ffa_trains_and_sends_everything_but_a():
    rng = np.random.default_rng(0)
    strategy = _strategy(FfaLoRA, rng)
    roles = strategy.roles
    assert not any(".lora_A." in n for n in strategy.upload_shapes)
    assert set(_download_shapes(strategy)) == set(strategy.upload_shapes)
    assert not roles.trains("lora_A") and roles.trains("lora_B") and roles.trains("head")


def test_ffa_aggregation_is_exact():
    rng = np.random.default_rng(1)
    strategy = _strategy(FfaLoRA, rng)
    updates = _updates(rng, names=strategy.upload_shapes)
    merged = _merged(strategy, updates)
    total = sum(u.weight for u in updates)
    for a_name in ("m.q.lora_A.weight", "m.v.lora_A.weight"):
        b_name = a_name.replace("lora_A", "lora_B")
        np.testing.assert_array_equal(merged[a_name], strategy.state[a_name])
        ideal = sum(u.weight / total * u.tensors[b_name] @ merged[a_name] for u in updates)
        np.testing.assert_allclose(merged[b_name] @ merged[a_name], ideal, rtol=1e-5,
                                   atol=1e-5)
    assert strategy.sums(updates).residual(merged) < 1e-6


def test_ffa_sends_exactly_half_of_fedavg_lora_bytes():
    rng = np.random.default_rng(2)
    state = _state(rng)
    ffa = _strategy(FfaLoRA, rng)
    fedavg = _strategy(FedAvgLoRA, rng)
    lora_ffa = [n for n in ffa.upload_shapes if n in LORA]
    lora_fedavg = [n for n in fedavg.upload_shapes if n in LORA]
    header = len(codec.encode({}))  # the payload's own version field, sent once
    ffa_bytes = len(codec.encode({n: state[n] for n in lora_ffa})) - header
    fedavg_bytes = len(codec.encode({n: state[n] for n in lora_fedavg})) - header
    assert 2 * ffa_bytes == fedavg_bytes


# -- FedAvg residual ---------------------------------------------------------------
def test_fedavg_residual_is_the_factor_cross_covariance():
    rng = np.random.default_rng(3)
    strategy = _strategy(FedAvgLoRA, rng)
    updates = _updates(rng)
    merged = _merged(strategy, updates)
    total = sum(u.weight for u in updates)
    error = norm = 0.0
    for a_name in ("m.q.lora_A.weight", "m.v.lora_A.weight"):
        b_name = a_name.replace("lora_A", "lora_B")
        a_bar, b_bar = merged[a_name], merged[b_name]
        covariance = sum(u.weight / total
                         * (u.tensors[b_name] - b_bar) @ (u.tensors[a_name] - a_bar)
                         for u in updates)
        ideal = sum(u.weight / total * u.tensors[b_name] @ u.tensors[a_name] for u in updates)
        np.testing.assert_allclose(ideal - b_bar @ a_bar, covariance, rtol=1e-4, atol=1e-4)
        error += float(np.sum(covariance.astype(np.float64) ** 2))
        norm += float(np.sum(ideal.astype(np.float64) ** 2))
    residual = strategy.sums(updates).residual(merged)
    assert residual == pytest.approx(np.sqrt(error / norm), rel=1e-4)
    assert residual > 0.1  # heterogeneous: clearly inexact
    # the metric's baseline, FedIT's separately averaged factors, is this same merge
    assert strategy.sums(updates).residual(strategy.sums(updates).factor_mean()) == \
        pytest.approx(residual, rel=1e-5)


# -- LoRA-FAIR ---------------------------------------------------------------------
def test_lora_fair_residual_is_below_fedavg():
    rng = np.random.default_rng(4)
    updates = _updates(rng, count=5)
    fedavg = _strategy(FedAvgLoRA, np.random.default_rng(9))
    fair = _strategy(LoraFair, np.random.default_rng(9))
    plain, corrected = _merged(fedavg, updates), _merged(fair, updates)
    for name in SHAPES:  # only B is corrected
        if ".lora_B." not in name:
            np.testing.assert_array_equal(plain[name], corrected[name])
    sums = fedavg.sums(updates)
    r_fedavg, r_fair = sums.residual(plain), sums.residual(corrected)
    assert r_fair < r_fedavg


def test_lora_fair_regulariser_limits_the_correction():
    rng = np.random.default_rng(5)
    updates = _updates(rng)
    light = _merged(_strategy(LoraFair, np.random.default_rng(1), **{"fair-lambda": 0.0}),
                    updates)
    heavy = _merged(_strategy(LoraFair, np.random.default_rng(1), **{"fair-lambda": 10.0}),
                    updates)
    plain = _merged(_strategy(FedAvgLoRA, np.random.default_rng(1)), updates)
    b = "m.q.lora_B.weight"
    assert np.linalg.norm(heavy[b] - plain[b]) < np.linalg.norm(light[b] - plain[b])


# -- CELLM -------------------------------------------------------------------------
def test_top_k_keeps_the_largest_entries_globally():
    rng = np.random.default_rng(6)
    tensors = _state(rng)
    kept = top_k(tensors, 0.1)
    total = sum(v.size for v in tensors.values())
    assert sum(len(t.indices) for t in kept.values()) == round(0.1 * total)
    smallest_kept = min(np.abs(t.values).min() for t in kept.values() if len(t.values))
    dropped = np.concatenate([np.delete(np.abs(tensors[n]).ravel(), kept[n].indices)
                              for n in tensors])
    assert smallest_kept >= dropped.max()
    for name, tensor in kept.items():
        assert np.all(np.diff(tensor.indices) > 0)
        np.testing.assert_array_equal(tensor.values, tensors[name].ravel()[tensor.indices])


def test_cellm_upload_is_sparse_and_bytes_shrink():
    rng = np.random.default_rng(7)
    config = resolve({"strategy": "cellm", "cellm-up-density": 0.05})
    shapes = {"m.q.lora_A.weight": (8, 384), "m.q.lora_B.weight": (384, 8)}
    start = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
    trained = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
    sent = CellmClient(config).upload(start, trained, RecordDict())
    kept = sum(len(t.indices) for t in sent.values())
    assert kept == round(0.05 * sum(v.size for v in start.values()))
    sparse_bytes, dense_bytes = len(codec.encode(sent)), len(codec.encode(trained))
    assert sparse_bytes * 10 < dense_bytes
    decoded = codec.decode(codec.encode(sent), {n: v.shape for n, v in start.items()})
    for name, tensor in sent.items():
        np.testing.assert_array_equal(decoded[name], tensor.to_dense())


def test_cellm_error_feedback_conserves_mass():
    rng = np.random.default_rng(8)
    config = resolve({"strategy": "cellm", "cellm-up-density": 0.1,
                      "cellm-error-feedback": True})
    client, memory = CellmClient(config), RecordDict()
    start, trained = _state(rng), _state(rng)
    sent = client.upload(start, trained, memory)
    residual = {n: a.numpy() for n, a in memory.array_records[RESIDUAL_KEY].items()}
    for name in start:
        np.testing.assert_allclose(sent[name].to_dense() + residual[name],
                                   start[name] - trained[name], rtol=0, atol=1e-6)
    # next round: the remainder is added before selection
    start2, trained2 = _state(rng), _state(rng)
    sent2 = client.upload(start2, trained2, memory)
    residual2 = {n: a.numpy() for n, a in memory.array_records[RESIDUAL_KEY].items()}
    for name in start:
        np.testing.assert_allclose(sent2[name].to_dense() + residual2[name],
                                   start2[name] - trained2[name] + residual[name],
                                   rtol=0, atol=1e-5)


def test_cellm_dense_sgd_equals_averaging_client_models():
    rng = np.random.default_rng(10)
    strategy = _strategy(Cellm, rng, **{"cellm-up-density": 1.0})
    clients = [_state(rng) for _ in range(3)]
    weights = [1.0, 2.0, 5.0]
    updates = [ClientUpdate(i, i, R, w, {n: strategy.sent[n] - c[n] for n in c})
               for i, (w, c) in enumerate(zip(weights, clients))]
    merged = _merged(strategy, updates)
    for name in SHAPES:
        expected = sum(w / 8.0 * c[name] for w, c in zip(weights, clients))
        np.testing.assert_allclose(merged[name], expected, rtol=1e-5, atol=1e-5)


def test_cellm_sparse_download_masks_the_global():
    rng = np.random.default_rng(11)
    strategy = _strategy(Cellm, rng, **{"cellm-down-density": 0.2})
    sent, blob = strategy.download(strategy.state)
    nonzero = sum(int(np.count_nonzero(v)) for v in sent.values())
    assert nonzero == round(0.2 * sum(v.size for v in strategy.state.values()))
    assert len(blob) < len(codec.encode(strategy.state))
    decoded = codec.decode(blob, _download_shapes(strategy))
    for name in sent:
        np.testing.assert_array_equal(decoded[name], sent[name])


def test_cellm_adam_state_round_trips():
    rng = np.random.default_rng(12)
    keys = {"cellm-server-optimizer": "adam", "cellm-server-lr": 1e-3}
    first = _strategy(Cellm, rng, **keys)
    updates = _updates(rng)
    _merged(first, updates)
    saved = first.state_dict()
    second = _strategy(Cellm, np.random.default_rng(12), **keys)
    second.state = first.state
    second.load_state_dict(saved)
    np.testing.assert_array_equal(_merged(first, updates)["m.q.lora_A.weight"],
                                  _merged(second, updates)["m.q.lora_A.weight"])


# -- configuration -----------------------------------------------------------------
@pytest.mark.parametrize("overrides, needle", [
    ({"strategy": "cellm", "cellm-up-density": 0.0}, "cellm-up-density"),
    ({"strategy": "cellm", "cellm-down-density": 1.5}, "cellm-down-density"),
    ({"strategy": "lora-fair", "fair-lambda": -0.1}, "fair-lambda"),
    ({"strategy": "fedavg", "fair-lambda": 0.5}, "applies to strategy lora-fair"),
    ({"strategy": "ffa", "cellm-up-density": 0.1}, "applies to strategy cellm"),
    ({"strategy": "cellm", "ffa-a-init": "gaussian"}, "applies to strategy ffa"),
])
def test_strategy_keys_are_validated(overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        resolve(overrides)
