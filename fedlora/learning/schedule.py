"""The client learning rate of a round (``lr-schedule``).

A schedule across rounds, not steps: clients train a few local steps each
round with a fresh optimiser, so what decays over a run is the rate each
round gives its clients (FlowerTune's LLM template anneals its clients' rate
over rounds with a cosine too). The rate is a function of (round, rounds)
alone, so a resumed run, a re-sent message and every client of a round get
the same value, and the server never sends it.

``constant``: ``lr`` itself, the very same float, in every round.
``cosine``: lr in round 1, lr-min in round ``rounds``, half a cosine between:
lr − (lr − lr-min) · (1 − cos(π (t − 1) / (rounds − 1))) / 2.
"""

from __future__ import annotations

import math

from fedlora.core.config import RunConfig


def round_lr(config: RunConfig, server_round: int) -> float:
    """The learning rate of the clients in round ``server_round`` (1-based)."""
    lr = config.lr
    if config.lr_schedule == "constant":
        return lr
    rounds, low = config.rounds, config.lr_min
    progress = (server_round - 1) / (rounds - 1) if rounds > 1 else 0.0
    progress = min(max(progress, 0.0), 1.0)
    return lr - (lr - low) * (1 - math.cos(math.pi * progress)) / 2  # exactly lr in round 1
