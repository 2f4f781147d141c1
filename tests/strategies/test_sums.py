"""The round's ΔW* = Σ p_k B_k A_k when it is formed from kept factors
(``RoundSums.settle``): exact enough, independent of the order replies
arrive in, refusing what the streamed sums refuse; and the one sum a
factor shares with its upload forks exactly."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from fedlora.strategies import sums as sums_module
from fedlora.strategies.sums import ClientUpdate, RoundSums, StackedRoundSums

A, B = "m.lora_A.weight", "m.lora_B.weight"
HEAD = "head.weight"


def _client(rng, rank=4, d=16, k=12) -> dict[str, np.ndarray]:
    return {A: rng.standard_normal((rank, k)).astype(np.float32),
            B: rng.standard_normal((d, rank)).astype(np.float32),
            HEAD: rng.standard_normal((3, d)).astype(np.float32)}


def _folded(clients, order, **mode) -> RoundSums:
    sums = RoundSums(**mode)
    for i in order:
        partition, weight, factors = clients[i]
        sums.add(ClientUpdate(100 + i, partition, 4, weight, factors), factors)
    sums.settle()
    return sums


def _round(seed=0):
    rng = np.random.default_rng(seed)
    weights = rng.integers(1, 300, 6).astype(float)
    clients = [(p, w, _client(rng)) for p, w in zip([3, 0, 5, 1, 4, 2], weights)]
    # a partition answered twice with the same weight (ties broken by content)
    clients.append((5, weights[2], _client(rng)))
    return clients


def test_deferred_ideal_does_not_depend_on_arrival_order():
    clients = _round()
    sent = {A: clients[0][2][A], B: clients[0][2][B]}
    results = set()
    for order in ([0, 1, 2, 3, 4, 5, 6], [6, 5, 4, 3, 2, 1, 0], [3, 0, 6, 1, 5, 2, 4],
                  [6, 2, 4, 0, 1, 3, 5]):
        sums = _folded(clients, order)
        results.add((sums.ideal(A, B).tobytes(), sums.residual(sent)))
    assert len(results) == 1


def _cancelling(partitions):
    """Three rank-1 clients whose products cancel: +X, a small ε, and −X.
    (X − X) + ε is ε; (X + ε) − X loses ε below X's last bit, visibly even
    in float32 — so only one fixed order of the stack gives one result."""
    def client(b, a):
        return {A: np.array([[a]], np.float32), B: np.array([[b]], np.float32)}
    factors = [client(1e4, 1e4), client(1e-5, 1.2345e-4), client(1e4, -1e4)]
    return [(p, 1.0, f) for p, f in zip(partitions, factors)]


# (0, 1, 2): ordered by partition; (7, 7, 7): one partition answering thrice
# with the same weight, ordered by the digest of its factors
PARTITIONS = [(0, 2, 1), (7, 7, 7)]


@pytest.mark.parametrize("partitions", PARTITIONS)
def test_cancelling_products_are_summed_in_one_order_whatever_the_arrival(partitions):
    clients = _cancelling(partitions)
    ideals = {_folded(clients, order).ideal(A, B).tobytes()
              for order in itertools.permutations(range(3))}
    assert len(ideals) == 1
    if partitions == (0, 2, 1):  # +X, −X, then ε: exact
        expected = np.float64(np.float32(1e-5)) * np.float64(np.float32(1.2345e-4)) / 3
        assert _folded(clients, [1, 0, 2]).ideal(A, B)[0, 0] == np.float32(expected)


@pytest.mark.parametrize("partitions", PARTITIONS)
def test_in_arrival_order_the_stack_would_depend_on_it(monkeypatch, partitions):
    """The test above can fail: stacked as the replies arrive (or, for one
    partition's ties, sorted by partition and weight alone: a stable sort
    keeps them in arrival order), the same round gives other bytes in
    another order."""
    orders = [list, lambda c: sorted(c, key=lambda client: client[:2])]
    for arrival in orders[:1] if partitions == (0, 2, 1) else orders:
        monkeypatch.setattr(sums_module, "canonical_order", arrival)
        clients = _cancelling(partitions)
        ideals = {_folded(clients, order).ideal(A, B).tobytes()
                  for order in itertools.permutations(range(3))}
        assert len(ideals) > 1


def test_deferred_ideal_is_the_float64_sum_within_its_bound():
    """|ideal − ref| ≤ 2^-24·|ref| (the float32 result) + 2^-40·Σ p_k |B_k||A_k|
    (the float64 product of Σr = 28 terms: ≤ 28·2^-53 of it), ref the
    per-client float64 products summed exactly (math.fsum)."""
    import math

    clients = _round(1)
    ideal = _folded(clients, range(7)).ideal(A, B).astype(np.float64)
    total = sum(w for _, w, _ in clients)
    terms = [w * (f[B].astype(np.float64) @ f[A].astype(np.float64)) for _, w, f in clients]
    magnitude = sum(w * (np.abs(f[B].astype(np.float64)) @ np.abs(f[A].astype(np.float64)))
                    for _, w, f in clients) / total
    reference = np.array([[math.fsum(t[i, j] for t in terms) for j in range(12)]
                          for i in range(16)]) / total
    assert np.all(np.abs(ideal - reference) <= 2.0 ** -24 * np.abs(reference)
                  + 2.0 ** -40 * magnitude)
    streamed = _folded(clients, range(7), streamed_products=True).ideal(A, B)
    np.testing.assert_allclose(ideal, streamed, rtol=0, atol=1e-5 * magnitude.max())


def test_stacked_sums_settle_from_the_same_kept_factors():
    clients = _round(2)
    stacked = StackedRoundSums()
    for partition, weight, factors in clients:
        stacked.add(ClientUpdate(partition, partition, 4, weight, factors), factors)
    b_stack, a_stack = stacked.stack(A, B)
    assert stacked.ideal(A, B).tobytes() == _folded(clients, range(7)).ideal(A, B).tobytes()
    np.testing.assert_allclose(b_stack.astype(np.float64) @ a_stack, stacked.ideal(A, B),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("streamed", [True, False])
def test_a_product_too_large_to_add_is_refused_before_anything_changes(streamed):
    """Factors within LIMIT whose product is not: refused whether the
    products are streamed or formed at the end (the same replies rejected)."""
    rng = np.random.default_rng(3)
    fine = _client(rng)
    big = {**_client(rng), A: np.full((4, 12), 2.0 ** 19, np.float32),
           B: np.full((16, 4), 2.0 ** 19, np.float32)}  # B·A = 2^40 = LIMIT
    sums = RoundSums(streamed_products=streamed)
    sums.add(ClientUpdate(1, 1, 4, 2.0, fine), fine)
    with pytest.raises(OverflowError):
        sums.add(ClientUpdate(2, 2, 4, 1.0, big), big)
    assert sums.count == 1 and sums.examples == 2.0
    just_below = {**big, A: np.full((4, 12), 2.0 ** 17, np.float32)}  # 4·2^36 = 2^38
    sums.add(ClientUpdate(3, 3, 4, 1.0, just_below), just_below)
    assert sums.count == 2


def test_a_factor_sharing_its_uploads_sum_forks_exactly():
    """FedAvg uploads the very arrays it folds as factors, with the same
    weight: one sum serves both until an update differs (another weight, as
    HetLoRA's, or other arrays); the sums are bit for bit those of separate
    ones."""
    rng = np.random.default_rng(4)
    updates = [(ClientUpdate(i, i, 4, float(w), _client(rng)), weight)
               for i, (w, weight) in enumerate([(5, None), (7, None), (3, 0.25), (9, None)])]

    def folded(share: bool) -> RoundSums:
        sums = RoundSums(products=False)
        for update, weight in updates:
            factors = update.tensors if share else {n: v.copy() for n, v in
                                                      update.tensors.items()}
            sums.add(update, factors, weight)
        return sums

    shared, apart = folded(True), folded(False)
    for name in (A, B, HEAD):
        assert shared.factor_mean()[name].tobytes() == apart.factor_mean()[name].tobytes()
        assert shared.mean()[name].tobytes() == apart.mean()[name].tobytes()
    assert list(shared.factor_mean()) == list(apart.factor_mean())
