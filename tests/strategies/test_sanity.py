"""Sanity by default: an update too large to add exactly is rejected, and a
merge that fails or is not finite leaves the global adapter as it was."""

from __future__ import annotations

import numpy as np
import pytest
from fakes import WIDE_RANK as RANK
from fakes import aggregate, start_round, train_reply
from fakes import round_replies as _round_replies
from fakes import wide_state as _wide_state

from fedlora.federation.round import ServerRound
from fedlora.strategies import resolve, strategies

pytestmark = pytest.mark.usefixtures("run_identity")


def test_a_reply_too_large_to_add_is_rejected_not_averaged(caplog):
    config = resolve({"num-clients": 10, "clients-per-round": 2, "lora-rank": RANK})
    server = ServerRound(strategies()["fedavg"](config, _wide_state(np.random.default_rng(1))))
    start_round(server, [101, 102])
    shapes = server.strategy.upload_shapes
    good = {n: np.ones(s, np.float32) for n, s in shapes.items()}
    huge = {n: np.full(s, 1e30, np.float32) for n, s in shapes.items()}
    with caplog.at_level("WARNING"):
        arrays, metrics = aggregate(
            server, [train_reply(101, good, 10, 1.0), train_reply(102, huge, 10, 1.0)])
    assert metrics["clients"] == 1 and metrics["rejected"] == 1
    assert all(np.array_equal(a, np.ones_like(a)) for a in arrays.values())
    assert "reply from node 102 rejected" in caplog.text


def test_a_merge_that_is_not_finite_leaves_the_global_unchanged(monkeypatch, caplog):
    config = resolve({"num-clients": 10, "clients-per-round": 3, "strategy": "cellm",
                      "cellm-server-optimizer": "adam", "lora-rank": RANK})
    strategy = strategies()["cellm"](config, _wide_state(np.random.default_rng(1)))
    server = ServerRound(strategy)
    before = {n: v.copy() for n, v in server.adapter.items()}
    start_round(server, [100, 101, 102])
    replies = _round_replies(server, np.random.default_rng(2))
    monkeypatch.setattr(np, "sqrt", lambda x: x * np.nan)  # Adam's step turns NaN
    with caplog.at_level("WARNING"):
        arrays, metrics = aggregate(server, replies)
    assert arrays is None and metrics["clients"] == 3 and not metrics["updated"]
    assert "is not finite: global adapter unchanged" in caplog.text
    assert all(np.array_equal(server.adapter[n], before[n]) for n in before)
    assert strategy.step == 0 and not strategy.moments  # the Adam state did not move
