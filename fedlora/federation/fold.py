"""The fold pipeline: a round's accepted updates → its sums → the next global.

Steps, each around the strategy's own hooks (``fedlora.strategies.base``):

1. **Global units.** Each update is read as the client's full factors at the
   global rank (``client_factors``), its upload padded likewise.
2. **Robust screening** (``robust`` ≠ none, ``fedlora.strategies.robust``):
   the round is held whole, screened, and what is kept (and perhaps
   changed, made consistent by ``upload_of``) goes on. Otherwise each update
   is folded as it arrives and dropped.
3. **Fold** into the round's sums, by the strategy's ``new_sums``/``fold``,
   or by ``CentralDP`` wrapped around them (``dp=central``), as Flower's
   ``DifferentialPrivacyServerSideFixedClipping`` wraps a strategy. An update
   too large to add exactly (``fedlora.core.exactsum``) is rejected.
4. **Checked merge**: the strategy's ``merge`` and ``base_change``; when
   they fail numerically or give something not finite, the strategy's state
   is restored (``state_dict``) and the round changes nothing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import replace

import numpy as np

from fedlora.core.adapters import State
from fedlora.learning.privacy import CentralPrivacy
from fedlora.strategies.base import LoraStrategy
from fedlora.strategies.robust import Candidate, RobustAggregation
from fedlora.strategies.sums import ClientUpdate, ClippedRoundSums, RoundSums
from fedlora.wire.basedelta import Increment, base_weight_name

LOGGER = logging.getLogger(__name__)
Reject = Callable[[int, str], None]  # (node id, reason): logs and counts one rejection


class CentralDP:
    """Central DP around a strategy's fold: the round's sums clip each
    client's change to what it was sent and weigh clients equally, and their
    ``mean`` is the noisy average (``ClippedRoundSums``), so the strategy's
    ``fold`` and ``merge`` run unchanged on it."""

    def __init__(self, strategy: LoraStrategy, privacy: CentralPrivacy) -> None:
        self.strategy, self.privacy = strategy, privacy

    def new_sums(self) -> RoundSums:
        strategy = self.strategy
        return ClippedRoundSums(self.privacy, strategy.sent, strategy.upload_shapes,
                                strategy.upload_of)

    def fold(self, sums: RoundSums, update: ClientUpdate, factors: State) -> None:
        self.strategy.fold(sums, update, factors)


class Fold:
    """One run's fold pipeline around its strategy."""

    def __init__(self, strategy: LoraStrategy) -> None:
        config = strategy.config
        self.strategy = strategy
        self.central = CentralPrivacy(config) if config.dp == "central" else None
        self.robust = RobustAggregation(config) if config.robust != "none" else None
        self._folder = (CentralDP(strategy, self.central) if self.central is not None
                        else strategy)

    def new_sums(self) -> RoundSums:
        """Empty round sums of the kind this run folds updates into."""
        return self._folder.new_sums()

    def in_global_units(self, update: ClientUpdate) -> Candidate:
        """The update with its tensors at the global rank, and the client's
        full factors: a reply of another rank, padded (``ranks.pad``)."""
        factors = self.strategy.client_factors(update)
        if update.rank != self.strategy.global_rank:
            update = replace(update, tensors={n: factors[n] for n in update.tensors})
        return Candidate(update, factors)

    def rebuild(self, update: ClientUpdate, factors: State) -> Candidate:
        """An update in global units whose client ended at ``factors`` (a
        robust mode's changed factors): its upload made consistent with them."""
        return Candidate(replace(update, tensors=self.strategy.upload_of(factors)), factors)

    def sums(self, updates: Iterable[ClientUpdate]) -> RoundSums:
        """``updates`` folded into fresh round sums, unscreened, none refused."""
        sums = self.new_sums()
        for update in updates:
            candidate = self.in_global_units(update)
            self._folder.fold(sums, candidate.update, candidate.factors)
        return sums

    def run(self, updates: Iterable[ClientUpdate], reject: Reject) -> tuple[RoundSums,
                                                                            int | None]:
        """(the round's sums over ``updates``, the clients a robust mode
        clipped: None without one), rejecting what cannot be folded."""
        sums = self.new_sums()
        if self.robust is not None:
            return sums, self._screened(updates, sums, reject)
        for update in updates:
            started = time.perf_counter()
            self._checked_fold(sums, self.in_global_units(update), reject)
            sums.fold_s += time.perf_counter() - started
        return sums, None

    def _checked_fold(self, sums: RoundSums, candidate: Candidate, reject: Reject) -> None:
        try:
            self._folder.fold(sums, candidate.update, candidate.factors)
        except OverflowError as err:
            reject(candidate.update.node_id, str(err))

    def _screened(self, updates: Iterable[ClientUpdate], sums: RoundSums,
                  reject: Reject) -> int:
        """The whole round held, screened by the robust mode, then folded."""
        candidates = [self.in_global_units(update) for update in updates]
        started = time.perf_counter()
        screened = self.robust.screen(candidates, self.strategy.sent,
                                      list(self.strategy.upload_shapes), self.rebuild)
        for candidate, reason in screened.excluded:
            reject(candidate.update.node_id, reason)
        for candidate in screened.kept:
            self._checked_fold(sums, candidate, reject)
        sums.fold_s += time.perf_counter() - started
        return screened.clipped

    def merge(self, server_round: int, sums: RoundSums,
              changes_base: bool) -> tuple[State, Increment | None] | None:
        """(``merge``, ``base_change``), or None (logged, strategy state as
        before) when they fail numerically or give something not finite: a
        bad round leaves the global adapter and base unchanged instead of
        crashing or poisoning them. The sums' deferred ΔW* is formed first
        (``RoundSums.settle``), so the round's ``aggregate_s`` counts it."""
        strategy = self.strategy
        before = strategy.state_dict()
        sums.settle()
        try:
            merged = strategy.merge(sums)
            increment = strategy.base_change(sums, merged) if changes_base else None
            values = [*merged.items(), *((f"base change of {m}", f) for m, pair in
                                          (increment or {}).items() for f in pair)]
            problem = next((f"merged {name} is not finite" for name, value in values
                            if not np.all(np.isfinite(value))), None)
        except (ArithmeticError, np.linalg.LinAlgError) as err:
            problem = f"merge failed ({type(err).__name__}: {err})"
        if problem is None:
            return merged, increment
        LOGGER.warning("round %d: %s: global adapter unchanged", server_round, problem)
        strategy.load_state_dict(before)
        return None


def base_step(increment: Increment | None, scale: float):
    """For the residual: what ``increment`` added to a module's weight, in
    adapter units (÷ s), by lora_A name; None without an increment."""
    if not increment:
        return None

    def step(a_name: str) -> np.ndarray | None:
        factors = increment.get(base_weight_name(a_name))
        if factors is None:
            return None
        return factors[0].astype(np.float64) @ factors[1] / scale

    return step
