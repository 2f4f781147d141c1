"""Per-client ranks (docs/algorithms.md §6, "global units"): the
``client-ranks`` key, which rank a partition trains at, and moving factors
between a client's rank and the global one (``ranks.truncate``/``pad``),
against the algebra redone by hand in float64."""

from __future__ import annotations

import numpy as np
import pytest
from by_hand import (
    A_NAMES,
    ALPHA,
    B_NAMES,
    HEAD,
    RANKS,
    D,
    K,
    R,
    S,
    adapter_shapes,
    global_units,
    random_adapter,
    strategy_config,
)

from fedlora.core.config import ConfigError
from fedlora.strategies.fedex import FedExLoRA
from fedlora.strategies.hetlora import HetLoRA
from fedlora.strategies.ranks import pad, parse_ranks, rank_of, shapes_at, truncate


@pytest.mark.parametrize("text, ranks", [("2,4,8", (2, 4, 8)), ("", ()), (" 2 , 4 ", (2, 4)),
                                         ("8", (8,))])
def test_parse_ranks(text, ranks):
    assert parse_ranks(text) == ranks


@pytest.mark.parametrize("text", ["a", "2,x", "2,0", "-1", "2.5", "4,-4"])
def test_parse_ranks_refuses_non_positive_integers(text):
    with pytest.raises(ValueError, match="comma-separated positive integers"):
        parse_ranks(text)


def test_rank_of_cycles_by_partition_id():
    config = strategy_config("hetlora", **{"client-ranks": RANKS})
    assert [rank_of(config, p) for p in range(7)] == [2, 4, 8, 2, 4, 8, 2]
    assert [rank_of(strategy_config("hetlora"), p) for p in range(3)] == [R, R, R]
    strategy = HetLoRA(config, random_adapter(np.random.default_rng(0)))
    assert [strategy.rank_for(p) for p in range(4)] == [2, 4, 8, 2]
    # a strategy without heterogeneous ranks trains everyone at lora-rank
    fedex = FedExLoRA(strategy_config("fedex"), random_adapter(np.random.default_rng(0)))
    assert fedex.rank_for(0) == R


def test_shapes_at():
    assert shapes_at(adapter_shapes(), 2) == {
        "m.q.lora_A.weight": (2, K), "m.q.lora_B.weight": (D, 2),
        "m.v.lora_A.weight": (2, K), "m.v.lora_B.weight": (D, 2),
        "m.classifier.weight": (3, D), "m.classifier.bias": (3,)}
    assert shapes_at(adapter_shapes(), R) == adapter_shapes()


@pytest.mark.parametrize("rank", [1, 2, 3, 5])
def test_truncate_keeps_the_truncated_global_delta(rank):
    """s_k·B_k·A_k = s·B[:, :r_k]·A[:r_k] (docs §6 download), head untouched."""
    state = random_adapter(np.random.default_rng(rank))
    small = truncate(state, rank, R)
    assert {n: v.shape for n, v in small.items()} == shapes_at(adapter_shapes(), rank)
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
    client = random_adapter(np.random.default_rng(10 + rank), rank)
    padded = pad(client, rank, R)
    assert {n: v.shape for n, v in padded.items()} == adapter_shapes()
    for a, b in zip(A_NAMES, B_NAMES):
        assert not padded[a][rank:].any() and not padded[b][:, rank:].any()
        want = ALPHA / rank * client[b].astype(np.float64) @ client[a]
        np.testing.assert_allclose(S * padded[b].astype(np.float64) @ padded[a], want,
                                   rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(padded[b], global_units(client, rank)[b], rtol=1e-7)
    for h in HEAD:
        np.testing.assert_array_equal(padded[h], client[h])


@pytest.mark.parametrize("rank", [2, 3, 8])
def test_pad_and_truncate_are_inverse_on_the_first_ranks(rank):
    rng = np.random.default_rng(20 + rank)
    client = random_adapter(rng, rank)
    back = truncate(pad(client, rank, R), rank, R)  # a rank-r_k state survives the trip
    for name, value in client.items():
        np.testing.assert_allclose(back[name], value, rtol=1e-6, atol=0)
    glob = random_adapter(rng)
    again = pad(truncate(glob, rank, R), rank, R)  # a global one keeps its first r_k ranks
    for a, b in zip(A_NAMES, B_NAMES):
        np.testing.assert_array_equal(again[a][:rank], glob[a][:rank])
        np.testing.assert_allclose(again[b][:, :rank], glob[b][:, :rank], rtol=1e-6)
        assert not again[a][rank:].any() and not again[b][:, rank:].any()


# -- the key ------------------------------------------------------------------------


def test_client_ranks_refused_for_fedavg():
    with pytest.raises(ConfigError) as err:
        strategy_config("fedavg", **{"client-ranks": "2,4"})
    message = str(err.value)
    assert "\n" not in message and "client-ranks" in message and "fedavg" in message
    assert strategy_config("fedavg")["client-ranks"] == ""


@pytest.mark.parametrize("name", ["hetlora", "flexlora", "flora"])
def test_client_rank_above_lora_rank_refused(name):
    assert strategy_config(name, **{"client-ranks": "2,8"})["client-ranks"] == "2,8"
    with pytest.raises(ConfigError) as err:
        strategy_config(name, **{"client-ranks": "2,16"})
    message = str(err.value)
    assert "\n" not in message and "client-ranks" in message and "16" in message
    assert "lora-rank" in message
    with pytest.raises(ConfigError, match="client-ranks"):
        strategy_config(name, **{"client-ranks": "2,x"})
