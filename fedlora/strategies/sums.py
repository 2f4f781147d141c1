"""A round's accepted updates folded into running sums, one reply at a time.

``aggregate_train`` (``fedlora.strategies.base``) adds each reply as soon as it
is decoded and drops it; a strategy's ``merge`` then reads the sums. Memory
for a round is therefore independent of the number of clients, and, because
every sum is exact (``fedlora.exactsum``), so is the result of the order in
which the replies arrived.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from fedlora.adapters import State, lora_pairs
from fedlora.exactsum import ExactSum, check_bounded
from fedlora.privacy import CentralPrivacy


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


def _add(sums: dict[str, ExactSum], name: str, term: np.ndarray,
         peak: float | None = None) -> None:
    """sums[name] += term (exactly; a new sum on first use). ``peak``: the
    term was checked (``check_bounded``) and is not needed afterwards."""
    if name not in sums:
        sums[name] = ExactSum(np.shape(term))
    sums[name].add(term, peak, consume=peak is not None)


def _weighted(value: np.ndarray, weight: float) -> np.ndarray:
    return np.multiply(value, weight, dtype=np.float64)


class RoundSums:
    """Running example-weighted sums over one round's accepted updates.

    ``aggregate_train`` folds each reply in as soon as it is decoded and drops
    it, so the server's memory for a round is a few adapters (Σ p_k x_k of the
    uploads and of the clients' full factors) plus, when ``products`` is on,
    one d×k matrix per LoRA module (Σ p_k B_k A_k, the ideal update LoRA-FAIR
    aligns to and the residual metrics compare with) — independent of the
    number of clients. Each sum is an ``ExactSum`` (three float64 arrays), so
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

    def add(self, update: ClientUpdate, factors: State, weight: float | None = None) -> None:
        """Fold in one update: ``factors`` is the client's full adapter after
        training as the server reconstructs it, in global units
        (``LoraStrategy.client_factors``). ``weight`` is its aggregation
        weight (default: its examples; the training loss is always weighted
        by examples). Raises ``OverflowError`` before changing anything when a
        weighted value is too large to add exactly (``fedlora.exactsum.LIMIT``)."""
        weight = update.weight if weight is None else weight
        terms = {name: _weighted(value, weight) for name, value in update.tensors.items()}
        factor_terms = {name: _weighted(value, weight) for name, value in factors.items()}
        with np.errstate(over="ignore", invalid="ignore"):  # refused just below
            products = {pair: _weighted(factors[pair[1]] @ factors[pair[0]], weight)
                        for pair in (lora_pairs(list(factors)) if self.products else ())}
        loss = _weighted(np.float64(update.loss), update.weight)
        peaks = {id(term): check_bounded(term) for term in (
            *terms.values(), *factor_terms.values(), *products.values())}
        check_bounded(loss)
        check_bounded(np.float64(weight))
        self._count(update, loss, weight)
        for name, term in terms.items():
            _add(self._uploads, name, term, peaks[id(term)])
        for name, term in factor_terms.items():
            _add(self._factors, name, term, peaks[id(term)])
        for pair, term in products.items():
            _add(self._ideal, pair, term, peaks[id(term)])

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
        """Σ p_k x_k of the uploaded tensors (p_k ∝ examples)."""
        return {n: (v.total() / self.weight).astype(np.float32)
                for n, v in self._uploads.items()}

    def factor_mean(self) -> State:
        """Σ p_k of the clients' full factors: FedIT's (Ā, B̄)."""
        return {n: (v.total() / self.weight).astype(np.float32)
                for n, v in self._factors.items()}

    def ideal(self, a_name: str, b_name: str) -> np.ndarray:
        """ΔW* = Σ p_k B_k A_k for one LoRA module (the LoRA scale s omitted)."""
        return (self._ideal[a_name, b_name].total() / self.weight).astype(np.float32)

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
