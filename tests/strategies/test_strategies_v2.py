"""Strategy contract v2: per-client ranks, FedSA, HetLoRA, FlexLoRA, FLoRA,
FedEx-LoRA, the registry/config checks and federated evaluation, each against
a hand computation of docs/algorithms.md (§5-§9, "global units").

Rounds are driven through the server's own path: ``configure_train`` with a
fake grid (so ``sent``/``_sent_at`` are what a real round sets), replies built
with ``TrainReply.to_message``, then ``aggregate_train``. The hand
computations below never call ``ranks.pad``/``truncate``: they redo the
algebra in float64.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from flwr.app import ConfigRecord, Error, Message, RecordDict

from fedlora.commands.cli import main
from fedlora.core.config import ConfigError
from fedlora.strategies import resolve, strategies
from fedlora.strategies.base import ClientUpdate, to_arrayrecord
from fedlora.strategies.fedavg import FedAvgLoRA
from fedlora.strategies.fedex import FedExLoRA
from fedlora.strategies.fedsa import PERSONAL_KEY, FedSA, FedSAClient
from fedlora.strategies.flexlora import FlexLoRA
from fedlora.strategies.flora import FLoRA
from fedlora.strategies.hetlora import HetLoRA, update_norm
from fedlora.strategies.ranks import pad, parse_ranks, rank_of, shapes_at, truncate
from fedlora.strategies.sums import StackedRoundSums
from fedlora.wire import codec
from fedlora.wire.basedelta import BaseLedger, NodeBase
from fedlora.wire.messages import EvaluateReply, Request, TrainReply

pytestmark = pytest.mark.usefixtures("run_identity")  # server messages need a task identity

D, K, R = 10, 12, 8  # non-square (d ≠ k) modules; global rank 8
ALPHA = 16.0
S = ALPHA / R  # the global scale
MODULES = ("m.q", "m.v")
A_NAMES = [f"{m}.lora_A.weight" for m in MODULES]
B_NAMES = [f"{m}.lora_B.weight" for m in MODULES]
HEAD = ("m.classifier.weight", "m.classifier.bias")
NODES = (101, 102, 103)  # sorted: node at position i trains partition i
EXAMPLES = {0: 10, 1: 30, 2: 60}  # p = 0.1, 0.3, 0.6
RANKS = "2,4,8"  # partition 0 → 2, 1 → 4, 2 → 8


def _shapes(rank: int = R, d: int = D, k: int = K) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for m in MODULES:
        shapes[f"{m}.lora_A.weight"] = (rank, k)
        shapes[f"{m}.lora_B.weight"] = (d, rank)
    shapes["m.classifier.weight"] = (3, d)
    shapes["m.classifier.bias"] = (3,)
    return shapes


def _state(rng: np.random.Generator, rank: int = R, d: int = D, k: int = K
           ) -> dict[str, np.ndarray]:
    return {n: rng.standard_normal(s).astype(np.float32)
            for n, s in _shapes(rank, d, k).items()}


def _config(strategy: str, **keys):
    return resolve({"num-clients": len(NODES), "clients-per-round": len(NODES),
                    "strategy": strategy, "lora-rank": R, "lora-alpha": ALPHA, **keys})


class FakeGrid:
    """What ``sample_nodes`` reads of Flower's Grid."""

    def __init__(self, nodes=NODES) -> None:
        self.nodes = list(nodes)

    def get_node_ids(self) -> list[int]:
        return self.nodes


def _ask(strategy, state, server_round: int = 1) -> dict[int, Message]:
    """configure_train; the requests by partition id."""
    messages = strategy.configure_train(server_round, to_arrayrecord(state), ConfigRecord(),
                                        FakeGrid())
    return {Request.from_message(m).task.partition_id: m for m in messages}


def _replies(requests: dict[int, Message], uploads: dict[int, dict], order=None
             ) -> list[Message]:
    replies = []
    for partition in order or sorted(uploads):
        request = requests[partition]
        task = Request.from_message(request).task
        replies.append(TrainReply(partition, EXAMPLES[partition], 0.5, 1, 0.0,
                                  codec.encode(uploads[partition]), task.base_version
                                  ).to_message(request))
    return replies


