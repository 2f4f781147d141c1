"""``lr-schedule``: the client learning rate of a round, from (round, rounds) alone."""

from __future__ import annotations

import math

import pytest

from fedlora.core.config import ConfigError
from fedlora.learning.schedule import round_lr
from fedlora.strategies import resolve


def test_constant_is_lr_itself_in_every_round():
    config = resolve({"lr": 0.00123, "rounds": 7})
    assert all(round_lr(config, t) is config["lr"] for t in range(1, 8))


def test_cosine_runs_from_lr_in_the_first_round_to_lr_min_in_the_last():
    config = resolve({"lr": 0.01, "lr-min": 0.001, "rounds": 5, "lr-schedule": "cosine"})
    rates = [round_lr(config, t) for t in range(1, 6)]
    assert rates[0] == 0.01 and math.isclose(rates[-1], 0.001, rel_tol=1e-12)
    assert math.isclose(rates[2], (0.01 + 0.001) / 2, rel_tol=1e-12)  # the half-way round
    assert all(a > b for a, b in zip(rates, rates[1:]))
    expected = [0.001 + 0.009 * (1 + math.cos(math.pi * (t - 1) / 4)) / 2 for t in range(1, 6)]
    assert rates == pytest.approx(expected, rel=1e-14)


def test_a_resumed_run_gets_the_same_rate_and_one_round_gets_lr():
    config = resolve({"lr": 0.02, "rounds": 10, "lr-schedule": "cosine"})
    again = resolve(config.to_dict(), check_scope=False)  # as a client or a resume reads it
    assert [round_lr(again, t) for t in range(1, 11)] == [round_lr(config, t)
                                                          for t in range(1, 11)]
    assert round_lr(resolve({"rounds": 1, "lr-schedule": "cosine"}), 1) == 2e-3


@pytest.mark.parametrize("keys, words", [
    ({"lr-schedule": "cosine", "lr": 0.001, "lr-min": 0.01},
     "config key 'lr-min': 0.01 is more than lr (0.001)"),
    ({"lr-min": 0.001}, "config key 'lr-min' applies to lr-schedule cosine, not constant"),
    ({"lr-schedule": "linear"}, "config key 'lr-schedule': must be one of constant, cosine"),
    ({"lr-schedule": "cosine", "lr-min": -1}, "config key 'lr-min': must be >= 0"),
])
def test_bad_schedules_are_one_line_naming_the_key(keys, words):
    with pytest.raises(ConfigError) as err:
        resolve(keys)
    assert str(err.value).startswith(words) and "\n" not in str(err.value)
