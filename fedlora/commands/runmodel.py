"""A run's trained model, loaded from its directory as any downstream user
would (``PeftModel.from_pretrained`` on the base, the base change added
first): for ``fedlora export`` and ``fedlora generate``.

``round`` picks a snapshot (``save-every``: ``RUN/snapshots/round-<t>/``)
instead of the run's final adapter; a snapshot of a run still going (or
stopped) loads too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedlora.core.config import ConfigError, RunConfig
from fedlora.core.fields import Summary


def adapter_source(run_dir: Path, round_: int | None) -> Path:
    """The directory holding ``adapter/`` (and ``base_delta.safetensors``
    where the strategy changed the base): the run's own, or a snapshot's."""
    from fedlora.federation.snapshots import snapshot_dir

    if not (run_dir / "config.json").is_file():
        raise ConfigError(f"{run_dir}: not a run directory (no config.json)")
    if round_ is None:
        if not (run_dir / "summary.json").is_file():
            raise ConfigError(f"{run_dir}: not a finished run (no summary.json); name a "
                              "snapshot with --round")
        return run_dir
    source = snapshot_dir(run_dir, round_)
    if not (source / "adapter" / "adapter_config.json").is_file():
        kept = sorted(p.name for p in source.parent.glob("round-*")) if \
            source.parent.is_dir() else []
        raise ConfigError(f"{run_dir}: no snapshot of round {round_} (snapshots: "
                          f"{', '.join(kept) or 'none; see save-every'})")
    return source


def load_run_model(run_dir: str | Path, round_: int | None = None,
                   **overrides: Any) -> tuple[RunConfig, Any]:
    """(the run's config, its trained ``LoraModel``); ``overrides`` replace
    config keys that change how the model is held, not what it is
    (``quantization=none`` for a merge)."""
    from fedlora.learning.features import splits_for
    from fedlora.learning.models import ModelSpec, load_trained
    from fedlora.runtime import quiet
    from fedlora.strategies import resolve
    from fedlora.wire.basedelta import BASE_DELTA_FILE

    quiet.libraries()
    run_dir = Path(run_dir).expanduser().resolve()
    source = adapter_source(run_dir, round_)
    config = resolve({**json.loads((run_dir / "config.json").read_text()), **overrides})
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    # the classes the adapter was trained on, as `fedlora evaluate` finds them
    # (none for an sft run on free text: an empty list, not a missing one)
    classes = summary[Summary.LABEL_NAMES] if summary.get(Summary.LABEL_NAMES) is not None \
        else splits_for(config).label_names
    base_delta = source / BASE_DELTA_FILE
    model = load_trained(ModelSpec.from_config(config, tuple(classes)), source / "adapter",
                         base_delta if base_delta.is_file() else None)
    return config, model
