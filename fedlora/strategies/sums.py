"""A round's accepted updates folded into running sums, one reply at a time.

``aggregate_train`` (``fedlora.strategies.base``) adds each reply as soon as it
is decoded and drops it; a strategy's ``merge`` then reads the sums. Memory
for a round is therefore independent of the number of clients.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
from flwr.app import MetricRecord

from fedlora.adapters import State, lora_pairs
from fedlora.privacy import CentralPrivacy


@dataclass(frozen=True)
class ClientUpdate:
    node_id: int
    weight: float
    tensors: State
    metrics: MetricRecord


def _add_weighted(sums: dict[str, np.ndarray], name: str, value: np.ndarray,
                  weight: float) -> None:
    """sums[name] += weight × value, in float64."""
    if name in sums:
        sums[name] += weight * value
    else:
        sums[name] = weight * value.astype(np.float64)


class RoundSums:
    """Running example-weighted sums over one round's accepted updates.

    ``aggregate_train`` folds each reply in as soon as it is decoded and drops
    it, so the server's memory for a round is a few adapters (Σ p_k x_k of the
    uploads and of the clients' full factors) plus, when ``products`` is on,
    one d×k float32 matrix per LoRA module (Σ p_k B_k A_k, the ideal update
    LoRA-FAIR aligns to and the residual metrics compare with) — independent
    of the number of clients.
    """

    def __init__(self, products: bool = True) -> None:
        self.weight = 0.0
        self.count = 0
        self.loss = 0.0  # Σ weight × train loss
        self.compute_s = 0.0  # the clients' reported training time
        self.fold_s = 0.0  # the server's time decoding and adding updates
        self.products = products
        self._uploads: dict[str, np.ndarray] = {}
        self._factors: dict[str, np.ndarray] = {}
        self._ideal: dict[tuple[str, str], np.ndarray] = {}

    def add(self, update: ClientUpdate, factors: State) -> None:
        """Fold in one update: ``factors`` is the client's full adapter after
        training as the server reconstructs it (``LoraStrategy.client_factors``)."""
        self._count(update)
        weight = update.weight
        for name, value in update.tensors.items():
            _add_weighted(self._uploads, name, value, weight)
        for name, value in factors.items():
            _add_weighted(self._factors, name, value, weight)
        if self.products:
            for a_name, b_name in lora_pairs(list(factors)):
                product = factors[b_name] @ factors[a_name]
                if (a_name, b_name) in self._ideal:
                    self._ideal[a_name, b_name] += np.float32(weight) * product
                else:
                    self._ideal[a_name, b_name] = (np.float32(weight) * product
                                                   ).astype(np.float32)

    def _count(self, update: ClientUpdate) -> None:
        self.weight += update.weight
        self.count += 1
        self.loss += update.weight * float(update.metrics.get("train-loss", 0.0))
        self.compute_s += float(update.metrics.get("compute-seconds", 0.0))

    def mean(self) -> State:
        """Σ p_k x_k of the uploaded tensors (p_k ∝ examples)."""
        return {n: (v / self.weight).astype(np.float32) for n, v in self._uploads.items()}

    def factor_mean(self) -> State:
        """Σ p_k of the clients' full factors: FedIT's (Ā, B̄)."""
        return {n: (v / self.weight).astype(np.float32) for n, v in self._factors.items()}

    def ideal(self, a_name: str, b_name: str) -> np.ndarray:
        """ΔW* = Σ p_k B_k A_k for one LoRA module (the LoRA scale s omitted)."""
        return self._ideal[a_name, b_name] / np.float32(self.weight)

    def residual(self, sent: State) -> float:
        """‖ΔW* − B̃Ã‖_F / ‖ΔW*‖_F over all LoRA modules (docs/algorithms.md §0),
        (Ã, B̃) being ``sent``; the LoRA scale cancels. NaN when ΔW* is zero."""
        error = norm = 0.0
        for (a_name, b_name) in self._ideal:
            ideal = self.ideal(a_name, b_name).astype(np.float64)
            error += float(np.sum((ideal - sent[b_name].astype(np.float64) @ sent[a_name])
                                  ** 2))
            norm += float(np.sum(ideal ** 2))
        return float(np.sqrt(error / norm)) if norm > 0 else float("nan")


class ClippedRoundSums(RoundSums):
    """Round sums under central DP (``fedlora.privacy.CentralPrivacy``): each
    client's change to the trained tensors, factors − ``sent``, is clipped
    and added with equal weight; ``mean`` is then the noisy average change
    applied to ``sent`` and expressed as an upload (``to_upload``), so every
    strategy's ``merge`` works on it unchanged. Products stay off: the
    residual metrics would publish raw client factors."""

    def __init__(self, privacy: CentralPrivacy, sent: State, names: Iterable[str],
                 to_upload: Callable[[State], State]) -> None:
        super().__init__(products=False)
        self.privacy, self.sent, self.names = privacy, sent, list(names)
        self.to_upload = to_upload
        self._clipped = [np.zeros(sent[n].shape, np.float64) for n in self.names]
        self._mean: State | None = None

    def add(self, update: ClientUpdate, factors: State) -> None:
        self._count(update)
        change = [factors[n].astype(np.float64) - self.sent[n] for n in self.names]
        self.privacy.clip(change)
        for total, part in zip(self._clipped, change):
            total += part

    def mean(self) -> State:
        """The noisy average, drawn (and accounted) once per round."""
        if self._mean is None:
            noisy = self.privacy.noisy_average(self._clipped)
            self._mean = self.to_upload({**self.sent, **{
                n: (self.sent[n] + v).astype(np.float32) for n, v in zip(self.names, noisy)}})
        return self._mean
