"""HetLoRA (docs/algorithms.md §6): heterogeneous ranks, factors zero-padded
to the global rank in global units and summed with update-norm weights."""

from __future__ import annotations

import math

import numpy as np
import pytest
from by_hand import (
    A_NAMES,
    ALPHA,
    B_NAMES,
    EXAMPLES,
    HEAD,
    RANKS,
    D,
    R,
    S,
    adapter_shapes,
    client_uploads,
    global_units,
    random_adapter,
    run_round,
    strategy_config,
)

from fedlora.federation.round import ServerRound
from fedlora.strategies.hetlora import HetLoRA, update_norm
from fedlora.strategies.ranks import shapes_at
from fedlora.wire import codec
from fedlora.wire.messages import Request

pytestmark = pytest.mark.usefixtures("run_identity")  # server messages need a task identity


def test_hetlora_update_norm_is_the_dense_norm():
    factors = random_adapter(np.random.default_rng(3))
    dense = math.sqrt(sum(np.sum((S * factors[b].astype(np.float64) @ factors[a]) ** 2)
                          for a, b in zip(A_NAMES, B_NAMES)))
    assert update_norm(factors, S) == pytest.approx(dense, rel=1e-10)
    assert update_norm({**factors, **{b: np.zeros((D, R), np.float32) for b in B_NAMES}},
                       S) == 0.0


def _hetlora_round(seed: int):
    rng = np.random.default_rng(seed)
    server = ServerRound(HetLoRA(strategy_config("hetlora", **{"client-ranks": RANKS}),
                                 random_adapter(rng)))
    start = {n: v.copy() for n, v in server.adapter.items()}
    uploads = client_uploads(rng)
    requests, merged, metrics = run_round(server, uploads)
    return server, start, uploads, requests, merged, metrics


def test_hetlora_download_is_the_truncated_global():
    _, start, _, requests, _, _ = _hetlora_round(4)
    assert Request.from_message(requests[0]).task.rank == 2
    sent = codec.decode(Request.from_message(requests[0]).payload, shapes_at(adapter_shapes(), 2))
    for a, b in zip(A_NAMES, B_NAMES):
        np.testing.assert_array_equal(sent[a], start[a][:2])
        np.testing.assert_allclose(ALPHA / 2 * sent[b].astype(np.float64) @ sent[a],
                                   S * start[b][:, :2].astype(np.float64) @ start[a][:2],
                                   rtol=1e-6, atol=1e-6)


def test_hetlora_weights_factors_by_update_norm():
    """A ← Σ S_k A'_k / Σ S_k, B likewise, S_k = ‖s_k B_k A_k‖_F over all modules."""
    _, _, uploads, _, merged, metrics = _hetlora_round(5)
    ranks = {0: 2, 1: 4, 2: 8}
    assert metrics["clients"] == 3
    norms = {p: ALPHA / ranks[p] * math.sqrt(sum(
        np.sum((uploads[p][b].astype(np.float64) @ uploads[p][a]) ** 2)
        for a, b in zip(A_NAMES, B_NAMES))) for p in uploads}
    padded = {p: global_units(uploads[p], ranks[p]) for p in uploads}
    total = sum(norms.values())
    for name in (*A_NAMES, *B_NAMES):
        want = sum(norms[p] / total * padded[p][name] for p in uploads)
        np.testing.assert_allclose(merged[name], want, rtol=1e-5, atol=1e-6)
        # not the example-weighted mean: the weighting is what is tested
        by_examples = sum(EXAMPLES[p] / 100 * padded[p][name] for p in uploads)
        assert not np.allclose(merged[name], by_examples, rtol=1e-3, atol=1e-4)
    # the rank-2 client touched only the first 2 ranks of A: row 7 is the others' alone
    a = A_NAMES[0]
    np.testing.assert_allclose(merged[a][4:], norms[2] / total * uploads[2][a][4:],
                               rtol=1e-5, atol=1e-6)


def test_hetlora_residuals_are_against_the_example_weighted_ideal():
    """docs/algorithms.md §0: ΔW* = Σ p_k s_k B_kA_k with p_k ∝ examples for
    every strategy (HetLoRA's norm weights are its rule for the global, not
    the target), and agg_residual_fedavg is FedIT's example-weighted (Ā, B̄)."""
    _, _, uploads, _, merged, metrics = _hetlora_round(5)
    ranks = {0: 2, 1: 4, 2: 8}
    padded = {p: global_units(uploads[p], ranks[p]) for p in uploads}
    p_k = {p: EXAMPLES[p] / sum(EXAMPLES.values()) for p in uploads}
    error = fedit_error = norm = 0.0
    for a, b in zip(A_NAMES, B_NAMES):
        ideal = sum(p_k[p] * padded[p][b].astype(np.float64) @ padded[p][a] for p in uploads)
        mean_a = sum(p_k[p] * padded[p][a].astype(np.float64) for p in uploads)
        mean_b = sum(p_k[p] * padded[p][b].astype(np.float64) for p in uploads)
        error += np.sum((ideal - merged[b].astype(np.float64) @ merged[a]) ** 2)
        fedit_error += np.sum((ideal - mean_b @ mean_a) ** 2)
        norm += np.sum(ideal ** 2)
    assert metrics["agg_residual"] == pytest.approx(math.sqrt(error / norm), rel=1e-4)
    assert metrics["agg_residual_fedavg"] == pytest.approx(math.sqrt(fedit_error / norm),
                                                           rel=1e-4)


def test_hetlora_head_takes_the_same_norm_weights():
    """docs/algorithms.md §6: the whole update a client sends is weighed by
    S_k, the head included (head ← Σ w_k h_k), not by examples."""
    _, _, uploads, _, merged, _ = _hetlora_round(6)
    ranks = {0: 2, 1: 4, 2: 8}
    norms = {p: ALPHA / ranks[p] * math.sqrt(sum(
        np.sum((uploads[p][b].astype(np.float64) @ uploads[p][a]) ** 2)
        for a, b in zip(A_NAMES, B_NAMES))) for p in uploads}
    total = sum(norms.values())
    for name in HEAD:
        want = sum(norms[p] / total * uploads[p][name].astype(np.float64) for p in uploads)
        np.testing.assert_allclose(merged[name], want, rtol=1e-5, atol=1e-6)
        by_examples = sum(EXAMPLES[p] / 100 * uploads[p][name].astype(np.float64)
                          for p in uploads)
        assert not np.allclose(merged[name], by_examples, rtol=1e-3, atol=1e-4)
