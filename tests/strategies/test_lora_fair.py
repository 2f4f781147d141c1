"""LoRA-FAIR's correction of B (issue #11): never above its own objective at
ΔB = 0, and as low as a long independent solve of that objective."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedlora.strategies.lora_fair import correct_b

STEPS, LR = 50, 0.01  # the run-config defaults fair-steps and fair-lr


def _round(rng, count, d, k, r, weights=None, a_scale=1.0, b_scale=1.0, shared=0.0):
    """(ΔW, B̄, Ā) in float32, as the server gets them, for ``count`` clients:
    A_k = a_scale·(shared·A₀ + (1 + k)·N(0, 1)), B_k = b_scale·(shared·B₀ + N(0, 1)),
    A₀ and B₀ common to all (shared = 0: independent clients)."""
    weights = np.asarray(weights if weights is not None else rng.uniform(1, 1000, count))
    p = weights / weights.sum()
    a = [(1 + i) * rng.standard_normal((r, k)) for i in range(count)]
    b = [rng.standard_normal((d, r)) for _ in range(count)]
    if shared:
        a_0, b_0 = rng.standard_normal((r, k)), rng.standard_normal((d, r))
        a, b = [shared * a_0 + x for x in a], [shared * b_0 + x for x in b]
    a, b = [a_scale * x for x in a], [b_scale * x for x in b]
    ideal = sum(pk * bk @ ak for pk, ak, bk in zip(p, a, b))
    b_bar, a_bar = sum(pk * bk for pk, bk in zip(p, b)), sum(pk * ak for pk, ak in zip(p, a))
    return tuple(x.astype(np.float32) for x in (ideal, b_bar, a_bar))


def _objective(ideal, b_bar, a_bar, delta, lam):
    """f(ΔB) = 1 − cos(ΔW, (B̄ + ΔB)Ā) + λ‖ΔB‖², plainly: the d×k product, float64."""
    ideal, b_bar, a_bar, delta = (np.asarray(x, np.float64) for x in (ideal, b_bar, a_bar, delta))
    product = (b_bar + delta) @ a_bar
    norms = np.linalg.norm(ideal) * np.linalg.norm(product)
    cosine = np.sum(ideal * product) / norms if norms > 0 else 0.0
    return 1 - cosine + lam * np.sum(delta ** 2)


def _long_solve(ideal, b_bar, a_bar, lam, starts):
    """The lowest f that L-BFGS (strong Wolfe, float64, the d×k product) reaches
    from any of ``starts``: an independent reference for the minimum."""
    w, b0, a = (torch.from_numpy(np.asarray(x, np.float64)) for x in (ideal, b_bar, a_bar))
    best = np.inf
    for start in starts:
        delta = torch.tensor(np.asarray(start, np.float64), requires_grad=True)
        opt = torch.optim.LBFGS([delta], lr=1, max_iter=2000, history_size=20,
                                tolerance_grad=1e-12, tolerance_change=1e-15,
                                line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            product = (b0 + delta) @ a
            loss = (1 - (product * w).sum() / (product.norm() * w.norm())
                    + lam * delta.pow(2).sum())
            loss.backward()
            return loss

        opt.step(closure)
        best = min(best, _objective(ideal, b_bar, a_bar, delta.detach().numpy(), lam))
    return best


def test_issue_11_case_ends_below_no_correction():
    """3 clients, order-1 factors, A_k ∝ (1 + k): the case that ended above f(0)."""
    rng = np.random.default_rng(0)
    ideal, b_bar, a_bar = _round(rng, 3, 55, 17, 8, weights=(300, 120, 900))
    lam = 0.01
    # the case still sets the trap: the ridge onto ΔW with λ in ΔW's units,
    # the old warm start, lies far above f(0)
    gram = a_bar.astype(np.float64) @ a_bar.T
    old_start = np.linalg.solve(gram + lam * np.eye(8), a_bar @ ideal.T - gram @ b_bar.T).T
    at_zero = _objective(ideal, b_bar, a_bar, 0, lam)
    assert _objective(ideal, b_bar, a_bar, old_start, lam) > at_zero + 0.5

    delta = correct_b(ideal, b_bar, a_bar, lam, STEPS, LR)
    after = _objective(ideal, b_bar, a_bar, delta, lam)
    reference = _long_solve(ideal, b_bar, a_bar, lam, [np.zeros_like(b_bar)])
    print(f"f(0) = {at_zero:.6f}, f(correction) = {after:.6f}, long solve {reference:.6f}")
    assert delta.dtype == np.float32 and delta.shape == b_bar.shape
    assert after < at_zero - 0.005  # a real gain, not just a fallback to ΔB = 0
    assert after <= reference + 1e-6


def test_correction_is_deterministic():
    ideal, b_bar, a_bar = _round(np.random.default_rng(1), 4, 40, 30, 6)
    first = correct_b(ideal, b_bar, a_bar, 0.01, STEPS, LR)
    assert first.tobytes() == correct_b(ideal, b_bar, a_bar, 0.01, STEPS, LR).tobytes()


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(4))
def test_random_rounds_never_above_no_correction_and_near_the_minimum(seed):
    """Varied shapes, 2–5 clients, factor scales over five orders of magnitude,
    clients from independent to nearly alike, λ ∈ {0, 0.01, 0.1, 1}."""
    rng = np.random.default_rng(100 + seed)
    for case in range(32):
        d, k = (int(x) for x in rng.integers(4, 65, 2))
        r = int(rng.integers(1, min(d, k, 16) + 1))
        lam = (0.0, 0.01, 0.1, 1.0)[case % 4]
        ideal, b_bar, a_bar = _round(
            rng, int(rng.integers(2, 6)), d, k, r, a_scale=10 ** rng.uniform(-3, 2),
            b_scale=10 ** rng.uniform(-3, 2), shared=(case % 3 > 0) * 10 ** rng.uniform(-1, 2))
        delta = correct_b(ideal, b_bar, a_bar, lam, STEPS, LR)
        at_zero = _objective(ideal, b_bar, a_bar, 0, lam)
        after = _objective(ideal, b_bar, a_bar, delta, lam)
        reference = _long_solve(ideal, b_bar, a_bar, lam, [np.zeros_like(b_bar), delta])
        where = f"case {case}: d={d} k={k} r={r} λ={lam}: f(0)={at_zero} f={after} " \
                f"long solve {reference}"
        # float rounding only: 1 − cos is known to ~1e-16 absolute, whatever its size
        assert after <= at_zero * (1 + 1e-9) + 1e-13, where
        assert after <= reference + 1e-5, where  # at the minimum, not merely below f(0)
