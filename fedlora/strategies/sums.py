"""A round's accepted updates folded into running sums, one reply at a time.

``aggregate_train`` (``fedlora.strategies.base``) adds each reply as soon as it
is decoded and drops it; a strategy's ``merge`` then reads the sums. Memory
for a round is therefore independent of the number of clients, and, because
every sum is exact (``fedlora.core.exactsum``), so is the result of the order in
which the replies arrived.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from fedlora.core.adapters import State, lora_pairs
from fedlora.core.exactsum import ExactSum, check_bounded, weighted_peak
from fedlora.learning.privacy import CentralPrivacy


@dataclass(frozen=True)
class ClientUpdate:
    """One accepted reply: who sent it, for which task, and what it holds."""

    node_id: int
    partition_id: int  # the partition the server asked of the node (not its claim)
    rank: int  # the rank the node was asked to train at
    weight: float  # examples trained on (p_k ∝ weight)
    tensors: State  # the decoded upload
    loss: float = 0.0  # the client's mean training loss
    compute_s: float = 0.0  # the client's reported training time (timing only)


def _add(sums: dict, name: str | tuple[str, str], values: np.ndarray, weight: float,
         peak: float) -> None:
    """sums[name] += weight × values (exactly; a new sum on first use).
    ``peak``: ``weighted_peak(values, weight)``, checked by the caller."""
    if name not in sums:
        sums[name] = ExactSum(np.shape(values))
    sums[name].add_weighted(values, weight, peak)


def _weighted(value: np.ndarray, weight: float) -> np.ndarray:
    return np.multiply(value, weight, dtype=np.float64)


class RoundSums:
    """Running example-weighted sums over one round's accepted updates.

    ``aggregate_train`` folds each reply in as soon as it is decoded and drops
    it, so the server's memory for a round is a few adapters (Σ p_k x_k of the
    uploads and of the clients' full factors) plus, when ``products`` is on,
    one d×k matrix per LoRA module (Σ p_k B_k A_k, the ideal update LoRA-FAIR
    aligns to and the residual metrics compare with, and a float32 one that
    each reply's B_k A_k is computed into) — independent of the number of
    clients. Each sum is an ``ExactSum`` (three float64 arrays), so
    the sums do not depend on the order the updates arrive in.
    """

    def __init__(self, products: bool = True) -> None:
        self.count = 0
        self.compute_s = 0.0  # the clients' reported training time (timing only)
        self.compute_max_s = 0.0  # the slowest client's: a parallel round's critical path
        self.fold_s = 0.0  # the server's time decoding and adding updates
        self.products = products
        self._weight = ExactSum(())
        self._examples = ExactSum(())
        self._loss = ExactSum(())  # Σ examples × train loss
        self._uploads: dict[str, ExactSum] = {}
        self._factors: dict[str, ExactSum] = {}
        self._ideal: dict[tuple[str, str], ExactSum] = {}
        self._product_arrays: dict[tuple[str, str], np.ndarray] = {}

    def add(self, update: ClientUpdate, factors: State, weight: float | None = None) -> None:
        """Fold in one update: ``factors`` is the client's full adapter after
        training as the server reconstructs it, in global units
        (``LoraStrategy.client_factors``). ``weight`` is its aggregation
        weight for the uploads (``mean``; default: its examples); the factors
        (``factor_mean``), the products (``ideal``) and the training loss are
        always weighted by examples, so ΔW* and the FedIT baseline of the
        residual metrics are those of docs/algorithms.md §0 whatever weights
        a strategy aggregates with (HetLoRA's norms). Raises ``OverflowError``
        before changing anything when a weighted value is too large to add
        exactly (``fedlora.core.exactsum.LIMIT``)."""
        weight = update.weight if weight is None else weight
        with np.errstate(over="ignore", invalid="ignore"):  # refused just below
            products = self._products(factors)
        peaks = {id(values): weighted_peak(values, weight)
                 for values in update.tensors.values()}
        by_examples = {id(values): weighted_peak(values, update.weight)
                       for values in (*factors.values(), *products.values())}
        loss = _weighted(np.float64(update.loss), update.weight)
        check_bounded(loss)
        check_bounded(np.float64(weight))
        self._count(update, loss, weight)
        for name, values in update.tensors.items():
            _add(self._uploads, name, values, weight, peaks[id(values)])
        for name, values in factors.items():
            _add(self._factors, name, values, update.weight, by_examples[id(values)])
        for pair, values in products.items():
            _add(self._ideal, pair, values, update.weight, by_examples[id(values)])

    def _products(self, factors: State) -> dict[tuple[str, str], np.ndarray]:
        """B_k A_k of each LoRA module (when ``products`` is on), each into an
        array of this round's kept for the next update: at d×k per module
        they are the largest terms, and fresh arrays that size cost page
        faults on every reply (``fedlora.core.exactsum``)."""
        if not self.products:
            return {}
        products = {}
        for pair in lora_pairs(list(factors)):
            a, b = factors[pair[0]], factors[pair[1]]
            shape, dtype = (b.shape[0], a.shape[1]), np.result_type(a, b)
            out = self._product_arrays.get(pair)
            if out is None or out.shape != shape or out.dtype != dtype:
                out = self._product_arrays[pair] = np.empty(shape, dtype)
            products[pair] = np.matmul(b, a, out=out)
        return products

    def _count(self, update: ClientUpdate, loss: np.ndarray, weight: float) -> None:
        self._weight.add(np.float64(weight))
        self._examples.add(np.float64(update.weight))
        self._loss.add(loss)
        self.count += 1
        self.compute_s += update.compute_s
        self.compute_max_s = max(self.compute_max_s, update.compute_s)

    @property
    def weight(self) -> float:
        """Σ aggregation weights (examples, unless a strategy weighs otherwise)."""
        return float(self._weight.total())

    @property
    def examples(self) -> float:
        return float(self._examples.total())

    @property
    def loss(self) -> float:
        """Σ weight × train loss over the accepted updates."""
        return float(self._loss.total())

    def mean(self) -> State:
        """Σ w_k x_k / Σ w_k of the uploaded tensors (w_k the aggregation
        weight: examples unless the strategy folds with its own)."""
        return {n: (v.total() / self.weight).astype(np.float32)
                for n, v in self._uploads.items()}

    def factor_mean(self) -> State:
        """Σ p_k of the clients' full factors (p_k ∝ examples): FedIT's (Ā, B̄)."""
        return {n: (v.total() / self.examples).astype(np.float32)
                for n, v in self._factors.items()}

    def ideal(self, a_name: str, b_name: str) -> np.ndarray:
        """ΔW* = Σ p_k B_k A_k for one LoRA module (p_k ∝ examples; the LoRA
        scale s omitted)."""
        return (self._ideal[a_name, b_name].total() / self.examples).astype(np.float32)

    def residual(self, sent: State, base_step: Callable[[str], np.ndarray | None] = None
                 ) -> float:
        """‖ΔW* − (B̃Ã + base step)‖_F / ‖ΔW*‖_F over all LoRA modules
        (docs/algorithms.md §0), (Ã, B̃) being ``sent`` and ``base_step(a_name)``
        what the round folded into that module's base weight, in adapter units
        (÷ s); the LoRA scale cancels. NaN when ΔW* is zero."""
        error = norm = 0.0
        for (a_name, b_name) in self._ideal:
            ideal = self.ideal(a_name, b_name).astype(np.float64)
            applied = sent[b_name].astype(np.float64) @ sent[a_name]
            step = base_step(a_name) if base_step is not None else None
            if step is not None:
                applied = applied + step
            error += float(np.sum((ideal - applied) ** 2))
            norm += float(np.sum(ideal ** 2))
        return float(np.sqrt(error / norm)) if norm > 0 else float("nan")


class ClippedRoundSums(RoundSums):
    """Round sums under central DP (``fedlora.learning.privacy.CentralPrivacy``): each
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
        self._clipped = [ExactSum(sent[n].shape) for n in self.names]
        self._mean: State | None = None

    def add(self, update: ClientUpdate, factors: State, weight: float | None = None) -> None:
        change = [factors[n].astype(np.float64) - self.sent[n] for n in self.names]
        self.privacy.clip(change)
        loss = _weighted(np.float64(update.loss), update.weight)
        check_bounded(loss)
        self._count(update, loss, 1.0)
        for total, part in zip(self._clipped, change):
            total.add(part)

    def mean(self) -> State:
        """The noisy average, drawn (and accounted) once per round."""
        if self._mean is None:
            noisy = self.privacy.noisy_average([total.total() for total in self._clipped])
            self._mean = self.to_upload({**self.sent, **{
                n: (self.sent[n] + v).astype(np.float32) for n, v in zip(self.names, noisy)}})
        return self._mean


class StackedRoundSums(RoundSums):
    """Round sums that also keep every client's LoRA factors (global units)
    and example count, for strategies whose exact update stacks them (FLoRA,
    FedEx-LoRA): the memory grows with the round's clients, as the stacked
    factors on the wire do. ``stack`` orders them by partition id, so the
    stacked bytes do not depend on arrival order."""

    def __init__(self, products: bool = True) -> None:
        super().__init__(products)
        self._clients: list[tuple[int, float, State]] = []

    def add(self, update: ClientUpdate, factors: State, weight: float | None = None) -> None:
        super().add(update, factors, weight)
        lora = {n: factors[n] for pair in lora_pairs(list(factors)) for n in pair}
        self._clients.append((update.partition_id, update.weight, lora))

    def stack(self, a_name: str, b_name: str) -> tuple[np.ndarray, np.ndarray]:
        """(B_stack d×Σr, A_stack Σr×k) with B_stack·A_stack = Σ p_k B_k A_k."""
        clients = sorted(self._clients, key=lambda c: (c[0], c[1]))
        total = self.examples
        b = np.concatenate([f[b_name] for _, _, f in clients], axis=1)
        a = np.concatenate([(w / total) * f[a_name].astype(np.float64)
                            for _, w, f in clients], axis=0)
        return b.astype(np.float32), a.astype(np.float32)
