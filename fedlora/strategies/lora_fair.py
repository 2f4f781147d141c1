"""LoRA-FAIR (ICCV 2025): FedAvg factors plus a server-side correction of B.

Per LoRA module the server forms Ā, B̄ and the ideal ΔW = Σ p_k B_k A_k, then
finds ΔB* = argmin_ΔB [1 − cos(ΔW, (B̄ + ΔB)Ā)] + λ‖ΔB‖²_F by ``fair-steps``
Adam steps (``fair-lr``) from ΔB = 0 (the paper gives no closed form), and
sends (Ā, B̄ + ΔB*). Clients continue from the corrected global. Only one
module's d×k matrix exists at a time. Traffic equals FedAvg's.
"""

from __future__ import annotations

import numpy as np
import torch

from fedlora.adapters import State, lora_pairs
from fedlora.strategies.base import ClientUpdate, LoraStrategy
from fedlora.strategies.fedavg import FedAvgClient, weighted_mean


def correct_b(ideal: np.ndarray, b_bar: np.ndarray, a_bar: np.ndarray, lam: float,
              steps: int, lr: float) -> np.ndarray:
    """ΔB minimising 1 − cos(ideal, (B̄ + ΔB)Ā) + λ‖ΔB‖² (gradient descent from 0)."""
    target = torch.from_numpy(ideal.astype(np.float32)).reshape(-1)
    b = torch.from_numpy(b_bar.astype(np.float32))
    a = torch.from_numpy(a_bar.astype(np.float32))
    delta = torch.zeros_like(b, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=lr)
    for _ in range(steps):
        product = ((b + delta) @ a).reshape(-1)
        loss = 1 - torch.nn.functional.cosine_similarity(product, target, dim=0)
        loss = loss + lam * delta.pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return delta.detach().numpy()


class LoraFair(LoraStrategy):
    """FedAvg of A, B and head, then B corrected towards the ideal ΔW."""

    name = "lora-fair"
    client_half = FedAvgClient

    def merge(self, updates: list[ClientUpdate]) -> State:
        merged = {**self.state, **weighted_mean(updates, self.upload_shapes)}
        total = sum(u.weight for u in updates)
        for a_name, b_name in lora_pairs(list(merged)):
            ideal = sum((u.weight / total) * (u.tensors[b_name] @ u.tensors[a_name])
                        for u in updates)
            if not np.any(ideal):
                continue  # nothing to align to (e.g. B still 0 everywhere)
            merged[b_name] = merged[b_name] + correct_b(
                ideal, merged[b_name], merged[a_name], self.config["fair-lambda"],
                self.config["fair-steps"], self.config["fair-lr"])
        return merged
