"""FedAvg with server momentum (FedAvgM; Hsu, Qi, Brown, "Measuring the Effects
of Non-Identical Data Distribution for Federated Visual Classification",
arXiv:1909.06335, 2019), on LoRA factors.

Clients do what they do under ``fedavg``: train A, B and the head and send all
of it (``FedAvgClient``). The server takes the round's example-weighted average
θ̄ (what ``FedAvgLoRA.merge`` would make the next global adapter) and, instead
of jumping to it, treats θ̄ − θ as a step and accumulates it in a velocity:

    v ← β·v + (θ̄ − θ),   θ ← θ + v

with θ the current global adapter, v = 0 before the first round and β the key
``momentum-beta``. β = 0 is fedavg. v is strategy state (``state_dict``), so a
checkpoint, or the server rolling back a merge that went non-finite, keeps it.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fedlora.core.adapters import State
from fedlora.core.config import Key, RunConfig, probability
from fedlora.strategies.base import LoraStrategy
from fedlora.strategies.fedavg import FedAvgClient
from fedlora.strategies.sums import RoundSums

VELOCITY = "velocity/"  # prefix of the buffer's entries in state_dict


class FedAvgMomentum(LoraStrategy):
    """The fedavg average applied through a server momentum buffer."""

    name = "fedavg-momentum"
    client_half = FedAvgClient
    keys = {
        "momentum-beta": Key(float, 0.9, "FedAvgM server momentum β: v ← β·v + (θ̄ − θ), "
                             "θ ← θ + v with θ̄ the fedavg average; 0 = fedavg", probability),
    }

    def __init__(self, config: RunConfig, initial_state: State) -> None:
        super().__init__(config, initial_state)
        self.beta = config.momentum_beta
        self.velocity: State = {}  # v by tensor name; empty = zero (before round 1)

    def merge(self, sums: RoundSums) -> State:
        average = {**self.state, **sums.mean()}  # θ̄: what FedAvgLoRA.merge returns
        velocity, merged = {}, {}
        for name, theta in self.state.items():
            step = average[name].astype(np.float64) - theta
            v = self.beta * self.velocity.get(name, 0.0) + step
            velocity[name] = v.astype(np.float32)
            merged[name] = (theta + v).astype(np.float32)
        # new arrays, never updated in place: a state_dict taken before this
        # merge still holds the old buffer (the server restores it on failure)
        self.velocity = velocity
        return merged

    def state_dict(self) -> dict[str, np.ndarray]:
        return {VELOCITY + name: v.copy() for name, v in self.velocity.items()}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        self.velocity = {key.removeprefix(VELOCITY): np.array(value, dtype=np.float32)
                         for key, value in state.items() if key.startswith(VELOCITY)}
