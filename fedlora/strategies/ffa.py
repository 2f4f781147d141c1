"""FFA-LoRA (ICLR 2024): A frozen at its seeded init, only B trained and sent.

A is drawn once from the run seed (``ffa-a-init``: PEFT's kaiming-uniform or
gaussian), identically in every process because the adapter is built under
that seed (``fedlora.learning.models``), so it never travels. B (from 0) and the head
are trained, sent and averaged. Aggregation is exact: Σ p_k B_k A = B̄ A, and
the LoRA bytes are half of FedAvg's.
"""

from __future__ import annotations

from collections.abc import Iterable

from fedlora.core.adapters import State, tensor_kind
from fedlora.core.config import Key, one_of
from fedlora.strategies.base import ClientHalf, LoraStrategy, RoundSums


class FfaClient(ClientHalf):
    """Train and exchange everything but the frozen A."""

    def download_names(self, names: Iterable[str]) -> list[str]:
        return [n for n in names if tensor_kind(n) != "lora_A"]

    def upload_names(self, names: Iterable[str]) -> list[str]:
        return self.download_names(names)

    def trains(self, kind: str) -> bool:
        return kind != "lora_A"


class FfaLoRA(LoraStrategy):
    """Example-weighted average of B and the head; A stays the seeded one."""

    name = "ffa"
    client_half = FfaClient
    keys = {
        "ffa-a-init": Key(str, "kaiming", "FFA-LoRA's frozen A: kaiming (PEFT default) or "
                          "gaussian, drawn from the run seed", one_of("kaiming", "gaussian")),
    }

    def merge(self, sums: RoundSums) -> State:
        return {**self.state, **sums.mean()}
