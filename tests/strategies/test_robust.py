"""Robust aggregation (``robust`` key): the hostile replies of the robustness
issue, sent through each strategy's own client half, never leak into the
global adapter under any robust mode, and never move it further than the
mode's bound on honest clients."""

from __future__ import annotations

import math

import numpy as np
import pytest
from fakes import WIDE_SHAPES as SHAPES
from fakes import start_round, train_reply
from flwr.app import RecordDict

from fedlora.core.adapters import lora_pairs
from fedlora.core.config import ConfigError
from fedlora.strategies import resolve, strategies
from fedlora.strategies.ranks import pad
from fedlora.wire.basedelta import base_weight_name

pytestmark = pytest.mark.usefixtures("run_identity")

MODES = ("norm-bound", "trimmed-mean", "median", "krum")
HONEST = (101, 102, 103, 104, 105)
HOSTILE = 106
# strategies whose next global is a convex combination of what clients sent
AVERAGING = ("fedavg", "ffa", "fedsa", "hetlora", "cellm")
BUILT_IN = ("fedavg", "ffa", "lora-fair", "cellm", "fedsa", "hetlora", "flexlora", "flora",
            "fedex")


def _strategy(name: str, mode: str, per_round: int = len(HONEST) + 1, **extra):
    overrides = {"num-clients": 10, "clients-per-round": per_round, "lora-rank": 3,
                 "strategy": name, "robust": mode, **extra}
    if name == "cellm":
        overrides["cellm-up-density"] = 1.0  # every entry sent: the bound is exact
    config = resolve(overrides)
    rng = np.random.default_rng(7)
    state = {n: (0.1 * rng.standard_normal(s)).astype(np.float32) for n, s in SHAPES.items()}
    return strategies()[name](config, state)


def _reply(strategy, node: int, trained_from, examples: float, rng):
    """``node``'s reply, made by the strategy's client half from the adapter
    ``trained_from(start)`` returns (a hostile client does exactly this)."""
    plan = strategy.plans[node]
    start = strategy.download_for(plan)[0]
    trained = {n: np.asarray(v, np.float32) for n, v in trained_from(start, rng).items()}
    upload = strategy.roles.upload(start, trained, RecordDict())
    return train_reply(node, upload, examples, 1.0, plan.partition_id)


def _honest(start, rng):
    return {n: v + 0.01 * rng.standard_normal(v.shape) for n, v in start.items()}


def _filled(value):
    return lambda start, rng: {n: np.full_like(v, value) for n, v in start.items()}


HOSTILE_REPLIES = {  # (trained adapter, claimed examples): the list
    "values 1e30": (_filled(1e30), 100),
    "values 3e38": (_filled(3e38), 100),
    # 1e12 is refused by the message schema (> 2^31 - 1); 2e9 is a valid claim
    "2e9 examples": (lambda start, rng: {n: v + 5.0 for n, v in start.items()}, 2e9),
}


def _round(strategy, hostile=None, order=None, seed=3):
    rng = np.random.default_rng(seed)
    nodes = HONEST + ((HOSTILE,) if hostile else ())
    start_round(strategy, nodes)
    replies = [_reply(strategy, node, _honest, 100 + 10 * i, rng)
               for i, node in enumerate(HONEST)]
    if hostile:
        replies.append(_reply(strategy, HOSTILE, *hostile, rng))
    if order is not None:
        replies = [replies[i] for i in order]
    return strategy.aggregate_train(1, replies)


def _changes(strategy, arrays) -> dict[str, np.ndarray]:
    return {n: arrays[n].numpy().astype(np.float64) - strategy.sent[n]
            for n in strategy.upload_shapes}


