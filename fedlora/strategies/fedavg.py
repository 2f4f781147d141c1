"""FedAvg over LoRA factors (FedIT): both factors trained, sent and averaged.

Server: Ā = Σ p_k A_k and B̄ = Σ p_k B_k separately (p_k ∝ examples), the head
likewise. This is inexact for the product — ΔW* − s·B̄Ā is the weighted
cross-covariance of the factors (docs/algorithms.md §0) — which is what the
other strategies address.
"""

from __future__ import annotations

from collections.abc import Iterable

from fedlora.core.adapters import State
from fedlora.strategies.base import ClientHalf, LoraStrategy, RoundSums


class FedAvgClient(ClientHalf):
    """Train everything in the adapter; send everything both ways."""

    def download_names(self, names: Iterable[str]) -> list[str]:
        return list(names)

    def upload_names(self, names: Iterable[str]) -> list[str]:
        return list(names)

    def trains(self, kind: str) -> bool:
        return True


class FedAvgLoRA(LoraStrategy):
    """Separate example-weighted averages of A, B and the head."""

    name = "fedavg"
    client_half = FedAvgClient

    def merge(self, sums: RoundSums) -> State:
        return {**self.state, **sums.mean()}
