"""``fedlora report RUN_DIR... --tracker KIND``: finished runs logged to
trackers after the fact, as if they had been logged while they ran.

Each run becomes a new tracker run: ``config.json`` as its parameters (with
the upload's tracker keys), each line of ``metrics.jsonl`` at step = its
round, ``summary.json`` as its summary. It keeps the tags it ran with (a
``fedlora compare`` run: label, group and seed, and the name
``label/seed-s``); any other is named as in the report's table. Every run
and every tracker is checked before the first upload, and the run
directories are only read (no ``tracker.json`` is written there: a run
uploaded twice is two tracker runs).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedlora.commands.report import labels, read_run
from fedlora.core.config import ConfigError, RunConfig
from fedlora.federation import trackers
from fedlora.federation.trackers.base import run_name


def _config(directory: Path, options: dict[str, Any]) -> RunConfig:
    """The run's config.json with the upload's tracker keys."""
    from fedlora.strategies import resolve

    path = directory / "config.json"
    try:
        saved = json.loads(path.read_text())
        if not isinstance(saved, dict):
            raise ConfigError("not a JSON object")
        return resolve({**saved, **options})
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, ConfigError) as err:
        raise ConfigError(f"{path}: {err}") from None


@dataclass(frozen=True)
class Upload:
    """One finished run, read and checked, and the name it is logged under."""

    directory: Path
    name: str
    config: dict[str, Any]
    summary: dict[str, Any]
    rows: list[dict[str, Any]]


def plan(run_dirs: list[str], options: dict[str, Any]) -> list[Upload]:
    """Every run read and every tracker checked (``options``: the tracker
    keys), or one ConfigError line; nothing is logged yet."""
    directories = [Path(d) for d in run_dirs]
    uploads = []
    for directory, name in zip(directories, labels(directories)):
        summary, rows = read_run(directory)
        config = _config(directory, options)
        trackers.check(config)
        uploads.append(Upload(directory.resolve(), run_name(config.to_dict(), name),
                              config.to_dict(), summary, rows))
    return uploads


def upload(uploads: list[Upload]) -> int:
    """Log each run; returns the exit code: 1 if a tracker failed on the way
    (its warning says which, and where)."""
    failed = False
    for run in uploads:
        tracking = trackers.open_tracking(run.config, keep_state=False)
        tracking.start(run.config, run.directory, run.rows, name=run.name)
        tracking.finish(run.summary)
        failed = failed or bool(tracking.failed)
        print(f"{run.name}: {len(run.rows)} rounds logged to {run.config['tracker']}")
    return 1 if failed else 0
