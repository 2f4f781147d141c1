"""Per-client LoRA ranks: the ``client-ranks`` key and moving factors between
a client's rank and the global one (docs/algorithms.md, "global units").

A client of rank r_k runs PEFT's scale s_k = α/r_k; the global adapter has
rank r (``lora-rank``) and scale s = α/r. A client's pair (B_k, A_k) in
global units is B_k·(s_k/s) and A_k, zero-padded to rank r: then
s·B'A' = s_k·B_k·A_k, so no ΔW changes size when ranks differ. The download
to a client goes the other way: the first r_k ranks, B rescaled by s/s_k.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fedlora.core.adapters import State, tensor_kind
from fedlora.core.config import Key, RunConfig


def _check_ranks(text: str) -> str | None:
    try:
        parse_ranks(text)
    except ValueError as err:
        return str(err)
    return None


def parse_ranks(text: str) -> tuple[int, ...]:
    """``"2,4,8"`` → (2, 4, 8); ``""`` → () (every client at ``lora-rank``)."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    try:
        ranks = tuple(int(p) for p in parts)
    except ValueError:
        raise ValueError("must be comma-separated positive integers, e.g. 2,4,8") from None
    if any(r <= 0 for r in ranks):
        raise ValueError("must be comma-separated positive integers, e.g. 2,4,8")
    return ranks


CLIENT_RANKS = Key(str, "", "per-client LoRA ranks, e.g. 2,4,8: partition i trains at the "
                   "(i mod n)-th; each at most lora-rank (the global rank); empty = all at "
                   "lora-rank", _check_ranks)


def check_client_ranks(config: RunConfig) -> str | None:
    too_big = [r for r in parse_ranks(config.client_ranks) if r > config.lora_rank]
    if too_big:
        return (f"config key 'client-ranks': rank {too_big[0]} is above lora-rank "
                f"({config.lora_rank}), the global rank")
    return None


def rank_of(config: RunConfig, partition_id: int) -> int:
    """The rank partition ``partition_id`` trains at."""
    ranks = parse_ranks(config.client_ranks)
    return ranks[partition_id % len(ranks)] if ranks else config.lora_rank


def shapes_at(shapes: Mapping[str, tuple[int, ...]], rank: int) -> dict[str, tuple[int, ...]]:
    """Adapter tensor shapes at ``rank`` (A is r×k, B is d×r; the head keeps its own)."""
    out = {}
    for name, shape in shapes.items():
        kind = tensor_kind(name)
        out[name] = ((rank, shape[1]) if kind == "lora_A" else
                     (shape[0], rank) if kind == "lora_B" else tuple(shape))
    return out


def truncate(state: State, rank: int, global_rank: int) -> State:
    """The first ``rank`` ranks of a global-rank state, in the client's units."""
    if rank == global_rank:
        return dict(state)
    ratio = np.float32(rank / global_rank)  # s/s_k = r_k/r
    out = {}
    for name, value in state.items():
        kind = tensor_kind(name)
        out[name] = (np.ascontiguousarray(value[:rank]) if kind == "lora_A" else
                     np.ascontiguousarray(value[:, :rank] * ratio) if kind == "lora_B"
                     else value)
    return out


def pad(state: State, rank: int, global_rank: int) -> State:
    """A rank-``rank`` client state in global units (zero-padded to ``global_rank``)."""
    if rank == global_rank:
        return dict(state)
    ratio = np.float32(global_rank / rank)  # s_k/s
    out = {}
    for name, value in state.items():
        kind = tensor_kind(name)
        if kind == "lora_A":
            padded = np.zeros((global_rank, value.shape[1]), np.float32)
            padded[:rank] = value
        elif kind == "lora_B":
            padded = np.zeros((value.shape[0], global_rank), np.float32)
            padded[:, :rank] = value * ratio
        else:
            padded = value
        out[name] = padded
    return out


def first_ranks(state: State, rank: int) -> State:
    """The first ``rank`` ranks of a global-units state, not rescaled (views)."""
    out = {}
    for name, value in state.items():
        kind = tensor_kind(name)
        out[name] = (value[:rank] if kind == "lora_A" else
                     value[:, :rank] if kind == "lora_B" else value)
    return out
