"""Global top-k sparsification of a set of named tensors.

One magnitude threshold over all tensors flattened together (as FLASC does),
not per tensor: the budget goes to wherever the largest entries are.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fedlora.wire.codec import SparseTensor


def top_k(tensors: Mapping[str, np.ndarray], density: float) -> dict[str, SparseTensor]:
    """Keep the ``round(density · n)`` largest-magnitude entries (at least one)
    of all ``n`` entries together; ties are broken arbitrarily."""
    names = list(tensors)
    flat = np.concatenate([np.abs(np.asarray(tensors[n], np.float32)).ravel() for n in names])
    keep = min(flat.size, max(1, int(round(density * flat.size))))
    chosen = np.zeros(flat.size, dtype=bool)
    chosen[np.argpartition(flat, flat.size - keep)[flat.size - keep:]] = True
    out, offset = {}, 0
    for name in names:
        values = np.asarray(tensors[name], np.float32)
        mask = chosen[offset:offset + values.size]
        indices = np.flatnonzero(mask).astype(np.int64)
        out[name] = SparseTensor(values.shape, indices, values.ravel()[indices])
        offset += values.size
    return out
