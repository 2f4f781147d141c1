"""Adapter snapshots every ``save-every`` rounds: ``<run>/snapshots/round-<t>/``.

A long LLM run is judged by more than its last round (an earlier round may
generate better), and a run that crashes keeps what it had. Each snapshot
is what a finished run leaves (``adapter/``, PEFT ``save_pretrained``, and
the base change ``base_delta.safetensors`` for strategies that make one), so
``fedlora export RUN --round t`` and ``generate --round t`` read it the same
way. It is written under a temporary name and renamed: a snapshot directory
is whole or absent. A round run again after a resume writes the same bytes
over it (same seed, same state).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from fedlora.core.adapters import State, load_adapter_state
from fedlora.wire.basedelta import BASE_DELTA_FILE, save_base_delta

SNAPSHOTS = "snapshots"


def snapshot_dir(run_dir: Path, server_round: int) -> Path:
    return Path(run_dir) / SNAPSHOTS / f"round-{server_round}"


def due(save_every: int, server_round: int) -> bool:
    return save_every > 0 and server_round % save_every == 0


def save(run_dir: Path, server_round: int, peft_model, adapter: State,
         base_change: Mapping[str, np.ndarray] | None) -> Path:
    """Snapshot ``adapter`` (loaded into ``peft_model`` to be saved the PEFT
    way) and ``base_change`` (None: the strategy changes no base weight)."""
    final = snapshot_dir(run_dir, server_round)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp")
    old = final.with_name(f".{final.name}.old")
    for leftover in (tmp, old):
        shutil.rmtree(leftover, ignore_errors=True)
    load_adapter_state(peft_model, adapter)
    try:
        peft_model.save_pretrained(str(tmp / "adapter"))
        if base_change is not None:
            save_base_delta(tmp / BASE_DELTA_FILE, base_change)
        if final.exists():  # the round ran before a resume: replace it whole
            os.replace(final, old)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return final