def _round(strategy, state, uploads, server_round=1, order=None):
    """One round through the server's path: (requests, merged state, metrics)."""
    requests = _ask(strategy, state, server_round)
    arrays, metrics = strategy.aggregate_train(server_round,
                                               _replies(requests, uploads, order))
    assert arrays is not None, metrics
    return requests, {n: a.numpy() for n, a in arrays.items()}, metrics


def _client_uploads(rng, ranks=(2, 4, 8)) -> dict[int, dict[str, np.ndarray]]:
    """Trained adapters of partitions 0..2 at their own ranks (all tensors)."""
    return {p: _state(rng, rank) for p, rank in enumerate(ranks)}


def _global_units(tensors: dict, rank: int) -> dict[str, np.ndarray]:
    """By hand: A'=[A; 0], B'=[(s_k/s)·B, 0] = [(R/r_k)·B, 0], float64."""
    out = {}
    for name, value in tensors.items():
        value = value.astype(np.float64)
        if ".lora_A." in name:
            out[name] = np.zeros((R, value.shape[1]))
            out[name][:rank] = value
        elif ".lora_B." in name:
            out[name] = np.zeros((value.shape[0], R))
            out[name][:, :rank] = value * (R / rank)
        else:
            out[name] = value
    return out


def _ideal(uploads, ranks, module: str) -> np.ndarray:
    """ΔW* = Σ p_k s_k B_k A_k (float64), p_k by examples."""
    total = sum(EXAMPLES[p] for p in uploads)
    return sum(EXAMPLES[p] / total * (ALPHA / ranks[p])
               * uploads[p][f"{module}.lora_B.weight"].astype(np.float64)
               @ uploads[p][f"{module}.lora_A.weight"] for p in uploads)


def _relative(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.linalg.norm(x - y) / np.linalg.norm(y))


# -- §6 ranks ---------------------------------------------------------------------
@pytest.mark.parametrize("text, ranks", [("2,4,8", (2, 4, 8)), ("", ()), (" 2 , 4 ", (2, 4)),
                                         ("8", (8,))])
def test_parse_ranks(text, ranks):
    assert parse_ranks(text) == ranks


@pytest.mark.parametrize("text", ["a", "2,x", "2,0", "-1", "2.5", "4,-4"])
def test_parse_ranks_refuses_non_positive_integers(text):
    with pytest.raises(ValueError, match="comma-separated positive integers"):
        parse_ranks(text)


def test_rank_of_cycles_by_partition_id():
    config = _config("hetlora", **{"client-ranks": RANKS})
    assert [rank_of(config, p) for p in range(7)] == [2, 4, 8, 2, 4, 8, 2]
    assert [rank_of(_config("hetlora"), p) for p in range(3)] == [R, R, R]
    strategy = HetLoRA(config, _state(np.random.default_rng(0)))
    assert [strategy.rank_for(p) for p in range(4)] == [2, 4, 8, 2]
    # a strategy without heterogeneous ranks trains everyone at lora-rank
    assert FedExLoRA(_config("fedex"), _state(np.random.default_rng(0))).rank_for(0) == R


def test_shapes_at():
    assert shapes_at(_shapes(), 2) == {
        "m.q.lora_A.weight": (2, K), "m.q.lora_B.weight": (D, 2),
        "m.v.lora_A.weight": (2, K), "m.v.lora_B.weight": (D, 2),
        "m.classifier.weight": (3, D), "m.classifier.bias": (3,)}
    assert shapes_at(_shapes(), R) == _shapes()


@pytest.mark.parametrize("rank", [1, 2, 3, 5])
def test_truncate_keeps_the_truncated_global_delta(rank):
    """s_k·B_k·A_k = s·B[:, :r_k]·A[:r_k] (docs §6 download), head untouched."""
    state = _state(np.random.default_rng(rank))
    small = truncate(state, rank, R)
    assert {n: v.shape for n, v in small.items()} == shapes_at(_shapes(), rank)
    for a, b in zip(A_NAMES, B_NAMES):
        np.testing.assert_array_equal(small[a], state[a][:rank])
        want = S * state[b][:, :rank].astype(np.float64) @ state[a][:rank]
        np.testing.assert_allclose(ALPHA / rank * small[b].astype(np.float64) @ small[a],
                                   want, rtol=1e-6, atol=1e-6)
    for h in HEAD:
        np.testing.assert_array_equal(small[h], state[h])


