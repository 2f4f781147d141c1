"""FlexLoRA (Bai et al., NeurIPS 2024): the average ΔW, redistributed by SVD
(docs/algorithms.md §7).

Per LoRA module the server forms ΔW = Σ p_k s_k B_k A_k (one d×k matrix at a
time, from the round sums) and its SVD U Σ Vᵀ. The global adapter is the best
rank-r approximation, B = U_r Σ_r / s, A = V_rᵀ, and a client of rank r_k gets
its first r_k ranks rescaled to its own scale, B = U_{r_k} Σ_{r_k} / s_k
(``ranks.truncate``), which is FlexLoRA's rule. LoRA is never merged into
the base, so ΔW is the cumulative update. The head is averaged by examples.
"""

from __future__ import annotations

import numpy as np

from fedlora.core.adapters import State, lora_pairs
from fedlora.strategies.base import LoraStrategy, RoundSums
from fedlora.strategies.fedavg import FedAvgClient
from fedlora.strategies.ranks import CLIENT_RANKS


def best_rank(delta: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """(B, A) with B·A the best rank-``rank`` approximation of ``delta``,
    singular values in B, in descending order (so truncation keeps the best)."""
    u, sigma, vt = np.linalg.svd(delta.astype(np.float64), full_matrices=False)
    b = np.zeros((delta.shape[0], rank))
    a = np.zeros((rank, delta.shape[1]))
    kept = min(rank, len(sigma))
    b[:, :kept] = u[:, :kept] * sigma[:kept]
    a[:kept] = vt[:kept]
    return b.astype(np.float32), a.astype(np.float32)


class FlexLoRA(LoraStrategy):
    """SVD of the example-weighted average product, per module."""

    name = "flexlora"
    client_half = FedAvgClient
    keys = {"client-ranks": CLIENT_RANKS}
    heterogeneous_ranks = True
    needs_products = True
    central_dp = False  # the SVD reads each client's raw product

    def merge(self, sums: RoundSums) -> State:
        merged = {**self.state, **sums.mean()}
        for a_name, b_name in lora_pairs(list(merged)):
            # ideal() is Σ p_k B'_k A'_k in global units: ΔW / s
            merged[b_name], merged[a_name] = best_rank(sums.ideal(a_name, b_name),
                                                       self.global_rank)
        return merged
