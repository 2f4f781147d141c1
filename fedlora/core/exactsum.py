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

import threading

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
CHUNK = 2 ** 15  # entries cut at a time (256 KiB per scratch array)


class ExactSum:
    """Running sum of float arrays of one shape, exact on a 2^-72 grid.

    ``add`` and ``add_weighted`` refuse (``OverflowError``) a term with any
    entry of magnitude ``LIMIT`` or more, or not finite, before changing
    anything.

    The server adds one term per reply and tensor (``RoundSums``), so this is
    on every update's path, and for streamed product sums (one d×k matrix per
    LoRA module: FlexLoRA's and LoRA-FAIR's ΔW*) it is most of the server's
    time per update (the ``agg_residual`` diagnostic alone forms ΔW* from
    kept factors instead: ``fedlora.strategies.sums``). A term is therefore
    cut ``CHUNK`` entries at a time, in two scratch arrays of that size kept
    per thread (``_scratch``): the scratch and the bins' slices stay in a
    core's cache through the dozen operations, where whole megabyte-sized
    temporaries went out to memory (and fresh ones cost page faults). The
    operations are elementwise, so the chunking changes no bit. The grid's
    inverse is a power of two, so multiplying by it is bit for bit dividing,
    at half the cost."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = tuple(shape)
        self._bins = [np.zeros(self.shape, np.float64) for _ in _SCALES]
        self._since_carry = 0
        self.count = 0

    def copy(self) -> ExactSum:
        """An independent sum in the very state this one is in (bins, carry
        count): adding the same terms to both keeps them bit for bit equal."""
        other = ExactSum(self.shape)
        other._bins = [total.copy() for total in self._bins]
        other._since_carry, other.count = self._since_carry, self.count
        return other

    def add(self, term: np.ndarray | float) -> None:
        """Add ``term`` (converted to float64, exactly)."""
        self.add_weighted(term, 1.0)  # × 1.0 is exact

    def add_weighted(self, values: np.ndarray | float, weight: float,
                     peak: float | None = None) -> None:
        """Add ``weight × values``, the product rounded to float64 (as
        ``np.multiply(values, weight, dtype=np.float64)`` rounds it). ``peak``:
        what ``weighted_peak(values, weight)`` returned to a caller that checks
        all its terms before adding any."""
        values = np.asarray(values)
        if values.shape != self.shape:
            raise ValueError(f"shape {values.shape}, expected {self.shape}")
        if peak is None:
            peak = weighted_peak(values, weight)
        if self.count >= MAX_TERMS:
            raise OverflowError(f"more than {MAX_TERMS} terms in one sum")
        flat = values.reshape(-1)
        bins = [(total.reshape(-1), scale, inverse)
                for total, scale, inverse in zip(self._bins, _SCALES, _INVERSE)
                if peak >= scale]  # below: no whole multiple of the grid, a zero piece
        rest_scratch, piece_scratch = _scratch()
        for start in range(0, flat.size, CHUNK):
            stop = min(start + CHUNK, flat.size)
            rest, piece = rest_scratch[:stop - start], piece_scratch[:stop - start]
            np.multiply(flat[start:stop], weight, out=rest, dtype=np.float64)
            for total, scale, inverse in bins:
                np.multiply(rest, inverse, out=piece)  # exact: a power of two
                np.trunc(piece, out=piece)
                np.multiply(piece, scale, out=piece)  # the multiples of ``scale`` in rest
                if scale != _SCALES[-1]:  # below the finest grid nothing is kept
                    np.subtract(rest, piece, out=rest)  # exact: the bits below ``scale``
                part = total[start:stop]
                np.add(part, piece, out=part)
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


_SCRATCH = threading.local()


def _scratch() -> tuple[np.ndarray, np.ndarray]:
    """This thread's two float64 scratch arrays of ``CHUNK`` entries."""
    arrays = getattr(_SCRATCH, "arrays", None)
    if arrays is None:
        arrays = _SCRATCH.arrays = (np.empty(CHUNK, np.float64), np.empty(CHUNK, np.float64))
    return arrays


def check_bounded(values: np.ndarray | float) -> float:
    """The largest magnitude in ``values``; ``OverflowError`` unless every entry
    is finite and below ``LIMIT``."""
    return weighted_peak(values, 1.0)


def weighted_peak(values: np.ndarray | float, weight: float) -> float:
    """The largest magnitude in ``weight × values`` as ``add_weighted`` rounds
    it, without forming the product: rounding is monotonic, so that is
    |weight| × the largest magnitude in ``values``, rounded once (NumPy's max
    and min both propagate a NaN). ``OverflowError`` unless it is finite and
    below ``LIMIT``."""
    values = np.asarray(values)
    high, low = (float(values.max()), float(values.min())) if values.size else (0.0, 0.0)
    peak = abs(float(weight)) * max(abs(high), abs(low))
    if not peak < LIMIT:  # NaN compares False: refused too
        raise OverflowError(f"a value of magnitude >= {LIMIT:.3g} or not finite")
    return peak
