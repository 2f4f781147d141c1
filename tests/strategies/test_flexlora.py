"""FlexLoRA (docs/algorithms.md §7): the average ΔW, redistributed by SVD at
each client's rank."""

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
    MODULES,
    RANKS,
    D,
    R,
    S,
    adapter_shapes,
    ask,
    client_uploads,
    ideal_delta,
    random_adapter,
    relative,
    run_round,
    strategy_config,
)

from fedlora.federation.round import ServerRound
from fedlora.strategies.flexlora import FlexLoRA
from fedlora.strategies.ranks import shapes_at
from fedlora.wire import codec
from fedlora.wire.messages import Request

pytestmark = pytest.mark.usefixtures("run_identity")  # server messages need a task identity


def _best(delta: np.ndarray, rank: int) -> np.ndarray:
    u, sigma, vt = np.linalg.svd(delta, full_matrices=False)
    return (u[:, :rank] * sigma[:rank]) @ vt[:rank]


def test_flexlora_global_is_the_best_rank_r_approximation():
    rng = np.random.default_rng(7)
    server = ServerRound(FlexLoRA(strategy_config("flexlora", **{"client-ranks": RANKS}),
                                  random_adapter(rng)))
    uploads = client_uploads(rng)
    ranks = {0: 2, 1: 4, 2: 8}
    _, merged, metrics = run_round(server, uploads)
    tail = norm = 0.0
    for module, a, b in zip(MODULES, A_NAMES, B_NAMES):
        delta = ideal_delta(uploads, ranks, module)
        assert np.linalg.matrix_rank(delta) == D  # 2+4+8 > 8: rank r cannot hold it
        got = S * merged[b].astype(np.float64) @ merged[a]
        assert relative(got, _best(delta, R)) < 1e-5
        assert relative(got, delta) > 1e-3  # the tail is really cut
        sigma = np.linalg.svd(delta, compute_uv=False)
        tail += float(np.sum(sigma[R:] ** 2))
        norm += float(np.sum(sigma ** 2))
    for name in HEAD:
        want = sum(EXAMPLES[p] / 100 * uploads[p][name].astype(np.float64) for p in uploads)
        np.testing.assert_allclose(merged[name], want, rtol=1e-5, atol=1e-6)
    # agg_residual is the relative SVD tail beyond rank r (docs §7)
    assert metrics["agg_residual"] == pytest.approx(math.sqrt(tail / norm), rel=1e-4)


def test_flexlora_download_is_the_best_rank_rk_in_the_clients_scale():
    rng = np.random.default_rng(8)
    strategy = FlexLoRA(strategy_config("flexlora", **{"client-ranks": RANKS}),
                        random_adapter(rng))
    server = ServerRound(strategy)
    uploads = client_uploads(rng)
    ranks = {0: 2, 1: 4, 2: 8}
    run_round(server, uploads)
    requests = ask(server, server_round=2)
    for partition, rank in ranks.items():
        request = Request.from_message(requests[partition])
        assert request.task.rank == rank
        sent = codec.decode(request.payload, shapes_at(adapter_shapes(), rank))
        start, _ = strategy.download_at(rank)
        for module, a, b in zip(MODULES, A_NAMES, B_NAMES):
            np.testing.assert_array_equal(sent[a], start[a])
            np.testing.assert_array_equal(sent[b], start[b])
            got = ALPHA / rank * sent[b].astype(np.float64) @ sent[a]  # s_k·B_k·A_k
            assert relative(got, _best(ideal_delta(uploads, ranks, module), rank)) < 1e-5
