"""A round's accepted updates folded into running sums, one reply at a time.

The server round (``fedlora.federation.round``) adds each reply as soon as it
is decoded and drops it; a strategy's ``merge`` then reads the sums. Memory
for a round is therefore independent of the number of clients, and, because
every sum is exact (``fedlora.core.exactsum``), so is the result of the order in
which the replies arrived.

The one exception is the clients' mean product ΔW* = Σ p_k B_k A_k of each
LoRA module when only the ``agg_residual`` diagnostic reads it (or FLoRA's
and FedEx's stacks, which hold every client's factors anyway): an exact d×k
sum per reply and module was 7 of the server's 8 ms per MiniLM update. Each
client's LoRA factors are kept instead (r·(d+k) values per module, against
the d×k products), and ΔW* is one float64 product of the stacked factors at
the end of the round, in an order of the clients' partition ids (then
contents), never of arrival (``canonical_order``). A merge that reads ΔW*
(FlexLoRA, LoRA-FAIR: ``streamed_products``) keeps the exact sum of each
client's float32 B_k A_k per reply, bit for bit what it always merged.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from fedlora.core.adapters import State, lora_pairs
from fedlora.core.exactsum import LIMIT, ExactSum, check_bounded, weighted_peak
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


Kept = tuple[int, float, State]  # (partition id, examples, the client's LoRA factors)


def canonical_order(clients: list[Kept]) -> list[Kept]:
    """``clients`` sorted by (partition id, examples), ties (one partition
    answered twice) by a digest of their factors' bytes: an order of what
    was kept alone, so a product over the stack does not depend on the
    order the replies arrived in. Equal digests mean equal factors, whose
    order does not matter."""
    ties = Counter((partition, weight) for partition, weight, _ in clients)

    def key(client: Kept) -> tuple:
        partition, weight, factors = client
        if ties[partition, weight] == 1:
            return partition, weight
        digest = hashlib.sha256()
        for name in sorted(factors):
            digest.update(name.encode())
            digest.update(np.ascontiguousarray(factors[name]).tobytes())
        return partition, weight, digest.digest()

    return sorted(clients, key=key)


def _check_product(a: np.ndarray, b: np.ndarray, weight: float, peak_a: float,
                   peak_b: float) -> None:
    """``OverflowError`` when ``weight`` × the float32 B·A has an entry the
    exact sums would refuse (``LIMIT``): what a streamed product sum refuses,
    so the same replies are rejected whether or not the products are
    streamed. With ``peak_a``, ``peak_b`` the factors' ``weighted_peak``,
    r·peak_a·peak_b/|w| (= r·|w|·max|A|·max|B|) bounds every entry of
    w·B·A; only when it comes near ``LIMIT`` is the product formed to decide
    exactly."""
    if weight == 0:
        return  # 0 × anything finite: nothing to refuse
    bound = a.shape[0] * peak_a * peak_b / abs(weight)
    if bound * (1 + 2.0 ** -10) < LIMIT:  # margin: the roundings of B·A and of the peaks
        return
    with np.errstate(over="ignore", invalid="ignore"):
        weighted_peak(np.matmul(b, a), weight)


class RoundSums:
    """Running example-weighted sums over one round's accepted updates.

    ``aggregate_train`` folds each reply in as soon as it is decoded and drops
    it, so the server's memory for a round is a few adapters (Σ p_k x_k of the
    uploads and of the clients' full factors), each sum an ``ExactSum`` (three
    float64 arrays), so the sums do not depend on the order the updates
    arrive in. With ``products`` on, ΔW* = Σ p_k B_k A_k of each LoRA module
    (the ideal update the residual metrics compare with) is read by ``ideal``:

    - ``streamed_products`` (a merge reads it: FlexLoRA, LoRA-FAIR): each
      reply's float32 B_k A_k is added to an exact d×k sum per module, fixed
      memory (four d×k arrays per module) but ≈ 12 vector operations per
      entry and reply (≈ 7 ms per MiniLM r=8 update);
    - otherwise each client's LoRA factors are kept (r·(d+k) float32 values
      per module: 295 KB per client for MiniLM r=8, so memory grows with the
      round's clients) and ``settle`` forms ΔW* once, as one float64 matrix
      product of the stacked factors in ``canonical_order`` (≈ 1 ms per
      update). It is not the exact sum of the float32 per-client products
      the streamed path adds, but the float64 product of the factors
      (relative error ≲ Σr·2^-53 of Σ_k p_k |B_k||A_k|), so the residual
      metrics differ from the streamed path's in their last digits.
    """

    def __init__(self, products: bool = True, streamed_products: bool = False) -> None:
        self.count = 0
        self.compute_s = 0.0  # the clients' reported training time (timing only)
        self.compute_max_s = 0.0  # the slowest client's: a parallel round's critical path
        self.fold_s = 0.0  # the server's time decoding and adding updates
        self.products = products
        self.streamed = products and streamed_products
        self._weight = ExactSum(())
        self._examples = ExactSum(())
        self._loss = ExactSum(())  # Σ examples × train loss
        self._uploads: dict[str, ExactSum] = {}
        self._factors: dict[str, ExactSum] = {}
        self._shared: set[str] | None = None  # factors whose sum is their upload's (_share)
        self._factor_names: list[str] = []
        self._ideal: dict[tuple[str, str], ExactSum] = {}  # streamed products
        self._product_arrays: dict[tuple[str, str], np.ndarray] = {}
        self._pairs: list[tuple[str, str]] = []  # the LoRA modules ΔW* is of
        self._keeps = products and not self.streamed  # clients' factors (canonical_order)
        self._clients: list[Kept] = []
        self._settled: dict[tuple[str, str], np.ndarray] = {}  # ΔW* from the kept factors

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
        pairs = lora_pairs(list(factors)) if self.products or self._keeps else []
        with np.errstate(over="ignore", invalid="ignore"):  # refused just below
            products = self._products(factors, pairs)
        peaks = {id(values): weighted_peak(values, weight)
                 for values in update.tensors.values()}
        shared = {name for name, values in update.tensors.items()
                  if weight == update.weight and factors.get(name) is values}
        by_examples = {id(values): peaks[id(values)] if name in shared
                       else weighted_peak(values, update.weight)
                       for name, values in (*factors.items(), *products.items())}
        if self.products and not self.streamed:
            for a_name, b_name in pairs:
                a, b = factors[a_name], factors[b_name]
                _check_product(a, b, update.weight, by_examples[id(a)], by_examples[id(b)])
        loss = _weighted(np.float64(update.loss), update.weight)
        check_bounded(loss)
        check_bounded(np.float64(weight))
        self._count(update, loss, weight)
        self._share(factors, shared)
        for name, values in update.tensors.items():
            _add(self._uploads, name, values, weight, peaks[id(values)])
        for name, values in factors.items():
            if name not in self._shared:
                _add(self._factors, name, values, update.weight, by_examples[id(values)])
        for pair, values in products.items():
            _add(self._ideal, pair, values, update.weight, by_examples[id(values)])
        if not self._pairs:
            self._pairs = list(pairs)
        if self._keeps:
            lora = {n: factors[n] for pair in pairs for n in pair}
            self._clients.append((update.partition_id, update.weight, lora))
            self._settled = {}

    def _share(self, factors: State, shared: set[str]) -> None:
        """Keep one sum for a factor and its upload while every update so
        far uploaded that very array with its example weight (FedAvg's
        whole adapter): the two sums would be the same, added twice. The
        first update that differs forks a copy (``ExactSum.copy``: the state
        a separate sum would have reached) before adding to either."""
        if self._shared is None:
            self._shared, self._factor_names = set(shared), list(factors)
            return
        for name in self._shared - shared:
            self._factors[name] = self._uploads[name].copy()
        self._shared &= shared

    def _products(self, factors: State, pairs: list[tuple[str, str]]
                  ) -> dict[tuple[str, str], np.ndarray]:
        """B_k A_k of each LoRA module (when the products are streamed), each
        into an array of this round's kept for the next update: at d×k per
        module they are the largest terms, and fresh arrays that size cost
        page faults on every reply (``fedlora.core.exactsum``)."""
        if not self.streamed:
            return {}
        products = {}
        for pair in pairs:
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
        sums = {n: self._uploads[n] if n in self._shared else self._factors[n]
                for n in self._factor_names}
        return {n: (v.total() / self.examples).astype(np.float32) for n, v in sums.items()}

    def settle(self) -> None:
        """Form ΔW* of every LoRA module from the kept factors (when products
        are on and not streamed), so that the round's aggregation time
        (``fedlora.federation.fold.Fold.merge``) counts it; ``ideal`` reads
        it. Nothing to do otherwise, or when it is formed already."""
        if not self.products or self.streamed or self._settled or not self._clients:
            return
        clients = canonical_order(self._clients)
        for a_name, b_name in self._pairs:
            weights = np.repeat([w for _, w, _ in clients],
                                [f[a_name].shape[0] for _, _, f in clients])
            b = np.concatenate([f[b_name] for _, _, f in clients], axis=1).astype(np.float64)
            a = np.concatenate([f[a_name] for _, _, f in clients], axis=0).astype(np.float64)
            np.multiply(b, weights, out=b)  # column j of B_k × w_k, as _weighted rounds it
            self._settled[a_name, b_name] = ((b @ a) / self.examples).astype(np.float32)

    def ideal(self, a_name: str, b_name: str) -> np.ndarray:
        """ΔW* = Σ p_k B_k A_k for one LoRA module (p_k ∝ examples; the LoRA
        scale s omitted), float32."""
        if self.streamed:
            return (self._ideal[a_name, b_name].total() / self.examples).astype(np.float32)
        self.settle()
        return self._settled[a_name, b_name]

    def residual(self, sent: State, base_step: Callable[[str], np.ndarray | None] = None
                 ) -> float:
        """‖ΔW* − (B̃Ã + base step)‖_F / ‖ΔW*‖_F over all LoRA modules
        (docs/algorithms.md §0), (Ã, B̃) being ``sent`` and ``base_step(a_name)``
        what the round folded into that module's base weight, in adapter units
        (÷ s); the LoRA scale cancels. NaN when ΔW* is zero."""
        error = norm = 0.0
        for (a_name, b_name) in self._pairs:
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
    factors on the wire do. ``stack`` orders them by ``canonical_order``, so
    the stacked bytes do not depend on arrival order; ΔW* is formed from the
    same kept factors (``settle``)."""

    def __init__(self, products: bool = True) -> None:
        super().__init__(products)
        self._keeps = True

    def stack(self, a_name: str, b_name: str) -> tuple[np.ndarray, np.ndarray]:
        """(B_stack d×Σr, A_stack Σr×k) with B_stack·A_stack = Σ p_k B_k A_k."""
        clients = canonical_order(self._clients)
        total = self.examples
        b = np.concatenate([f[b_name] for _, _, f in clients], axis=1)
        a = np.concatenate([(w / total) * f[a_name].astype(np.float64)
                            for _, w, f in clients], axis=0)
        return b.astype(np.float32), a.astype(np.float32)
