"""Sums whose result does not depend on the order of the terms.

Replies reach the server in whatever order the clients finish, and floating
point addition is not associative: folding the same updates in another order
changes the last bits of the average, and a few rounds later the adapter
(the reproducibility issue: same seed, same bytes). Holding a round's replies
to add them in a fixed order would break the streaming memory bound
(``fedlora.strategies.sums``), so the sum itself is made exact.

Each term is cut, exactly, into pieces on fixed binary grids: bin i holds
whole multiples of 2^(LOW + i·BIN_BITS) below 2^((i+1)·BIN_BITS) of them. A
piece has at most ``BIN_BITS`` significant bits, so a float64 bin can add
2^(53 − BIN_BITS) of them with no rounding at all; the bins are carried into
each other (exactly) before that could happen. The only rounding is the
truncation of each term below 2^LOW, which depends on the term alone, so the
total is a function of the multiset of terms. Reading the total adds the
bins, smallest first, in float64: a fixed sequence of operations on exact,
order-free values.

Cost: ``BINS`` float64 arrays per summed array (24 bytes per entry instead of
8) and about a dozen vector operations per term instead of one. Python's
``math.fsum`` is exact too, but per scalar; no maintained library offers a
streaming, vectorised, order-independent sum (ReproBLAS does, in C, without
NumPy bindings).
"""

from __future__ import annotations

import numpy as np

BIN_BITS = 40
BINS = 3
LOW = -72  # finest grid: 2^-72 (about 2e-22), far below float32's resolution
LIMIT = 2.0 ** 40  # ≈ 1.1e12: larger terms are refused, so the top bin's pieces
# have at most 32 significant bits and it stays exact for MAX_TERMS of them
_SCALES = tuple(2.0 ** (LOW + i * BIN_BITS) for i in reversed(range(BINS)))  # top first
_INVERSE = tuple(1.0 / scale for scale in _SCALES)  # powers of two: x * 1/s == x / s
_CARRY_EVERY = 2 ** (52 - BIN_BITS)  # additions a lower bin absorbs before it must carry
MAX_TERMS = 2 ** 20


class ExactSum:
    """Running sum of float arrays of one shape, exact on a 2^-72 grid.

    ``add`` refuses (``OverflowError``) a term with any entry of magnitude
    ``LIMIT`` or more, or not finite, before changing anything.

    The server adds one term per reply and LoRA module (``RoundSums``), so
    ``add`` is on every update's path: it multiplies by the grid's inverse
    (a power of two, so bit for bit the same as dividing, at half the cost),
    takes the peak from a caller that has already checked the term, and cuts
    a term it may consume in place instead of copying it."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = tuple(shape)
        self._bins = [np.zeros(self.shape, np.float64) for _ in _SCALES]
        self._since_carry = 0
        self.count = 0

    def add(self, term: np.ndarray, peak: float | None = None,
            consume: bool = False) -> None:
        """Add ``term``. ``peak``: what ``check_bounded(term)`` returned to the
        caller (checked here otherwise); ``consume``: the caller no longer
        needs a float64 ``term``, which is then cut in place."""
        owned = consume and isinstance(term, np.ndarray) and term.dtype == np.float64
        rest = term if owned else np.array(term, dtype=np.float64)  # cut in place below
        if rest.shape != self.shape:
            raise ValueError(f"shape {rest.shape}, expected {self.shape}")
        if peak is None:
            peak = check_bounded(rest)
        if self.count >= MAX_TERMS:
            raise OverflowError(f"more than {MAX_TERMS} terms in one sum")
        piece = np.empty_like(rest)
        for total, scale, inverse in zip(self._bins, _SCALES, _INVERSE):
            if peak < scale:
                continue  # no whole multiple of this grid in the term: a zero piece
            np.multiply(rest, inverse, out=piece)  # exact: a power of two
            np.trunc(piece, out=piece)
            piece *= scale  # the multiples of ``scale`` in rest, exactly
            if scale != _SCALES[-1]:  # below the finest grid nothing is kept
                rest -= piece  # exact: the bits below ``scale``
            total += piece
        self.count += 1
        self._since_carry += 1
        if self._since_carry >= _CARRY_EVERY:
            self._carry()

    def _carry(self) -> None:
        """Move each bin's whole multiples of the next coarser grid up (exact)."""
        for coarse, fine, scale in zip(self._bins, self._bins[1:], _SCALES):
            moved = np.trunc(fine / scale) * scale
            fine -= moved
            coarse += moved
        self._since_carry = 0

    def total(self) -> np.ndarray:
        """The sum as float64: the bins added smallest first."""
        out = self._bins[-1].copy()
        for total in reversed(self._bins[:-1]):
            out += total
        return out


def check_bounded(values: np.ndarray) -> float:
    """The largest magnitude in ``values``; ``OverflowError`` unless every entry
    is finite and below ``LIMIT``."""
    peak = float(np.max(np.abs(values))) if values.size else 0.0
    if not peak < LIMIT:  # NaN compares False: refused too
        raise OverflowError(f"a value of magnitude >= {LIMIT:.3g} or not finite")
    return peak
