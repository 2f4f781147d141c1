"""Robust aggregation: a round's updates screened together before they are folded.

The default path (``robust = none``) folds each reply as it arrives
(``fedlora.strategies.sums``). A robust mode needs the whole round at once:
the server holds every accepted update until the round's replies are in —
one full adapter per client in global units (float32), i.e. memory grows
with the number of clients, plus, for ``krum``, an n×n distance matrix and
one n×d stack of the changes. Then it screens them and folds what is left
through the strategy's usual ``fold``, so every strategy's ``merge`` (and
LoRA-FAIR's products, FLoRA's stacks) runs unchanged on the screened round.

The space: each client's **change** c_k = (its factors in global units) −
(the global adapter the round sent), over the tensors the strategy's clients
upload: A, B and the head for FedAvg-like strategies, B and the head for
FFA-LoRA, A (and the head) for FedSA-LoRA, and −δ_k (the sparse delta,
densified) for CELLM, whose factors are sent − δ_k.

Heterogeneous ranks (HetLoRA, FlexLoRA, FLoRA with ``client-ranks``): a
client of rank r_k < r is judged only on the ranks it was sent. Its change is
0 on the others (it neither pushed nor pulled them), not "0 − sent" as its
zero-padded factors would say, so no client looks like an outlier, drags
the median norm or outvotes a coordinate because of its rank. After the
screening its unsent ranks are filled from what was sent instead of zeros:
its product is then s·BA plus its own step, s_k·B_kA_k − s·B_{:r_k}A_{:r_k}
(the product it contributes), and every strategy's merge sees a round in
which ranks compare. This departs, under a robust mode only, from HetLoRA's
and FlexLoRA's zero-padding (which pulls the ranks a client was not sent
toward 0 by its share); HetLoRA's weight S_k is still the norm of the
client's own ranks. ``robust = none`` keeps the papers' rules.

Every mode first caps each client's claimed weight at ω × the round's median
claim (ω = ``robust-weight-factor``, 3: a client cannot buy influence by
claiming more examples; honest claims above the cap are cut too, so keep the
factor above the honest spread). Then, with the bound each mode gives on the
global's move when fewer than the mode tolerates are hostile ("honest step":
an honest client's c_k; tests/strategies/test_robust.py checks each, for
uniform and for mixed ranks 2,4,8):

* ``norm-bound`` (Sun et al., 2019): c_k scaled down to at most
  τ = ρ × the round's median ‖c‖ (ρ = ``robust-norm-factor``, 3). Bound: the
  global moves by a weighted mean of clipped changes, so by at most τ; with
  a minority hostile the median is at most the honest norm of order
  ⌊n/2⌋+1, so τ ≈ 3 × the median honest step. One client's own pull is its
  capped weight share × its clipped change, under τ (with four equal honest
  claims: ≤ 3/7 × τ ≈ 1.3 × the median honest step).
* ``median`` (Yin et al., 2018): the coordinate-wise median of the c_k
  (Flower's ``aggregate_median``). Bound: with fewer than n/2 hostile, every
  coordinate of the move lies within the honest changes' range of it.
* ``trimmed-mean`` (Yin et al., 2018): per coordinate, the b = ⌈β·n⌉ largest
  and smallest values dropped (β = ``robust-fraction``; at most (n−1)/2 each
  side) and the rest averaged. Flower's ``aggregate_trimmed_avg`` floors β·n,
  which trims nobody from a small round, hence our own few lines. Bound:
  with at most b hostile, as the median's.
* ``krum`` (Multi-Krum, Blanchard et al., 2017): f = b clients assumed
  hostile; the n − f whose changes have the smallest sum of squared distances
  to their n − f − 2 nearest others are kept (Flower's ``select_multikrum``),
  the rest excluded. Bound: a weighted mean of the kept changes, i.e. within
  the honest changes' hull (no longer than the longest honest step) whenever
  the hostile are excluded; one is kept only if its change is among the n − f
  most central. A config whose f is 0 (clients-per-round < 3, or β = 0)
  screens nobody and is refused (``fedlora.core.config``).

These bounds are on the changes the strategy's merge folds (factor space);
for averaging strategies (FedAvg, FFA, FedSA, HetLoRA, CELLM) that is the
global's move. Strategies that merge products (FlexLoRA, FLoRA, FedEx,
LoRA-FAIR) move ΔW by the merged round's mean product step, a function of
the same screened changes; the tests check the ΔW move against the honest
ΔW steps (norm-bound: ≤ 3 × their median; the others: ≤ the longest).

Median and trimmed mean make one robust change ĉ; every client's update is
replaced by sent + ĉ (keeping its weight and loss), so the strategy's merge
sees a round whose clients all agree on ĉ and its result is sent + ĉ for
averaging strategies. The screening reads the updates in partition order,
so the result does not depend on the order replies arrived in.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict
from flwr.server.strategy.aggregate import aggregate_median
from flwr.serverapp.strategy.multikrum import select_multikrum

from fedlora.core.adapters import State, tensor_kind
from fedlora.core.config import RunConfig, hostile_count
from fedlora.strategies.sums import ClientUpdate


@dataclass(frozen=True)
class Candidate:
    """One accepted update in global units, with the factors it implies."""

    update: ClientUpdate
    factors: State


@dataclass
class Screened:
    """What a robust mode made of a round."""

    kept: list[Candidate]
    clipped: int  # clients whose weight or change was cut
    excluded: list[tuple[Candidate, str]]  # clients left out, with the reason


Rebuild = Callable[[ClientUpdate, State], Candidate]  # (update, new factors) → candidate


class RobustAggregation:
    """One robust mode of a run, applied to each round's candidates."""

    def __init__(self, config: RunConfig) -> None:
        self.mode = config.robust
        self.norm_factor = config.robust_norm_factor
        self.weight_factor = config.robust_weight_factor
        self.fraction = config.robust_fraction
        self.global_rank = config.lora_rank

    def screen(self, candidates: Sequence[Candidate], sent: State, names: Sequence[str],
               rebuild: Rebuild) -> Screened:
        """The round's candidates after this mode; ``sent`` is the global
        adapter of the round (global units), ``names`` the tensors clients
        upload, ``rebuild`` makes a candidate from an update and new factors
        (the strategy's ``upload_of`` keeps update and factors consistent)."""
        ordered = sorted(candidates, key=lambda c: (c.update.partition_id, c.update.node_id))
        if not ordered:
            return Screened([], 0, [])
        ordered, capped = _cap_weights(ordered, self.weight_factor)
        changes = [_change(c.factors, sent, names, c.update.rank) for c in ordered]
        ordered = [self._filled(c, sent, rebuild) for c in ordered]
        if self.mode == "norm-bound":
            kept, clipped = self._norm_bound(ordered, changes, sent, names, rebuild)
            return Screened(kept, len(capped | clipped), [])
        if self.mode == "krum":
            return self._krum(ordered, changes, capped)
        robust = (_median(changes) if self.mode == "median"
                  else _trimmed_mean(changes, hostile_count(self.fraction, len(ordered))))
        factors = {**sent, **{n: (sent[n] + robust[i]).astype(np.float32)
                              for i, n in enumerate(names)}}
        agreed = [rebuild(c.update, factors) for c in ordered]
        return Screened(agreed, len(capped), [])

    def _filled(self, candidate: Candidate, sent: State, rebuild: Rebuild) -> Candidate:
        """A client of a lower rank with the ranks it was not sent left as
        sent (no change) instead of zero-padded: its product is then the
        global's plus its own step, s·B''A'' = s·BA + (s_k·B_kA_k − s·B_:r A_:r)."""
        if candidate.update.rank >= self.global_rank:
            return candidate
        factors = dict(candidate.factors)
        for name, value in candidate.factors.items():
            unsent = _unsent(name, candidate.update.rank, value.shape)
            if unsent is not None:
                factors[name] = value.copy()
                factors[name][unsent] = sent[name][unsent]
        return rebuild(candidate.update, factors)

    def _norm_bound(self, ordered, changes, sent, names, rebuild
                    ) -> tuple[list[Candidate], set[int]]:
        norms = [_norm(change) for change in changes]
        bound = self.norm_factor * float(np.median(norms))
        kept, clipped = [], set()
        for i, (candidate, change, norm) in enumerate(zip(ordered, changes, norms)):
            if norm > bound:
                shrink = bound / norm
                factors = {**candidate.factors, **{
                    n: (sent[n] + shrink * part).astype(np.float32)
                    for n, part in zip(names, change)}}
                candidate = rebuild(candidate.update, factors)
                clipped.add(i)
            kept.append(candidate)
        return kept, clipped

    def _krum(self, ordered, changes, capped: set[int]) -> Screened:
        hostile = hostile_count(self.fraction, len(ordered))
        records = [RecordDict({"change": ArrayRecord(
            {str(j): Array(np.ascontiguousarray(part)) for j, part in enumerate(change)})})
            for change in changes]
        selected = {id(r) for r in select_multikrum(records, hostile, len(ordered) - hostile)}
        kept = [c for c, r in zip(ordered, records) if id(r) in selected]
        excluded = [(c, f"excluded by krum (f={hostile}; partition {c.update.partition_id})")
                    for c, r in zip(ordered, records) if id(r) not in selected]
        clipped = sum(1 for i, r in enumerate(records) if i in capped and id(r) in selected)
        return Screened(kept, clipped, excluded)


