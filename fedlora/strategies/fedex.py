"""FedEx-LoRA (Singhal et al., ACL 2025): averaged factors plus the exact
residual folded into the base (docs/algorithms.md §9).

Per LoRA module: Ā = Σ p_k A_k, B̄ = Σ p_k B_k (the paper averages uniformly;
here by examples, like every other strategy), and the residual
R = s·(Σ p_k B_k A_k − B̄Ā) is added to the base weight, so that
W0_new + s·B̄Ā = W0 + s·Σ p_k B_k A_k exactly. R goes to the nodes factorised,
left = s·[B_1 … B_K, −B̄], right = [p_1 A_1; …; p_K A_K; Ā] (rank ≤ (K+1)·r,
clients ordered by partition id). PEFT's B·A already has nn.Linear's
(out, in) layout, which is what is added; the public code adds R transposed,
which is wrong for non-square weights.
"""

from __future__ import annotations

import numpy as np

from fedlora.core.adapters import State, lora_pairs
from fedlora.strategies.base import LoraStrategy, RoundSums
from fedlora.strategies.fedavg import FedAvgClient
from fedlora.strategies.sums import StackedRoundSums
from fedlora.wire.basedelta import Increment, base_weight_name


class FedExLoRA(LoraStrategy):
    """FedAvg of the factors; the averaging error goes into the base."""

    name = "fedex"
    client_half = FedAvgClient
    changes_base = True
    needs_products = True
    central_dp = False  # the residual is built from every client's raw factors

    def new_sums(self) -> RoundSums:
        return StackedRoundSums()

    def merge(self, sums: RoundSums) -> State:
        return {**self.state, **sums.mean()}

    def base_change(self, sums: RoundSums, merged: State) -> Increment:
        change = {}
        for a_name, b_name in lora_pairs(sorted(merged)):
            b_stack, a_stack = sums.stack(a_name, b_name)
            left = np.concatenate([b_stack, -merged[b_name]], axis=1) * np.float32(self.scale)
            right = np.concatenate([a_stack, merged[a_name]], axis=0)
            change[base_weight_name(a_name)] = (left, right)
        return change
