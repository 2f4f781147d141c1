"""LoRA-FAIR (ICCV 2025): FedAvg factors plus a server-side correction of B.

Per LoRA module the server forms Ā, B̄ and the ideal ΔW = Σ p_k B_k A_k, then
finds ΔB* = argmin_ΔB [1 − cos(ΔW, (B̄ + ΔB)Ā)] + λ‖ΔB‖²_F and sends
(Ā, B̄ + ΔB*). Clients continue from the corrected global. Only one module's
d×k matrix exists at a time. Traffic equals FedAvg's.

The paper gives no closed form and runs a few hundred gradient steps from
ΔB = 0. Here the search starts from the least-squares correction
ΔB₀ = (ΔW − B̄Ā)Āᵀ(ĀĀᵀ + λI)⁻¹ (the ridge solution of ‖ΔW − (B̄ + ΔB)Ā‖²,
an r×r solve), then takes ``fair-steps`` Adam steps on the paper's objective.
The steps move ΔB in units of the RMS entry of B̄ + ΔB₀ (``fair-lr`` is a
relative step), because cosine is blind to scale and B's entries are small:
an absolute step size either does nothing or inflates B. The warm start keeps
the correction cheap (well under 10% of a round) and never worse than
FedAvg's B̄ in the Frobenius sense.
"""

from __future__ import annotations

import numpy as np
import torch

from fedlora.adapters import State, lora_pairs
from fedlora.strategies.base import LoraStrategy, RoundSums
from fedlora.strategies.fedavg import FedAvgClient


def correct_b(ideal: np.ndarray, b_bar: np.ndarray, a_bar: np.ndarray, lam: float,
              steps: int, lr: float) -> np.ndarray:
    """ΔB minimising 1 − cos(ideal, (B̄ + ΔB)Ā) + λ‖ΔB‖²: ridge warm start, then
    Adam steps in units of B's RMS entry.

    The cosine is evaluated in factored form, ⟨BĀ, ΔW⟩ = ⟨B, ΔWĀᵀ⟩ and
    ‖BĀ‖² = ⟨BᵀB, ĀĀᵀ⟩, so a step costs O(d·r²) instead of O(d·k·r)."""
    a = a_bar.astype(np.float64)
    gram = a @ a.T
    projected = ideal.astype(np.float64) @ a.T  # ΔWĀᵀ, d×r
    start = np.linalg.solve(gram + lam * np.eye(len(gram)),
                            (projected - b_bar @ gram).T).T  # (ΔW − B̄Ā)Āᵀ(G + λI)⁻¹
    unit = float(np.sqrt(np.mean((b_bar + start) ** 2))) or 1.0
    ideal_norm = float(np.linalg.norm(ideal))
    b0, warm, g, m = (torch.from_numpy(x) for x in (b_bar + start, start, gram, projected))
    step = torch.zeros_like(b0, requires_grad=True)  # further correction, in units
    opt = torch.optim.Adam([step], lr=lr)
    for _ in range(steps):
        b = b0 + unit * step
        cosine = (b * m).sum() / (ideal_norm * torch.sqrt(((b.T @ b) * g).sum()) + 1e-30)
        loss = 1 - cosine + lam * (warm + unit * step).pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return (start + unit * step.detach().numpy()).astype(np.float32)


class LoraFair(LoraStrategy):
    """FedAvg of A, B and head, then B corrected towards the ideal ΔW."""

    name = "lora-fair"
    client_half = FedAvgClient

    needs_products = True

    def merge(self, sums: RoundSums) -> State:
        merged = {**self.state, **sums.mean()}
        for a_name, b_name in lora_pairs(list(merged)):
            ideal = sums.ideal(a_name, b_name)
            if not np.any(ideal):
                continue  # nothing to align to (e.g. B still 0 everywhere)
            merged[b_name] = merged[b_name] + correct_b(
                ideal, merged[b_name], merged[a_name], self.config["fair-lambda"],
                self.config["fair-steps"], self.config["fair-lr"])
        return merged
