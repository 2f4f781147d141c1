"""FFA-LoRA: A frozen at its seeded init; B and the head trained, sent and
averaged; exact aggregation at half of FedAvg's LoRA bytes."""

from __future__ import annotations

import numpy as np
from by_hand import (
    SQUARE_LORA,
    download_shapes,
    merge_of,
    square_adapter,
    square_strategy,
    square_updates,
)

from fedlora.federation.fold import Fold
from fedlora.strategies.fedavg import FedAvgLoRA
from fedlora.strategies.ffa import FfaLoRA
from fedlora.wire import codec


def test_ffa_trains_and_sends_everything_but_a():
    rng = np.random.default_rng(0)
    strategy = square_strategy(FfaLoRA, rng)
    roles = strategy.roles
    assert not any(".lora_A." in n for n in strategy.upload_shapes)
    assert set(download_shapes(strategy)) == set(strategy.upload_shapes)
    assert not roles.trains("lora_A") and roles.trains("lora_B") and roles.trains("head")


def test_ffa_aggregation_is_exact():
    rng = np.random.default_rng(1)
    strategy = square_strategy(FfaLoRA, rng)
    updates = square_updates(rng, names=strategy.upload_shapes)
    merged = merge_of(strategy, updates)
    total = sum(u.weight for u in updates)
    for a_name in ("m.q.lora_A.weight", "m.v.lora_A.weight"):
        b_name = a_name.replace("lora_A", "lora_B")
        np.testing.assert_array_equal(merged[a_name], strategy.state[a_name])
        ideal = sum(u.weight / total * u.tensors[b_name] @ merged[a_name] for u in updates)
        np.testing.assert_allclose(merged[b_name] @ merged[a_name], ideal, rtol=1e-5,
                                   atol=1e-5)
    assert Fold(strategy).sums(updates).residual(merged) < 1e-6


def test_ffa_sends_exactly_half_of_fedavg_lora_bytes():
    rng = np.random.default_rng(2)
    state = square_adapter(rng)
    ffa = square_strategy(FfaLoRA, rng)
    fedavg = square_strategy(FedAvgLoRA, rng)
    lora_ffa = [n for n in ffa.upload_shapes if n in SQUARE_LORA]
    lora_fedavg = [n for n in fedavg.upload_shapes if n in SQUARE_LORA]
    header = len(codec.encode({}))  # the payload's own version field, sent once
    ffa_bytes = len(codec.encode({n: state[n] for n in lora_ffa})) - header
    fedavg_bytes = len(codec.encode({n: state[n] for n in lora_fedavg})) - header
    assert 2 * ffa_bytes == fedavg_bytes