@pytest.mark.parametrize("rank", [1, 2, 3, 5])
def test_pad_keeps_the_client_delta(rank):
    """s·B'·A' = s_k·B_k·A_k, padding zero (docs "global units")."""
    client = _state(np.random.default_rng(10 + rank), rank)
    padded = pad(client, rank, R)
    assert {n: v.shape for n, v in padded.items()} == _shapes()
    for a, b in zip(A_NAMES, B_NAMES):
        assert not padded[a][rank:].any() and not padded[b][:, rank:].any()
        want = ALPHA / rank * client[b].astype(np.float64) @ client[a]
        np.testing.assert_allclose(S * padded[b].astype(np.float64) @ padded[a], want,
                                   rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(padded[b], _global_units(client, rank)[b], rtol=1e-7)
    for h in HEAD:
        np.testing.assert_array_equal(padded[h], client[h])


@pytest.mark.parametrize("rank", [2, 3, 8])
def test_pad_and_truncate_are_inverse_on_the_first_ranks(rank):
    rng = np.random.default_rng(20 + rank)
    client = _state(rng, rank)
    back = truncate(pad(client, rank, R), rank, R)  # a rank-r_k state survives the trip
    for name, value in client.items():
        np.testing.assert_allclose(back[name], value, rtol=1e-6, atol=0)
    glob = _state(rng)
    again = pad(truncate(glob, rank, R), rank, R)  # a global one keeps its first r_k ranks
    for a, b in zip(A_NAMES, B_NAMES):
        np.testing.assert_array_equal(again[a][:rank], glob[a][:rank])
        np.testing.assert_allclose(again[b][:, :rank], glob[b][:, :rank], rtol=1e-6)
        assert not again[a][rank:].any() and not again[b][:, rank:].any()


# -- §5 fedsa ---------------------------------------------------------------------
def test_fedsa_moves_only_a():
    config = _config("fedsa")
    roles = FedSAClient(config)
    assert roles.download_names(_shapes()) == A_NAMES
    assert roles.upload_names(_shapes()) == A_NAMES
    assert all(roles.trains(kind) for kind in ("lora_A", "lora_B", "head"))
    strategy = FedSA(config, _state(np.random.default_rng(0)))
    assert set(strategy.upload_shapes) == set(A_NAMES)
    assert strategy.personal and FedSA.evaluation_prefix(config) == "personal"
    requests = _ask(strategy, strategy.state)
    sent = codec.decode_any(Request.from_message(requests[0]).payload)
    assert set(sent) == set(A_NAMES)
    for name in A_NAMES:
        np.testing.assert_array_equal(sent[name], strategy.state[name])


def test_fedsa_merge_averages_a_and_leaves_b_and_head():
    rng = np.random.default_rng(1)
    strategy = FedSA(_config("fedsa"), _state(rng))
    before = {n: v.copy() for n, v in strategy.state.items()}
    uploads = {p: {n: rng.standard_normal((R, K)).astype(np.float32) for n in A_NAMES}
               for p in range(3)}
    _, merged, metrics = _round(strategy, before, uploads)
    assert metrics["clients"] == 3 and metrics["rejected"] == 0
    for name in A_NAMES:
        want = sum(EXAMPLES[p] / 100 * uploads[p][name].astype(np.float64) for p in uploads)
        np.testing.assert_allclose(merged[name], want, rtol=1e-6, atol=1e-7)
    for name in (*B_NAMES, *HEAD):
        np.testing.assert_array_equal(merged[name], before[name])
    # the sums path gives the same (ClientUpdate → sums → merge)
    updates = [ClientUpdate(NODES[p], p, R, float(EXAMPLES[p]), uploads[p]) for p in (2, 0, 1)]
    again = strategy.merge(strategy.sums(updates))
    for name in merged:
        np.testing.assert_array_equal(again[name], merged[name])


def test_fedsa_client_keeps_b_and_head():
    rng = np.random.default_rng(2)
    roles = FedSAClient(_config("fedsa"))
    template, memory = _state(rng), RecordDict()
    received = {n: rng.standard_normal((R, K)).astype(np.float32) for n in A_NAMES}
    start = roles.start_state(received, template, memory)  # first round: the template's B/head
    for name, value in start.items():
        np.testing.assert_array_equal(value, received[name] if name in received
                                      else template[name])
    trained = _state(rng)
    upload = roles.upload(start, trained, memory)
    assert set(upload) == set(A_NAMES)
    for name in A_NAMES:
        np.testing.assert_array_equal(upload[name], trained[name])
    kept = {n: a.numpy() for n, a in memory.array_records[PERSONAL_KEY].items()}
    assert set(kept) == {*B_NAMES, *HEAD}
    received = {n: rng.standard_normal((R, K)).astype(np.float32) for n in A_NAMES}
    start = roles.start_state(received, template, memory)  # next round: its own B/head
    for name in A_NAMES:
        np.testing.assert_array_equal(start[name], received[name])
    for name in (*B_NAMES, *HEAD):
        np.testing.assert_array_equal(start[name], trained[name])
        assert not np.array_equal(start[name], template[name])


# -- §6 hetlora -------------------------------------------------------------------
def test_hetlora_update_norm_is_the_dense_norm():
    factors = _state(np.random.default_rng(3))
    dense = math.sqrt(sum(np.sum((S * factors[b].astype(np.float64) @ factors[a]) ** 2)
                          for a, b in zip(A_NAMES, B_NAMES)))
    assert update_norm(factors, S) == pytest.approx(dense, rel=1e-10)
    assert update_norm({**factors, **{b: np.zeros((D, R), np.float32) for b in B_NAMES}},
                       S) == 0.0


def _hetlora_round(seed: int):
    rng = np.random.default_rng(seed)
    strategy = HetLoRA(_config("hetlora", **{"client-ranks": RANKS}), _state(rng))
    start = {n: v.copy() for n, v in strategy.state.items()}
    uploads = _client_uploads(rng)
    requests, merged, metrics = _round(strategy, start, uploads)
    return strategy, start, uploads, requests, merged, metrics


def test_hetlora_download_is_the_truncated_global():
    strategy, start, _, requests, _, _ = _hetlora_round(4)
    assert Request.from_message(requests[0]).task.rank == 2
    sent = codec.decode(Request.from_message(requests[0]).payload, shapes_at(_shapes(), 2))
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
    padded = {p: _global_units(uploads[p], ranks[p]) for p in uploads}
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
    padded = {p: _global_units(uploads[p], ranks[p]) for p in uploads}
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


# -- §7 flexlora ------------------------------------------------------------------
def _best(delta: np.ndarray, rank: int) -> np.ndarray:
    u, sigma, vt = np.linalg.svd(delta, full_matrices=False)
    return (u[:, :rank] * sigma[:rank]) @ vt[:rank]


def test_flexlora_global_is_the_best_rank_r_approximation():
    rng = np.random.default_rng(7)
    strategy = FlexLoRA(_config("flexlora", **{"client-ranks": RANKS}), _state(rng))
    uploads = _client_uploads(rng)
    ranks = {0: 2, 1: 4, 2: 8}
    _, merged, metrics = _round(strategy, strategy.state, uploads)
    tail = norm = 0.0
    for module, a, b in zip(MODULES, A_NAMES, B_NAMES):
        delta = _ideal(uploads, ranks, module)
        assert np.linalg.matrix_rank(delta) == D  # 2+4+8 > 8: rank r cannot hold it
        got = S * merged[b].astype(np.float64) @ merged[a]
        assert _relative(got, _best(delta, R)) < 1e-5
        assert _relative(got, delta) > 1e-3  # the tail is really cut
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
    strategy = FlexLoRA(_config("flexlora", **{"client-ranks": RANKS}), _state(rng))
    uploads = _client_uploads(rng)
    ranks = {0: 2, 1: 4, 2: 8}
    _, merged, _ = _round(strategy, strategy.state, uploads)
    requests = _ask(strategy, merged, server_round=2)
    for partition, rank in ranks.items():
        request = Request.from_message(requests[partition])
        assert request.task.rank == rank
        sent = codec.decode(request.payload, shapes_at(_shapes(), rank))
        start, _ = strategy.download_at(rank)
        for module, a, b in zip(MODULES, A_NAMES, B_NAMES):
            np.testing.assert_array_equal(sent[a], start[a])
            np.testing.assert_array_equal(sent[b], start[b])
            got = ALPHA / rank * sent[b].astype(np.float64) @ sent[a]  # s_k·B_k·A_k
            assert _relative(got, _best(_ideal(uploads, ranks, module), rank)) < 1e-5


# -- §8 flora ---------------------------------------------------------------------
def _flora(seed: int = 9, run_seed: int = 42):
    rng = np.random.default_rng(seed)
    strategy = FLoRA(_config("flora", seed=run_seed, **{"client-ranks": RANKS}), _state(rng))
    return strategy, _client_uploads(rng)


def test_flora_restarts_lora_fresh_and_deterministically():
    strategy, uploads = _flora()
    before = {n: v.copy() for n, v in strategy.state.items()}
    _, first, _ = _round(strategy, before, uploads)
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
    _, same, _ = _round(twin, twin.state, twin_uploads)
    other, other_uploads = _flora(run_seed=43)
    _, different, _ = _round(other, other.state, other_uploads)
    _, second, _ = _round(strategy, first, uploads, server_round=2)
    for a in A_NAMES:
        np.testing.assert_array_equal(same[a], first[a])
        assert not np.array_equal(different[a], first[a])
        assert not np.array_equal(second[a], first[a])  # a new A every round
    assert not np.array_equal(first[A_NAMES[0]], first[A_NAMES[1]])


def test_flora_base_change_is_the_exact_weighted_sum():
    """left @ right = s·Σ p_k B'_k A'_k = Σ p_k s_k B_k A_k, ranks 2, 4, 8."""
    strategy, uploads = _flora(10)
    ranks = {0: 2, 1: 4, 2: 8}
    _, _, metrics = _round(strategy, strategy.state, uploads)
    assert metrics["base_version"] == 1 and strategy.base.version == 1
    increment = strategy.base.log[0]
    assert set(increment) == {"m.q.weight", "m.v.weight"}
    for module in MODULES:
        left, right = increment[f"{module}.weight"]
        assert left.shape == (D, 3 * R) and right.shape == (3 * R, K)  # K·r, in global units
        ideal = _ideal(uploads, ranks, module)
        assert _relative(left.astype(np.float64) @ right, ideal) < 1e-6
        assert _relative(strategy.base.cumulative[f"{module}.weight"].astype(np.float64),
                         ideal) < 1e-6
    assert metrics["agg_residual"] < 1e-6


def test_flora_stack_does_not_depend_on_reply_order():
    results = []
    for order in ([0, 1, 2], [2, 0, 1], [1, 2, 0]):
        strategy, uploads = _flora(11)
        _, merged, _ = _round(strategy, strategy.state, uploads, order=order)
        log = b"".join(codec.encode({f"{m}/{i}": f for m, pair in inc.items()
                                     for i, f in enumerate(pair)}) for inc in strategy.base.log)
        results.append((codec.encode(merged), log,
                        codec.encode(strategy.base.cumulative)))
    assert results[0] == results[1] == results[2]


def test_stacked_sums_order_by_partition():
    """The sums path: updates folded in two orders stack to the same bytes."""
    strategy, uploads = _flora(12)
    _ask(strategy, strategy.state)  # sets sent/_sent_at as a round does
    ranks = {0: 2, 1: 4, 2: 8}
    updates = [ClientUpdate(NODES[p], p, ranks[p], float(EXAMPLES[p]), uploads[p])
               for p in range(3)]
    one, two = strategy.sums(updates), strategy.sums(updates[::-1])
    assert isinstance(one, StackedRoundSums)
    for a, b in zip(A_NAMES, B_NAMES):
        (b1, a1), (b2, a2) = one.stack(a, b), two.stack(a, b)
        assert b1.tobytes() == b2.tobytes() and a1.tobytes() == a2.tobytes()
        # partition 0 (rank 2) first: its rescaled B' fills columns 0-1, zeros 2-7
        np.testing.assert_allclose(b1[:, :2], uploads[0][b] * (R / 2), rtol=1e-7)
        assert not b1[:, 2:R].any()
        np.testing.assert_allclose(a1[:2], 0.1 * uploads[0][a].astype(np.float64), rtol=1e-6)


# -- §9 fedex ---------------------------------------------------------------------
def _fedex_round(seed: int, d: int = D, k: int = K):
    rng = np.random.default_rng(seed)
    strategy = FedExLoRA(_config("fedex"), _state(rng, R, d, k))
    uploads = {p: _state(rng, R, d, k) for p in range(3)}
    w0 = {f"{m}.weight": rng.standard_normal((d, k)) for m in MODULES}
    _, merged, metrics = _round(strategy, strategy.state, uploads)
    return strategy, uploads, w0, merged, metrics


def test_fedex_base_plus_adapter_is_exact_on_non_square_weights():
    strategy, uploads, w0, merged, metrics = _fedex_round(13)
    ranks = {0: R, 1: R, 2: R}
    for module, a, b in zip(MODULES, A_NAMES, B_NAMES):
        weight = f"{module}.weight"
        new_w0 = w0[weight] + strategy.base.cumulative[weight]
        assert new_w0.shape == (D, K)
        got = new_w0 + S * merged[b].astype(np.float64) @ merged[a]
        want = w0[weight] + _ideal(uploads, ranks, module)
        assert _relative(got, want) < 1e-6
        assert _relative(got - w0[weight], want - w0[weight]) < 1e-6
        # the global is FedAvg's (Ā, B̄), by examples
        for name in (a, b):
            np.testing.assert_allclose(
                merged[name], sum(EXAMPLES[p] / 100 * uploads[p][name].astype(np.float64)
                                  for p in uploads), rtol=1e-5, atol=1e-6)
        left, right = strategy.base.log[0][weight]
        assert left.shape == (D, 4 * R) and right.shape == (4 * R, K)  # (K+1)·r
    assert metrics["agg_residual"] < 1e-6
    assert metrics["agg_residual_fedavg"] > 0.1  # FedIT's error that the residual fixes


def test_fedex_residual_transposed_would_be_wrong():
    strategy, uploads, w0, merged, _ = _fedex_round(14)
    left, right = strategy.base.log[0]["m.q.weight"]
    residual = left.astype(np.float64) @ right
    with pytest.raises(ValueError):  # the public code's R^T does not fit a d×k weight
        w0["m.q.weight"] + residual.T
    ledger = BaseLedger({"m.q.weight": (D, K)})
    with pytest.raises(ValueError, match="wrong shape"):
        ledger.apply({"m.q.weight": (right.T, left.T)})
    # on a square weight R^T fits, and misses the exact update
    strategy, uploads, w0, merged, _ = _fedex_round(15, d=K, k=K)
    left, right = strategy.base.log[0]["m.q.weight"]
    residual = left.astype(np.float64) @ right
    adapter = S * merged[B_NAMES[0]].astype(np.float64) @ merged[A_NAMES[0]]
    ideal = sum(EXAMPLES[p] / 100 * S * uploads[p][B_NAMES[0]].astype(np.float64)
                @ uploads[p][A_NAMES[0]] for p in uploads)
    assert _relative(residual + adapter, ideal) < 1e-6
    assert _relative(residual.T + adapter, ideal) > 0.1


def test_fedex_nodes_reach_the_servers_base():
    """The next round's request carries the change; a node that applies it
    holds the ledger's cumulative change; once it acknowledges, nothing more."""
    strategy, _, _, merged, _ = _fedex_round(16)
    requests = _ask(strategy, merged, server_round=2)
    shapes = {f"{m}.weight": (D, K) for m in MODULES}
    memory = RecordDict()
    request = Request.from_message(requests[1])
    assert request.base is not None and request.task.base_version == 1
    node = NodeBase(memory)
    node.update(request.base, request.task.base_from, request.task.base_version, shapes)
    assert node.version == 1
    for module, change in strategy.base.cumulative.items():
        np.testing.assert_array_equal(node.delta[module], change)
    strategy.base.acknowledge(NODES[1], 1)
    assert strategy.base.update_for(NODES[1]) == (1, None)


def test_a_node_that_lost_its_base_recovers_after_failing_once():
    """A node whose persistent state was lost (a restarted SuperNode) refuses
    an update that starts beyond what it holds (§10) and fails that round;
    the server must then send it something it can apply, not the same
    unusable increments forever. Sizes where increments beat the dense
    change (as on real models), so the server does send increments."""
    rng = np.random.default_rng(17)
    big, rank = 96, 2
    config = resolve({"num-clients": 3, "clients-per-round": 3, "strategy": "fedex",
                      "lora-rank": rank, "lora-alpha": 4.0})
    strategy = FedExLoRA(config, _state(rng, rank, big, big))
    shapes = {f"{m}.weight": (big, big) for m in MODULES}
    memories = {node: RecordDict() for node in NODES}
    failures = {}
    for server_round in range(1, 5):
        if server_round == 3:
            memories[NODES[0]] = RecordDict()  # node 101 restarts and forgets its base
        requests = _ask(strategy, strategy.state, server_round)
        replies, failures[server_round] = [], []
        for partition, message in sorted(requests.items()):
            request, node = Request.from_message(message), NODES[partition]
            held = NodeBase(memories[node])
            try:
                held.update(request.base, request.task.base_from, request.task.base_version,
                            shapes)
            except codec.PayloadError as err:
                failures[server_round].append(node)
                replies.append(Message(Error(code=1, reason=f"PayloadError: {err}"),
                                       reply_to=message))
                continue
            upload = _state(rng, rank, big, big)
            replies.append(TrainReply(partition, EXAMPLES[partition], 0.5, 1, 0.0,
                                      codec.encode(upload), held.version).to_message(message))
        strategy.aggregate_train(server_round, replies)
    assert failures[3] == [NODES[0]]  # refused, as it should
    assert failures[4] == []  # and caught up the next time it was asked
    held = NodeBase(memories[NODES[0]])
    for module, change in strategy.base.cumulative.items():  # at the version it trained on
        assert held.version == strategy.base.version - 1
        assert _relative(held.delta[module].astype(np.float64),
                         change - strategy.base.log[-1][module][0].astype(np.float64)
                         @ strategy.base.log[-1][module][1]) < 1e-5


# -- registry and config ----------------------------------------------------------
NINE = {"fedavg", "ffa", "lora-fair", "cellm", "fedsa", "hetlora", "flexlora", "flora",
        "fedex"}


def test_registry_has_the_nine_strategies():
    found = strategies()
    assert NINE <= set(found)
    assert {n: found[n] for n in ("fedsa", "hetlora", "flexlora", "flora", "fedex")} == {
        "fedsa": FedSA, "hetlora": HetLoRA, "flexlora": FlexLoRA, "flora": FLoRA,
        "fedex": FedExLoRA}
    assert all(cls.name == name for name, cls in found.items())


def test_client_ranks_refused_for_fedavg():
    with pytest.raises(ConfigError) as err:
        _config("fedavg", **{"client-ranks": "2,4"})
    message = str(err.value)
    assert "\n" not in message and "client-ranks" in message and "fedavg" in message
    assert _config("fedavg")["client-ranks"] == ""


@pytest.mark.parametrize("name", ["hetlora", "flexlora", "flora"])
def test_client_rank_above_lora_rank_refused(name):
    assert _config(name, **{"client-ranks": "2,8"})["client-ranks"] == "2,8"
    with pytest.raises(ConfigError) as err:
        _config(name, **{"client-ranks": "2,16"})
    message = str(err.value)
    assert "\n" not in message and "client-ranks" in message and "16" in message
    assert "lora-rank" in message
    with pytest.raises(ConfigError, match="client-ranks"):
        _config(name, **{"client-ranks": "2,x"})


@pytest.mark.parametrize("name", ["hetlora", "flexlora", "flora", "fedex", "lora-fair"])
def test_central_dp_refused(name):
    with pytest.raises(ConfigError) as err:
        _config(name, dp="central", **{"dp-noise-multiplier": 1.0})
    message = str(err.value)
    assert "\n" not in message and "central" in message and name in message


@pytest.mark.parametrize("name", ["fedavg", "ffa", "fedsa"])
def test_central_dp_allowed(name):
    assert _config(name, dp="central", **{"dp-noise-multiplier": 1.0})["dp"] == "central"


def test_keys_lists_each_strategys_own_keys(capsys):
    assert main(["keys"]) == 0
    out = capsys.readouterr().out
    sections: dict[str, set[str]] = {}
    current = None
    for line in out.splitlines():
        if (header := re.match(r"strategy (\S+):", line)) is not None:
            current = header.group(1)
            sections[current] = set()
        elif current is not None and line.startswith("  ") and line.strip():
            sections[current].add(line.split()[0])
    assert set(sections) == set(strategies())
    for name, cls in strategies().items():
        assert sections[name] == set(cls.keys), name
    for name in ("hetlora", "flexlora", "flora"):
        assert "client-ranks" in sections[name]
    assert sections["fedsa"] == sections["fedex"] == set()
    assert "strategy fedex: (no keys of its own)" in out


# -- federated evaluation -----------------------------------------------------------
def test_aggregate_evaluation_weighted_mean_sd_and_loss(caplog):
    strategy = FedAvgLoRA(_config("fedavg"), _state(np.random.default_rng(0)))
    asked = [Message(RecordDict(), message_type="evaluate",
                     dst_node_id=n) for n in (1, 2, 3, 4, 5, 6)]
    replies = [EvaluateReply(0, 10, 0.5, 1.0).to_message(asked[0]),
               EvaluateReply(1, 30, 0.9, 0.2).to_message(asked[1]),
               EvaluateReply(2, 60, 0.7, 0.4).to_message(asked[2]),
               EvaluateReply(3, 50, 1.5, 0.1).to_message(asked[3]),  # accuracy > 1
               EvaluateReply(4, 50, 0.5, math.nan).to_message(asked[4]),  # NaN loss
               Message(Error(code=1, reason="boom"), reply_to=asked[5])]
    with caplog.at_level("WARNING"):
        metrics = strategy.aggregate_evaluation(3, replies, "personal")
    # mean 0.74; SD² = (10·0.24² + 30·0.16² + 60·0.04²)/100 = 0.0144; loss 0.4
    assert metrics["personal_clients"] == 3
    assert metrics["personal_accuracy"] == pytest.approx(0.74, abs=1e-12)
    assert metrics["personal_accuracy_sd"] == pytest.approx(0.12, abs=1e-12)
    assert metrics["personal_loss"] == pytest.approx(0.4, abs=1e-12)
    for node in (4, 5, 6):
        assert f"evaluation reply from node {node} rejected" in caplog.text
    assert "accuracy" in caplog.text and "loss" in caplog.text


def test_aggregate_evaluation_of_a_primary_metric_other_than_accuracy(caplog):
    """An instruction-tuning run's replies carry exact match as ``primary``;
    one without it (an older node) is rejected, not read as accuracy."""
    strategy = FedAvgLoRA(_config("fedavg"), _state(np.random.default_rng(0)))
    asked = [Message(RecordDict(), message_type="evaluate", dst_node_id=n) for n in (1, 2, 3)]
    replies = [EvaluateReply(0, 10, 0.9, 1.0, primary=0.2).to_message(asked[0]),
               EvaluateReply(1, 30, 0.9, 2.0, primary=0.6).to_message(asked[1]),
               EvaluateReply(2, 30, 0.9, 2.0).to_message(asked[2])]
    with caplog.at_level("WARNING"):
        metrics = strategy.aggregate_evaluation(1, replies, "fed", "exact_match")
    assert dict(metrics) == pytest.approx({
        "fed_clients": 2, "fed_exact_match": 0.5, "fed_exact_match_sd": math.sqrt(0.03),
        "fed_loss": 1.75})
    assert "node 3 rejected: no exact_match" in caplog.text


def test_aggregate_evaluation_without_valid_replies():
    strategy = FedAvgLoRA(_config("fedavg"), _state(np.random.default_rng(0)))
    asked = Message(RecordDict(), message_type="evaluate",
                    dst_node_id=9)
    metrics = strategy.aggregate_evaluation(
        1, [EvaluateReply(0, 10, 2.0, 0.1).to_message(asked)], "fed")
    assert dict(metrics) == {"fed_clients": 0}


def test_a_strategy_can_send_each_node_its_own_download():
    """``download_for(plan)`` is per node: each node gets (and is judged
    against) its own start, here the global scaled by its partition."""
    class PerNode(FedAvgLoRA):
        def download_for(self, plan):
            start = {n: v * np.float32(plan.partition_id + 1) for n, v in self.sent.items()}
            return start, codec.encode(start)

    rng = np.random.default_rng(11)
    state = _state(rng)
    strategy = PerNode(_config("fedavg"), state)
    messages = strategy.configure_train(1, to_arrayrecord(state), ConfigRecord({}),
                                        FakeGrid())
    sent = {m.metadata.dst_node_id: codec.decode(Request.from_message(m).payload,
                                                 strategy.shapes) for m in messages}
    for node, plan in strategy.plans.items():
        name = A_NAMES[0]
        np.testing.assert_array_equal(sent[node][name], state[name] * (plan.partition_id + 1))
        # a reply that sends only part back is completed from that node's own start
        update = ClientUpdate(node, plan.partition_id, plan.rank, 1.0, {})
        factors = strategy.client_factors(update)
        np.testing.assert_array_equal(factors[name], sent[node][name])
