"""HetLoRA (Cho et al., EMNLP 2024): heterogeneous ranks, aggregation weighted
by each client's update norm (docs/algorithms.md §6).

Client k trains at rank r_k (``client-ranks``) from the first r_k ranks of
the global adapter (``ranks.truncate``: B rescaled so its ΔW is the global's
truncated ΔW). The server zero-pads each reply to the global rank in global
units (``ranks.pad``) and sums A, B and the head with weights
S_k = ‖s_k B_k A_k‖_F / Σ_j ‖s_j B_j A_j‖_F (the norm over all LoRA modules
together), not by examples. The paper's optional rank self-pruning (from
third-party code) is not implemented. The residual metrics (§0) are
against the example-weighted ΔW* of every strategy, so agg_residual also
shows how far the norm weights take the global from it.
"""

from __future__ import annotations

import math

import numpy as np

from fedlora.core.adapters import State, lora_pairs
from fedlora.strategies.base import ClientUpdate, LoraStrategy, RoundSums
from fedlora.strategies.fedavg import FedAvgClient
from fedlora.strategies.ranks import CLIENT_RANKS, first_ranks


def update_norm(factors: State, scale: float) -> float:
    """‖s·B·A‖_F over all LoRA modules, from the factors (‖BA‖² = ⟨BᵀB, AAᵀ⟩)."""
    total = 0.0
    for a_name, b_name in lora_pairs(list(factors)):
        a, b = (factors[n].astype(np.float64) for n in (a_name, b_name))
        total += float(np.sum((b.T @ b) * (a @ a.T)))
    return scale * math.sqrt(max(total, 0.0))


class HetLoRA(LoraStrategy):
    """Zero-padded factors summed with norm-based weights."""

    name = "hetlora"
    client_half = FedAvgClient
    keys = {"client-ranks": CLIENT_RANKS}
    heterogeneous_ranks = True
    central_dp = False  # the weights read each client's raw update norm

    def fold(self, sums: RoundSums, update: ClientUpdate, factors: State) -> None:
        # under a robust mode a lower-rank client arrives with the ranks it was
        # not sent filled in from the global (fedlora.strategies.robust): S_k
        # is still the norm of its own ranks' product
        own = factors if self.config.robust == "none" else first_ranks(factors, update.rank)
        sums.add(update, factors, weight=update_norm(own, self.scale))

    def merge(self, sums: RoundSums) -> State:
        if sums.weight <= 0:
            raise ArithmeticError("every client's update has norm 0")
        return {**self.state, **sums.mean()}
