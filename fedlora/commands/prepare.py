"""What the runners (``fedlora simulate``, ``compare``, ``bench-scale``) do to a
config before a run: local paths made absolute, heavy inputs loaded early."""

from __future__ import annotations

from pathlib import Path

from fedlora.core.config import RunConfig

PATH_KEYS = ("dataset", "model")


def absolute_paths(overrides: dict) -> dict:
    """Local paths made absolute: Ray workers and `evaluate` may run elsewhere,
    and a resumed run logs to the same ``tracker-dir`` from any directory."""
    for key in PATH_KEYS:
        value = overrides.get(key)
        if isinstance(value, str) and value and Path(value).expanduser().exists():
            overrides[key] = str(Path(value).expanduser().resolve())
    if overrides.get("model-cache"):  # made by the first run: absolute before it exists
        overrides["model-cache"] = str(Path(overrides["model-cache"]).expanduser().resolve())
    if isinstance(overrides.get("tracker-dir"), str) and overrides["tracker-dir"]:
        overrides["tracker-dir"] = str(Path(overrides["tracker-dir"]).expanduser().resolve())
    return overrides


def preflight(config: RunConfig) -> None:
    """Load data, model and partitions before the first round, so bad input fails
    in one line before any client trains (and the driver's caches are warm for
    central evaluation). ``fedlora.commands.simulation`` runs it while Ray starts."""
    from fedlora.learning.features import encoded_splits, model_for, partitioner_for
    from fedlora.runtime import quiet

    quiet.libraries()
    encoded_splits(config)
    model_for(config)
    partitioner_for(config)
