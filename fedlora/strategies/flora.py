"""FLoRA (Wang et al., NeurIPS 2024): stacked factors merged into the base,
a fresh LoRA every round (docs/algorithms.md §8).

Per LoRA module the server stacks the round's clients (global units, ordered
by partition id): B_stack = [B'_1 … B'_K], A_stack = [p_1 A'_1; …; p_K A'_K],
so B_stack·A_stack = Σ p_k B'_k A'_k exactly, whatever the ranks. It folds
s·B_stack·A_stack into the base weight and every client starts the next round
from a fresh LoRA: A drawn with PEFT's kaiming-uniform bound (1/√k) from
(seed, round), B = 0. The head is averaged by examples. The base change goes
to every node as those stacked factors (``fedlora.wire.basedelta``): K·r_k rows a
round, so the download grows with the clients per round.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fedlora.core.adapters import State, lora_pairs
from fedlora.core.seeding import fresh_adapter_rng
from fedlora.strategies.base import LoraStrategy, RoundSums
from fedlora.strategies.fedavg import FedAvgClient
from fedlora.strategies.ranks import CLIENT_RANKS
from fedlora.strategies.sums import StackedRoundSums
from fedlora.wire.basedelta import Increment, base_weight_name


class FLoRA(LoraStrategy):
    """Exact stacking into the base; the adapter restarts each round."""

    name = "flora"
    client_half = FedAvgClient
    keys = {"client-ranks": CLIENT_RANKS}
    heterogeneous_ranks = True
    changes_base = True
    needs_products = True
    central_dp = False  # the stack is every client's raw factors

    def __init__(self, config, initial_state: State) -> None:
        super().__init__(config, initial_state)
        self.merges = 0  # rounds merged so far: keys the fresh A's draws

    def new_sums(self) -> RoundSums:
        return StackedRoundSums()

    def merge(self, sums: RoundSums) -> State:
        self.merges += 1
        rng = fresh_adapter_rng(self.config.seed, self.merges)
        merged = {**self.state, **sums.mean()}
        for a_name, b_name in lora_pairs(sorted(merged)):
            rank, width = merged[a_name].shape
            bound = 1 / np.sqrt(width)  # PEFT: kaiming_uniform_(a=√5) on an r×k weight
            merged[a_name] = rng.uniform(-bound, bound, (rank, width)).astype(np.float32)
            merged[b_name] = np.zeros_like(merged[b_name])
        return merged

    def base_change(self, sums: RoundSums, merged: State) -> Increment:
        change = {}
        for a_name, b_name in lora_pairs(sorted(merged)):
            b_stack, a_stack = sums.stack(a_name, b_name)
            change[base_weight_name(a_name)] = (b_stack * np.float32(self.scale), a_stack)
        return change

    def state_dict(self) -> dict[str, np.ndarray]:
        return {"merges": np.array(self.merges)}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        self.merges = int(np.asarray(state.get("merges", 0)).item())
