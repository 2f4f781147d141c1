"""LoRA-FAIR (ICCV 2025): FedAvg factors plus a server-side correction of B.

Per LoRA module the server forms Ā, B̄ and the ideal ΔW = Σ p_k B_k A_k, then
finds ΔB* = argmin f(ΔB), f(ΔB) = 1 − cos(ΔW, (B̄ + ΔB)Ā) + λ‖ΔB‖²_F, and
sends (Ā, B̄ + ΔB*). Clients continue from the corrected global. Only one
module's d×k matrix exists at a time. Traffic equals FedAvg's.

The paper gives no closed form and runs a few hundred gradient steps from
ΔB = 0. Here, with B = B̄ + ΔB, n = ‖BĀ‖ and c = cos(ΔW, BĀ):

* Units. The cosine is dimensionless and blind to B's scale; only λ‖ΔB‖²
  sees it. So of all multiples tB of a candidate, the one nearest B̄
  (t = ⟨B, B̄⟩/‖B‖²) has the same cosine and the least ‖ΔB‖: every
  candidate is moved there. This removes f's one flat direction, along which
  gradient steps crawl.
* Warm start. ∇f = 0 reads B(c·ĀĀᵀ + 2λn²I) = 2λn²B̄ + (n/‖ΔW‖)·ΔWĀᵀ: the
  ridge regression of ΔW rescaled to norm n/c on Ā, pulled towards B̄ with
  weight 2λn²/c, i.e. λ carried into that regression's units. The warm start
  solves it with (n, c) taken from the current B, moves the result to its
  multiple nearest B̄ and repeats, from (‖B̄Ā‖, 1): an r×r solve each time,
  and ten reach the minimum on every case tests/test_lora_fair.py tries.
  An earlier warm start was the ridge of ΔW itself on Ā with λ as weight:
  it spent ‖ΔB‖ on matching ‖ΔW‖, which the cosine does not reward and
  λ‖ΔB‖² charges for, and it weighed λ against an error of size ‖ΔW‖²
  instead of 1. With order-1 factors it started far above f(0), and 50
  small Adam steps ended there too (issue #11).
* Then ``fair-steps`` Adam steps on f, in units of the start's RMS entry
  (``fair-lr`` is a relative step: f is scale-free in B but for λ, so an
  absolute step either does nothing or swamps B): a safety net for where the
  fixed point has not settled. Where it has, they change nothing.
* Neither the fixed point nor Adam is sure to descend, so f is evaluated
  exactly at ΔB = 0 and at every iterate and the lowest wins, checked once
  more as the float32 ΔB returned: the correction never leaves f above
  FedAvg's B̄.
  f is cheap in factored form, ⟨BĀ, ΔW⟩ = ⟨B, ΔWĀᵀ⟩ and
  ‖BĀ‖² = ⟨BᵀB, ĀĀᵀ⟩: O(d·r²) per evaluation, no d×k product.
"""

from __future__ import annotations

import numpy as np

from fedlora.core.adapters import State, lora_pairs
from fedlora.core.config import Key, non_negative, positive
from fedlora.strategies.base import LoraStrategy, RoundSums
from fedlora.strategies.fedavg import FedAvgClient

WARM_START_SOLVES = 10  # fixed-point rounds of the warm start (r×r solves)
TINY = 1e-300  # denominators: a zero B or BĀ has cosine 0, not NaN


def correct_b(ideal: np.ndarray, b_bar: np.ndarray, a_bar: np.ndarray, lam: float,
              steps: int, lr: float) -> np.ndarray:
    """ΔB (float32, d×r) lowering f(ΔB) = 1 − cos(ideal, (B̄ + ΔB)Ā) + λ‖ΔB‖² as far as
    the stationarity fixed point and ``steps`` Adam steps of relative size ``lr``
    get, and never above f(0) (module docstring)."""
    import torch  # here: resolving a config imports every strategy, before Ray starts

    ideal_norm = float(np.linalg.norm(ideal.astype(np.float64)))
    if ideal_norm == 0:
        return np.zeros_like(b_bar, dtype=np.float32)
    a, mean = (torch.from_numpy(x.astype(np.float64)) for x in (a_bar, b_bar))
    gram = a @ a.T  # ĀĀᵀ, r×r
    target = torch.from_numpy(ideal.astype(np.float64)) @ a.T  # ΔWĀᵀ, d×r

    def cosine(b):
        norm = ((b.T @ b) * gram).sum().sqrt()  # ‖BĀ‖
        return (b * target).sum() / (ideal_norm * norm).clamp_min(TINY), norm

    def objective(b):
        return 1 - cosine(b)[0] + lam * (b - mean).pow(2).sum()

    def nearest_multiple(b):  # same cosine, least ‖B − B̄‖
        return ((b * mean).sum() / (b * b).sum().clamp_min(TINY)).clamp_min(0) * b

    best, best_f = mean, objective(mean)  # ΔB = 0 is a candidate too

    def keep(b, value):
        nonlocal best, best_f
        if value < best_f:
            best, best_f = b.detach(), value.detach()

    c, n = torch.tensor(1.0, dtype=torch.float64), cosine(mean)[1]
    for _ in range(WARM_START_SOLVES):
        ridge = 2 * lam * n * n
        system = c * gram + ridge * torch.eye(len(gram), dtype=torch.float64)
        b = nearest_multiple((ridge * mean + n / ideal_norm * target)
                             @ torch.linalg.pinv(system, hermitian=True))
        keep(b, objective(b))
        c, n = cosine(b)

    start = best
    unit = float(start.pow(2).mean().sqrt()) or 1.0
    step = torch.zeros_like(start, requires_grad=True)
    opt = torch.optim.Adam([step], lr=lr)
    for i in range(steps + 1):  # every iterate is a candidate, the last one too
        b = nearest_multiple(start + unit * step)
        loss = objective(b)
        keep(b, loss)
        if i < steps:
            opt.zero_grad()
            loss.backward()
            opt.step()
    delta = (best - mean).float()  # what is returned: rounding must not undo the gain
    if objective(mean + delta.double()) > objective(mean):
        delta.zero_()
    return delta.numpy()


class LoraFair(LoraStrategy):
    """FedAvg of A, B and head, then B corrected towards the ideal ΔW."""

    name = "lora-fair"
    client_half = FedAvgClient
    keys = {
        "fair-lambda": Key(float, 0.01, "LoRA-FAIR regulariser weight λ on ‖ΔB‖²",
                           non_negative),
        "fair-steps": Key(int, 50, "LoRA-FAIR Adam steps per module after the "
                          "warm start (a ridge solve in the objective's units)", non_negative),
        "fair-lr": Key(float, 0.01, "LoRA-FAIR Adam step, relative to B's RMS entry",
                       positive),
    }

    needs_products = True
    central_dp = False  # the correction reads each client's raw factors (Σ p_k B_k A_k)

    def merge(self, sums: RoundSums) -> State:
        merged = {**self.state, **sums.mean()}
        for a_name, b_name in lora_pairs(list(merged)):
            ideal = sums.ideal(a_name, b_name)
            if not np.any(ideal):
                continue  # nothing to align to (e.g. B still 0 everywhere)
            merged[b_name] = merged[b_name] + correct_b(
                ideal, merged[b_name], merged[a_name], self.config.fair_lambda,
                self.config.fair_steps, self.config.fair_lr)
        return merged
