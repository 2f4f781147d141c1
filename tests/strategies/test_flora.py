"""FLoRA (docs/algorithms.md §8): stacked factors merged into the base
exactly, a fresh LoRA every round, whatever the clients' ranks."""

from __future__ import annotations

import math

import numpy as np
import pytest
from by_hand import (
    A_NAMES,
    B_NAMES,
    EXAMPLES,
    HEAD,
    MODULES,
    NODES,
    RANKS,
    D,
    K,
    R,
    ask,
    client_uploads,
    ideal_delta,
    random_adapter,
    relative,
    run_round,
    strategy_config,
)

from fedlora.federation.fold import Fold
from fedlora.federation.round import ServerRound
from fedlora.strategies.base import ClientUpdate
from fedlora.strategies.flora import FLoRA
from fedlora.strategies.sums import StackedRoundSums
from fedlora.wire import codec

pytestmark = pytest.mark.usefixtures("run_identity")  # server messages need a task identity


def _flora(seed: int = 9, run_seed: int = 42):
    rng = np.random.default_rng(seed)
    strategy = FLoRA(strategy_config("flora", seed=run_seed, **{"client-ranks": RANKS}),
                     random_adapter(rng))
    return ServerRound(strategy), client_uploads(rng)


def test_flora_restarts_lora_fresh_and_deterministically():
    server, uploads = _flora()
    before = {n: v.copy() for n, v in server.adapter.items()}
    _, first, _ = run_round(server, uploads)
    for a, b in zip(A_NAMES, B_NAMES):
        assert not first[b].any()  # B = 0
        bound = 1 / math.sqrt(K)  # PEFT's kaiming_uniform(a=√5) on r×k: U(±1/√k)
        assert np.abs(first[a]).max() <= bound
        assert np.abs(first[a]).max() > 0.8 * bound  # that scale, not a smaller one
        assert not np.array_equal(first[a], before[a])
    for name in HEAD:
        want = sum(EXAMPLES[p] / 100 * uploads[p][name].astype(np.float64) for p in uploads)
        np.testing.assert_allclose(first[name], want, rtol=1e-5, atol=1e-6)

    twin, twin_uploads = _flora()  # same seed, same round → the same A, bit for bit
    _, same, _ = run_round(twin, twin_uploads)
    other, other_uploads = _flora(run_seed=43)
    _, different, _ = run_round(other, other_uploads)
    _, second, _ = run_round(server, uploads, server_round=2)
    for a in A_NAMES:
        np.testing.assert_array_equal(same[a], first[a])
        assert not np.array_equal(different[a], first[a])
        assert not np.array_equal(second[a], first[a])  # a new A every round
    assert not np.array_equal(first[A_NAMES[0]], first[A_NAMES[1]])


def test_flora_base_change_is_the_exact_weighted_sum():
    """left @ right = s·Σ p_k B'_k A'_k = Σ p_k s_k B_k A_k, ranks 2, 4, 8."""
    server, uploads = _flora(10)
    ranks = {0: 2, 1: 4, 2: 8}
    _, _, metrics = run_round(server, uploads)
    assert metrics["base_version"] == 1 and server.base.version == 1
    increment = server.base.log[0]
    assert set(increment) == {"m.q.weight", "m.v.weight"}
    for module in MODULES:
        left, right = increment[f"{module}.weight"]
        assert left.shape == (D, 3 * R) and right.shape == (3 * R, K)  # K·r, in global units
        ideal = ideal_delta(uploads, ranks, module)
        assert relative(left.astype(np.float64) @ right, ideal) < 1e-6
        assert relative(server.base_delta[f"{module}.weight"].astype(np.float64),
                        ideal) < 1e-6
    assert metrics["agg_residual"] < 1e-6


def test_flora_stack_does_not_depend_on_reply_order():
    results = []
    for order in ([0, 1, 2], [2, 0, 1], [1, 2, 0]):
        server, uploads = _flora(11)
        _, merged, _ = run_round(server, uploads, order=order)
        log = b"".join(codec.encode({f"{m}/{i}": f for m, pair in inc.items()
                                     for i, f in enumerate(pair)}) for inc in server.base.log)
        results.append((codec.encode(merged), log, codec.encode(server.base_delta)))
    assert results[0] == results[1] == results[2]


def test_stacked_sums_order_by_partition():
    """The sums path: updates folded in two orders stack to the same bytes."""
    server, uploads = _flora(12)
    ask(server)  # the strategy's downloads, as a round sets them
    ranks = {0: 2, 1: 4, 2: 8}
    updates = [ClientUpdate(NODES[p], p, ranks[p], float(EXAMPLES[p]), uploads[p])
               for p in range(3)]
    fold = Fold(server.strategy)
    one, two = fold.sums(updates), fold.sums(updates[::-1])
    assert isinstance(one, StackedRoundSums)
    for a, b in zip(A_NAMES, B_NAMES):
        (b1, a1), (b2, a2) = one.stack(a, b), two.stack(a, b)
        assert b1.tobytes() == b2.tobytes() and a1.tobytes() == a2.tobytes()
        # partition 0 (rank 2) first: its rescaled B' fills columns 0-1, zeros 2-7
        np.testing.assert_allclose(b1[:, :2], uploads[0][b] * (R / 2), rtol=1e-7)
        assert not b1[:, 2:R].any()
        np.testing.assert_allclose(a1[:2], 0.1 * uploads[0][a].astype(np.float64), rtol=1e-6)
