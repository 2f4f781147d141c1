"""FedSA-LoRA (Guo et al., ICLR 2025): A is shared, B and the head are personal
(docs/algorithms.md §5).

Clients train A, B and the head. Only A travels, both ways, and the server
averages it by examples. Each client keeps its B and head in its persistent
state and starts every round from (global A, its own B and head), the run's
initial ones the first time. The model is therefore personal: every
evaluated round ends with federated evaluation, each client scoring its own
model on its held-out slice (``personal_accuracy``). The server's central
accuracy is of global A with the initial B (0) and head: near chance, and
reported as such.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict

from fedlora.core.adapters import State, tensor_kind
from fedlora.strategies.base import ClientHalf, LoraStrategy, RoundSums

PERSONAL_KEY = "fedsa-personal"  # the client's own B and head in context.state


class FedSAClient(ClientHalf):
    """Train everything; exchange A; keep B and the head."""

    def download_names(self, names: Iterable[str]) -> list[str]:
        return [n for n in names if tensor_kind(n) == "lora_A"]

    def upload_names(self, names: Iterable[str]) -> list[str]:
        return self.download_names(names)

    def trains(self, kind: str) -> bool:
        return True

    def start_state(self, received: State, template: State, memory: RecordDict) -> State:
        own = memory.array_records.get(PERSONAL_KEY)
        personal = {n: a.numpy() for n, a in own.items()} if own is not None else {}
        if any(personal[n].shape != template[n].shape for n in personal if n in template):
            personal = {}  # kept at another rank: start afresh rather than fail
        return {**template, **{n: v for n, v in personal.items() if n in template}, **received}

    def upload(self, start: State, trained: State,
               memory: RecordDict) -> Mapping[str, np.ndarray]:
        shared = self.upload_names(trained)
        memory.array_records[PERSONAL_KEY] = ArrayRecord(
            {n: Array(np.ascontiguousarray(v)) for n, v in trained.items() if n not in shared})
        return {n: trained[n] for n in shared}


class FedSA(LoraStrategy):
    """Example-weighted average of A; B and head stay with the clients."""

    name = "fedsa"
    client_half = FedSAClient
    personal = True

    def merge(self, sums: RoundSums) -> State:
        return {**self.state, **sums.mean()}