@pytest.mark.parametrize("attack", HOSTILE_REPLIES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", BUILT_IN)
def test_hostile_replies_never_reach_the_global(name, mode, attack):
    strategy = _strategy(name, mode)
    arrays, metrics = _round(strategy, HOSTILE_REPLIES[attack])
    assert arrays is not None, "the honest clients' round must still change the global"
    values = np.concatenate([a.numpy().ravel() for a in arrays.values()])
    assert np.all(np.isfinite(values)) and np.max(np.abs(values)) < 10.0
    if strategy.base is not None:
        assert all(np.all(np.isfinite(w)) and np.max(np.abs(w)) < 10.0
                   for w in strategy.base.cumulative.values())
    assert metrics["clients"] + metrics["rejected"] == len(HONEST) + 1


@pytest.mark.parametrize("attack", HOSTILE_REPLIES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", AVERAGING)
def test_the_global_moves_no_further_than_the_modes_bound_on_honest_steps(name, mode,
                                                                          attack):
    """Median and trimmed mean: every coordinate of the move within the honest
    clients' range of it; Krum: within their convex hull (so no longer than the
    longest honest step); norm-bound: no longer than robust-norm-factor × the
    median step."""
    strategy = _strategy(name, mode)
    arrays, _ = _round(strategy, HOSTILE_REPLIES[attack])
    steps = _honest_steps(name)
    move = _changes(strategy, arrays)
    norm = math.sqrt(sum(float(np.sum(v ** 2)) for v in move.values()))
    step_norms = [math.sqrt(sum(float(np.sum(v ** 2)) for v in s.values())) for s in steps]
    if mode in ("median", "trimmed-mean"):
        for n, value in move.items():
            low = np.min([s[n] for s in steps], axis=0)
            high = np.max([s[n] for s in steps], axis=0)
            assert np.all(value >= low - 1e-6) and np.all(value <= high + 1e-6), n
    elif mode == "krum":
        assert norm <= max(step_norms) + 1e-6
    else:
        assert norm <= 3.0 * float(np.median(step_norms)) + 1e-6


def _honest_steps(name: str) -> list[dict[str, np.ndarray]]:
    """The honest clients' changes in a round like ``_round``'s (same draws)."""
    strategy = _strategy(name, "none", per_round=len(HONEST))
    rng = np.random.default_rng(3)
    start_round(strategy, HONEST)
    steps = []
    for node in HONEST:
        start = strategy.download_for(strategy.plans[node])[0]
        trained = {n: np.asarray(v, np.float32) for n, v in _honest(start, rng).items()}
        steps.append({n: trained[n].astype(np.float64) - start[n]
                      for n in strategy.upload_shapes})
    return steps


def test_an_inflated_weight_buys_no_more_than_the_cap():
    """norm-bound: 2e9 claimed examples weigh as robust-weight-factor × the
    median claim, and the round reports the client as clipped."""
    strategy = _strategy("fedavg", "norm-bound", per_round=3)
    start_round(strategy, (101, 102, 103))
    rng = np.random.default_rng(0)
    same = {n: strategy.sent[n] + 0.01 for n in strategy.upload_shapes}
    other = {n: strategy.sent[n] - 0.01 for n in strategy.upload_shapes}
    replies = [_reply(strategy, 101, lambda s, r: {**s, **same}, 100, rng),
               _reply(strategy, 102, lambda s, r: {**s, **same}, 100, rng),
               _reply(strategy, 103, lambda s, r: {**s, **other}, 2e9, rng)]
    arrays, metrics = strategy.aggregate_train(1, replies)
    share = 300 / (100 + 100 + 300)  # the claim cut to 3 × the median (100)
    expected = 0.01 * (1 - share) - 0.01 * share
    got = _changes(strategy, arrays)
    assert all(np.allclose(v, expected, atol=1e-6) for v in got.values())
    assert metrics["clipped"] == 1


def test_krum_rejects_the_outlier_and_says_so(caplog):
    strategy = _strategy("fedavg", "krum")
    with caplog.at_level("WARNING"):
        arrays, metrics = _round(strategy, (lambda s, r: {n: v + 5.0 for n, v in s.items()},
                                            100))
    assert metrics["rejected"] == 2  # f = ceil(0.2 × 6) = 2 excluded: the outlier and one
    assert f"reply from node {HOSTILE} rejected: excluded by krum" in caplog.text
    assert metrics["clients"] == len(HONEST) - 1


@pytest.mark.parametrize("mode", MODES)
def test_screening_does_not_depend_on_arrival_order(mode):
    first, _ = _round(_strategy("fedavg", mode), HOSTILE_REPLIES["values 1e30"])
    second, _ = _round(_strategy("fedavg", mode), HOSTILE_REPLIES["values 1e30"],
                       order=[5, 3, 0, 4, 1, 2])
    assert all(first[n].numpy().tobytes() == second[n].numpy().tobytes() for n in first)


def test_without_a_robust_mode_the_hostile_weight_wins():
    """The harness bites: with robust=none the 2e9 claim makes the global the
    attacker's adapter (what the robust modes are for)."""
    strategy = _strategy("fedavg", "none")
    arrays, _ = _round(strategy, HOSTILE_REPLIES["2e9 examples"])
    assert all(np.allclose(v, 5.0, atol=1e-3) for v in _changes(strategy, arrays).values())


@pytest.mark.parametrize("overrides, key", [
    ({"robust": "median", "dp": "central", "dp-noise-multiplier": 1.0}, "'robust'"),
    ({"robust": "krum", "robust-fraction": 0.5}, "'robust-fraction'"),
    ({"robust": "krum", "clients-per-round": 2}, "krum with 2 clients per round"),
    ({"robust": "krum", "robust-fraction": 0.0}, "would screen nobody"),
    ({"robust-norm-factor": 2.0}, "'robust-norm-factor' applies to robust norm-bound"),
    ({"robust": "median", "robust-norm-factor": 2.0}, "'robust-norm-factor'"),
    ({"robust": "mean"}, "'robust'"),
])
def test_a_robust_config_that_makes_no_sense_is_refused_in_one_line(overrides, key):
    with pytest.raises(ConfigError) as err:
        resolve(overrides)
    assert key in str(err.value) and "\n" not in str(err.value)


# -- heterogeneous ranks (HetLoRA, FlexLoRA, FLoRA with client-ranks) ---------------
HETERO = ("hetlora", "flexlora", "flora")
RANK_SHAPES = {  # global rank 8: clients at ranks 2, 4 and 8 (partition i at (2,4,8)[i % 3])
    "m.q.lora_A.weight": (8, 12), "m.q.lora_B.weight": (10, 8),
    "m.v.lora_A.weight": (8, 12), "m.v.lora_B.weight": (10, 8),
    "m.classifier.weight": (4, 6),
}
SCALE_ATTACK = (lambda start, rng: {n: v + 10.0 * (_honest(start, rng)[n] - v)
                                    for n, v in start.items()}, 100)


def _ranked(name: str, mode: str, per_round: int, ranks: str = "2,4,8"):
    config = resolve({"num-clients": 10, "clients-per-round": per_round, "lora-rank": 8,
                      "strategy": name, "robust": mode, "client-ranks": ranks})
    rng = np.random.default_rng(7)
    state = {n: (0.1 * rng.standard_normal(s)).astype(np.float32)
             for n, s in RANK_SHAPES.items()}
    return strategies()[name](config, state)


def _products(strategy, state) -> dict[str, np.ndarray]:
    """s·B·A of each LoRA module (global units), by lora_A name, and the head."""
    out = {a: strategy.scale * state[b].astype(np.float64) @ state[a]
           for a, b in lora_pairs(sorted(state))}
    return {**out, "head": state["m.classifier.weight"].astype(np.float64)}


def _ranked_round(strategy, nodes, hostile=None, hostile_node=None):
    """One round of ``nodes`` (``hostile_node`` answering with ``hostile``);
    returns (the global sent, the new global, the merged round's factor mean,
    honest steps in factor space on each client's own ranks, honest steps of
    s·B·A and head)."""
    rng = np.random.default_rng(3)
    start_round(strategy, nodes)
    sent = dict(strategy.sent)
    replies, factor_steps, product_steps = [], [], []
    for i, node in enumerate(nodes):
        plan = strategy.plans[node]
        start = strategy.download_for(plan)[0]
        if node == hostile_node:
            replies.append(_reply(strategy, node, *hostile, rng))
            continue
        trained = {n: np.asarray(v, np.float32) for n, v in _honest(start, rng).items()}
        upload = strategy.roles.upload(start, trained, RecordDict())
        replies.append(train_reply(node, upload, 100 + 10 * i, 1.0, plan.partition_id))
        before, after = (pad(x, plan.rank, 8) for x in (start, trained))
        factor_steps.append({n: after[n].astype(np.float64) - before[n]
                             for n in strategy.upload_shapes})
        product_steps.append({n: v - _products(strategy, before)[n]
                              for n, v in _products(strategy, after).items()})
    merged = []
    merge = strategy.merge
    strategy.merge = lambda sums: merged.append(sums.factor_mean()) or merge(sums)
    arrays, _ = strategy.aggregate_train(1, replies)
    state = {n: arrays[n].numpy() for n in arrays}
    return sent, state, merged[0], factor_steps, product_steps


def _norm_of(parts: dict[str, np.ndarray]) -> float:
    return math.sqrt(sum(float(np.sum(np.square(v))) for v in parts.values()))


def _assert_within(mode: str, move: dict, steps: list[dict], box: bool = True) -> None:
    """The uniform-rank tests' bound: median and trimmed mean, each coordinate
    in the honest range (``box``) or no longer than the longest honest step;
    Krum no longer than the longest honest step; norm-bound no longer than
    robust-norm-factor (3) × the median honest step."""
    norms = [_norm_of(s) for s in steps]
    if mode in ("median", "trimmed-mean") and box:
        for n, value in move.items():
            low = np.min([s[n] for s in steps], axis=0)
            high = np.max([s[n] for s in steps], axis=0)
            assert np.all(value >= low - 1e-6) and np.all(value <= high + 1e-6), n
    elif mode == "norm-bound":
        assert _norm_of(move) <= 3.0 * float(np.median(norms)) + 1e-6
    else:
        assert _norm_of(move) <= max(norms) + 1e-6


@pytest.mark.parametrize("hostile_node", [100, 106])  # partition 0 (rank 2), 5 (rank 8)
@pytest.mark.parametrize("attack", [*HOSTILE_REPLIES, "scale ×10"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", HETERO)
def test_mixed_ranks_meet_the_modes_bound(name, mode, attack, hostile_node):
    """One attacker among six clients of ranks 2, 4, 8 moves the global no
    further than the mode's bound on the honest steps, each honest step taken
    on the ranks its client was sent: the round the strategy merges within
    the bound in factor space, and the global itself, for HetLoRA in factor
    space, for FlexLoRA and FLoRA (which merge products) in s·B·A."""
    nodes = sorted({*HONEST, HOSTILE, 100} - ({100, HOSTILE} - {hostile_node}))
    strategy = _ranked(name, mode, len(nodes))
    hostile = SCALE_ATTACK if attack == "scale ×10" else HOSTILE_REPLIES[attack]
    sent, state, merged, factor_steps, product_steps = _ranked_round(
        strategy, nodes, hostile, hostile_node)
    names = list(strategy.upload_shapes)
    _assert_within(mode, {n: merged[n].astype(np.float64) - sent[n] for n in names},
                   factor_steps)
    if name == "hetlora":
        _assert_within(mode, {n: state[n].astype(np.float64) - sent[n] for n in names},
                       factor_steps)
    else:
        after = _products(strategy, state)
        if strategy.base is not None:  # FLoRA: the round's product went into the base
            for a_name in list(after)[:-1]:
                after[a_name] = after[a_name] + strategy.base.cumulative[
                    base_weight_name(a_name)]
        before = _products(strategy, sent)
        _assert_within(mode, {n: after[n] - before[n] for n in after}, product_steps,
                       box=False)


@pytest.mark.parametrize("mode", ["median", "trimmed-mean"])
@pytest.mark.parametrize("name", HETERO)
def test_a_rank_2_majority_does_not_erase_the_upper_ranks(name, mode):
    """All honest, ranks 2, 2, 8, 2, 2: the upper ranks only one client was
    sent stay in the global (as sent, give or take the honest steps) instead
    of being voted to zero by the clients that never had them."""
    strategy = _ranked(name, mode, len(HONEST), ranks="2,2,8")
    sent, state, _, _, product_steps = _ranked_round(strategy, list(HONEST))
    after, before = _products(strategy, state), _products(strategy, sent)
    if strategy.base is not None:
        for a_name in list(after)[:-1]:
            after[a_name] = after[a_name] + strategy.base.cumulative[base_weight_name(a_name)]
    _assert_within(mode, {n: after[n] - before[n] for n in after}, product_steps, box=False)
    if name == "hetlora":
        for a_name in ("m.q.lora_A.weight", "m.v.lora_A.weight"):
            upper = state[a_name][2:]
            assert np.allclose(upper, sent[a_name][2:], atol=0.05)
            assert np.linalg.norm(upper) > 0.9 * np.linalg.norm(sent[a_name][2:])
