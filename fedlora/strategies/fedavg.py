"""FedAvg over LoRA factors (FedIT): both factors trained, sent and averaged.

Server: Ā = Σ p_k A_k and B̄ = Σ p_k B_k separately (p_k ∝ examples), the head
likewise. This is inexact for the product — ΔW* − s·B̄Ā is the weighted
cross-covariance of the factors (docs/algorithms.md §0) — which is what the
other strategies address.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from fedlora.adapters import State
from fedlora.strategies.base import ClientHalf, ClientUpdate, LoraStrategy


class FedAvgClient(ClientHalf):
    """Train everything in the adapter; send everything both ways."""

    def download_names(self, names: Iterable[str]) -> list[str]:
        return list(names)

    def upload_names(self, names: Iterable[str]) -> list[str]:
        return list(names)

    def trains(self, kind: str) -> bool:
        return True


def weighted_mean(updates: list[ClientUpdate], names: Iterable[str]) -> State:
    """Σ p_k x_k for each tensor name, accumulated one update at a time."""
    total = sum(u.weight for u in updates)
    mean: State = {}
    for name in names:
        acc = np.zeros_like(updates[0].tensors[name], dtype=np.float64)
        for update in updates:
            acc += (update.weight / total) * update.tensors[name]
        mean[name] = acc.astype(np.float32)
    return mean


class FedAvgLoRA(LoraStrategy):
    """Separate example-weighted averages of A, B and the head."""

    name = "fedavg"
    client_half = FedAvgClient

    def merge(self, updates: list[ClientUpdate]) -> State:
        return {**self.state, **weighted_mean(updates, self.upload_shapes)}
