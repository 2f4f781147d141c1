"""The server's checkpoint: everything a run needs to go on after a round.

Written after every round (``save``) as ``<run dir>/checkpoint.fedlora``:
the round, the run's id and lineage (which server attempt ran which round:
``fedlora.node.client_state``), the global adapter, the strategy's ``state_dict``
(CELLM's Adam moments, FLoRA's merge count), the base-weight increments
(FLoRA, FedEx-LoRA: the ledger replays them), the ε each local-DP client
reported, the central-DP accountant's history (which also keys the next
noise draw), and the wall-clock seconds spent so far. All but the run's id,
lineage and wall time are the server round's ``state_dict``
(``fedlora.federation.round``). What is *not* in it, and why:

* the sampler: which clients a round asks is a function of (seed, round)
  alone (``fedlora.core.seeding``), so the round is its whole state;
* the clients' own state: each client keeps it in its store
  (``fedlora.node.client_state``), versioned by round so that what a client
  saved in a round the crash cut short is never read;
* which base version each node holds: node ids change when a run resumes,
  so every node is sent the changes from version 0 once (the same float32
  sums in the same order: the same bytes).

Format: a magic line, the SHA-256 of the body, then the body, a safetensors
file (no pickle: a checkpoint is data, never code) whose metadata holds the
scalars as JSON. It is written to a temporary file, flushed to disk and
renamed over the previous one, so a crash leaves the previous checkpoint
whole; a truncated or altered file fails its checksum and is refused by name.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as load_tensors
from safetensors.numpy import save as save_tensors

from fedlora.core.adapters import State
from fedlora.core.config import ConfigError
from fedlora.wire.basedelta import Increment

CHECKPOINT_FILE = "checkpoint.fedlora"
MAGIC = b"fedlora-checkpoint 1\n"
_DIGEST = 64  # hex characters of SHA-256, then a newline


@dataclass
class Checkpoint:
    """The server's state after ``round`` complete rounds."""

    round: int
    run_id: str
    lineage: str  # which server attempt ran which rounds (fedlora.node.client_state.Lineage)
    adapter: State
    strategy: dict[str, np.ndarray] = field(default_factory=dict)
    base_log: list[Increment] = field(default_factory=list)
    epsilons: dict[int, float] = field(default_factory=dict)  # by partition (local DP)
    central_history: list[tuple[float, float, int]] = field(default_factory=list)
    wall_seconds: float = 0.0

    def server_state(self) -> dict:
        """The fields that are the server round's state (``ServerRound.load_state_dict``)."""
        return {name: getattr(self, name) for name in SERVER_STATE}


# what ``ServerRound.state_dict`` gives; the run's id, lineage and wall time are the loop's
SERVER_STATE = ("round", "adapter", "strategy", "base_log", "epsilons", "central_history")


def _tensors(checkpoint: Checkpoint) -> dict[str, np.ndarray]:
    tensors = {f"adapter/{n}": v for n, v in checkpoint.adapter.items()}
    tensors.update({f"strategy/{n}": np.asarray(v) for n, v in checkpoint.strategy.items()})
    for version, increment in enumerate(checkpoint.base_log, start=1):
        for module, (left, right) in increment.items():
            tensors[f"base/{version}/{module}/left"] = left
            tensors[f"base/{version}/{module}/right"] = right
    # np.require, not ascontiguousarray: that one turns a 0-d array (a step count) into 1-d
    return {n: np.require(v, requirements="C") for n, v in tensors.items()}


def encode(checkpoint: Checkpoint) -> bytes:
    metadata = {"round": str(checkpoint.round), "run_id": checkpoint.run_id,
                "lineage": checkpoint.lineage,
                "base_versions": str(len(checkpoint.base_log)),
                "epsilons": json.dumps({str(k): v for k, v in checkpoint.epsilons.items()}),
                "central_history": json.dumps(checkpoint.central_history),
                "wall_seconds": repr(checkpoint.wall_seconds)}
    body = save_tensors(_tensors(checkpoint), metadata=metadata)
    return MAGIC + hashlib.sha256(body).hexdigest().encode() + b"\n" + body


def decode(blob: bytes, path: Path) -> Checkpoint:
    """The checkpoint in ``blob`` (read from ``path``); ConfigError naming the
    file when it is not a whole, unaltered checkpoint."""
    def refuse(why: str) -> ConfigError:
        return ConfigError(f"checkpoint {path}: {why}; it was not loaded (resume needs "
                           "the last good checkpoint, or start the run again)")

    if not blob.startswith(MAGIC):
        raise refuse("not a fedlora checkpoint")
    start = len(MAGIC) + _DIGEST + 1
    digest, body = blob[len(MAGIC):start - 1], blob[start:]
    if hashlib.sha256(body).hexdigest().encode() != digest:
        raise refuse("checksum mismatch (truncated or altered)")
    try:
        tensors = load_tensors(body)
        metadata = _metadata(body)  # load() does not return the metadata
        checkpoint = Checkpoint(
            round=int(metadata["round"]), run_id=metadata["run_id"],
            lineage=metadata["lineage"],
            adapter={n.removeprefix("adapter/"): v for n, v in tensors.items()
                     if n.startswith("adapter/")},
            strategy={n.removeprefix("strategy/"): v for n, v in tensors.items()
                      if n.startswith("strategy/")},
            epsilons={int(k): float(v) for k, v in json.loads(metadata["epsilons"]).items()},
            central_history=[(float(n), float(q), int(s)) for n, q, s in
                             json.loads(metadata["central_history"])],
            wall_seconds=float(metadata["wall_seconds"]))
        versions = int(metadata["base_versions"])
    except (KeyError, TypeError, ValueError, SafetensorError) as err:  # checksum right,
        # content not ours
        raise refuse(f"unreadable content ({err})") from None
    checkpoint.base_log = [{} for _ in range(versions)]
    for name, value in tensors.items():
        if name.startswith("base/"):
            version, rest = name.removeprefix("base/").split("/", 1)
            module, side = rest.rsplit("/", 1)
            pair = checkpoint.base_log[int(version) - 1].setdefault(module, [None, None])
            pair[side == "right"] = value
    checkpoint.base_log = [{m: (pair[0], pair[1]) for m, pair in increment.items()}
                           for increment in checkpoint.base_log]
    return checkpoint


def _metadata(body: bytes) -> dict[str, str]:
    """The safetensors header's ``__metadata__`` (the first 8 bytes give its length)."""
    size = int.from_bytes(body[:8], "little")
    return json.loads(body[8:8 + size])["__metadata__"]


def save(out_dir: Path, checkpoint: Checkpoint) -> Path:
    """Write the checkpoint atomically (temporary file, fsync, rename, fsync
    of the directory) and return its path."""
    final, tmp = out_dir / CHECKPOINT_FILE, out_dir / f".{CHECKPOINT_FILE}.tmp"
    with open(tmp, "wb") as handle:
        handle.write(encode(checkpoint))
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, final)
    directory = os.open(out_dir, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    return final


def load(out_dir: Path) -> Checkpoint | None:
    """The run's last checkpoint; None when it has none (stopped in round 1)."""
    path = out_dir / CHECKPOINT_FILE
    if not path.is_file():
        return None
    return decode(path.read_bytes(), path)