def _cap_weights(ordered: list[Candidate], factor: float
                 ) -> tuple[list[Candidate], set[int]]:
    """Claims above ``factor`` × the median claim cut to it (and which were)."""
    cap = factor * float(np.median([c.update.weight for c in ordered]))
    capped, out = set(), []
    for i, candidate in enumerate(ordered):
        if candidate.update.weight > cap:
            candidate = Candidate(replace(candidate.update, weight=cap), candidate.factors)
            capped.add(i)
        out.append(candidate)
    return out, capped


def _unsent(name: str, rank: int, shape: tuple[int, ...]) -> tuple[slice, slice] | None:
    """The part of global-rank tensor ``name`` a rank-``rank`` client was not
    sent (rows of A, columns of B from ``rank`` on), None when it was sent all."""
    kind = tensor_kind(name)
    if kind == "lora_A" and rank < shape[0]:
        return slice(rank, None), slice(None)
    if kind == "lora_B" and rank < shape[1]:
        return slice(None), slice(rank, None)
    return None


def _change(factors: State, sent: State, names: Sequence[str], rank: int
            ) -> list[np.ndarray]:
    """A client's change on what it was sent; 0 on the ranks it was not sent."""
    change = []
    for name in names:
        part = factors[name].astype(np.float64) - sent[name]
        unsent = _unsent(name, rank, part.shape)
        if unsent is not None:
            part[unsent] = 0.0
        change.append(part)
    return change


def _norm(change: Sequence[np.ndarray]) -> float:
    return math.sqrt(sum(float(np.sum(np.square(part))) for part in change))


def _median(changes: Sequence[list[np.ndarray]]) -> list[np.ndarray]:
    return aggregate_median([(change, 1) for change in changes])


def _trimmed_mean(changes: Sequence[list[np.ndarray]], cut: int) -> list[np.ndarray]:
    """Per coordinate, the mean without the ``cut`` largest and smallest values."""
    out = []
    for layer in zip(*changes, strict=True):
        stacked = np.sort(np.stack(layer), axis=0)
        out.append(stacked[cut:len(layer) - cut].mean(axis=0))
    return out

