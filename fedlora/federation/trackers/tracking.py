"""A run's trackers as one: checked before the run, kept in step with its rounds.

``check`` runs before the run directory exists: a tracker that cannot start
(its extra missing, a directory it cannot write, a server it cannot reach)
is one ``ConfigError`` line and nothing is written. Once the run is going,
a tracker that fails is named in one warning and dropped, and the run goes
on: its results on disk are never lost to a tracker.

``tracker.json`` in the run directory holds each tracker's run id and the
last round it was told of. A resumed run continues the same tracker runs,
asks each which rounds it holds, and logs those it misses (finished after
the tracker last heard of the run, or lost by a tracker that buffers) before
going on. A round is logged after its checkpoint is written, so a tracker
never holds a round that the resumed run will do again: no step is logged
twice.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from fedlora.core.config import ConfigError, comma_list
from fedlora.federation.trackers.base import Tracker, TrackerRun, run_name
from fedlora.federation.trackers.mlflow_tracker import MlflowTracker
from fedlora.federation.trackers.tensorboard_tracker import TensorBoardTracker
from fedlora.federation.trackers.wandb_tracker import WandbTracker

LOGGER = logging.getLogger(__name__)
STATE_FILE = "tracker.json"
TRACKERS: dict[str, type[Tracker]] = {cls.kind: cls for cls in (
    TensorBoardTracker, MlflowTracker, WandbTracker)}


def kinds(config: Mapping[str, Any]) -> list[str]:
    return [kind for kind in comma_list(config["tracker"]) if kind != "none"]


def check(config: Mapping[str, Any]) -> None:
    """Every tracker of ``config`` can start, or one ConfigError line."""
    chosen = kinds(config)
    if config["tracker-uri"] and "mlflow" not in chosen:
        raise ConfigError("config key 'tracker-uri': only the mlflow tracker reads it "
                          f"(tracker = {config['tracker']})")
    for kind in chosen:
        TRACKERS[kind].check(config)


FAILED = object()  # what ``Tracking._call`` returns for a tracker that raised


class Tracking:
    """Every call goes to each tracker still working (see the module docstring)."""

    def __init__(self, trackers: list[Tracker], keep_state: bool = True) -> None:
        self.trackers = trackers
        self.failed: list[str] = []
        self._keep_state = keep_state
        self._state: dict[str, dict[str, Any]] = {}  # tracker.json: kind → id, logged
        self._path: Path | None = None

    def start(self, config: Mapping[str, Any], run_dir: Path,
              done: list[dict[str, Any]], name: str | None = None) -> None:
        """Open each tracker's run (``tracker.json``'s, when it has one) and
        log the rounds of ``done`` it does not hold yet."""
        if not self.trackers:
            return
        if self._keep_state:
            self._path = run_dir / STATE_FILE
            self._state = self._read()
        name = name or run_name(config, run_dir.name)
        for tracker in list(self.trackers):
            entry = self._state.get(tracker.kind)
            resume = TrackerRun(entry["id"], entry["logged"]) if entry else None
            run = self._call(tracker, "start", lambda t: t.start(config, run_dir, name, resume))
            if run is not FAILED:
                self._state[tracker.kind] = {"id": run.run_id, "logged": run.logged}
        self._save()
        for row in done:
            self.log_round(row)

    def log_round(self, record: Mapping[str, Any]) -> None:
        for tracker in list(self.trackers):
            entry = self._state[tracker.kind]
            if record["round"] > entry["logged"] and self._call(
                    tracker, f"round {record['round']}", lambda t: t.log_round(record)
            ) is not FAILED:
                entry["logged"] = record["round"]
        self._save()

    def finish(self, summary: Mapping[str, Any]) -> None:
        for tracker in list(self.trackers):
            self._call(tracker, "finish", lambda t: t.finish(summary))

    def _call(self, tracker: Tracker, when: str, call: Callable[[Tracker], Any]) -> Any:
        """``call(tracker)``, or ``FAILED``: then one warning, and the tracker
        is dropped (its tracker.json entry stays: a resume catches it up)."""
        try:
            return call(tracker)
        except Exception as err:  # noqa: BLE001  (a tracker's failure never ends the run)
            self.trackers.remove(tracker)
            self.failed.append(tracker.kind)
            first = (str(err).strip().splitlines() or [""])[0]
            LOGGER.warning("tracker %s failed at %s (%s: %s); the run goes on without it",
                           tracker.kind, when, type(err).__name__, first)
            return FAILED

    def _read(self) -> dict[str, dict[str, Any]]:
        """tracker.json's entries; none (new tracker runs) if it is unreadable."""
        try:
            saved = json.loads(self._path.read_text())
            return {kind: {"id": str(entry["id"]), "logged": int(entry["logged"])}
                    for kind, entry in saved.items()}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as err:
            LOGGER.warning("%s cannot be read (%s): the trackers start new runs",
                           self._path, err)
            return {}

    def _save(self) -> None:
        """tracker.json, renamed into place (entries of trackers not used
        this time are kept, for a later attempt that uses them again)."""
        if self._path is None:
            return
        tmp = self._path.with_name(f".{STATE_FILE}.tmp")
        tmp.write_text(json.dumps(self._state, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, self._path)


def open_tracking(config: Mapping[str, Any], keep_state: bool = True) -> Tracking:
    """The trackers ``config`` names, checked (``check``); none for
    ``tracker = none``. ``keep_state``: keep tracker.json in the run
    directory (not for an upload of a finished run)."""
    check(config)
    return Tracking([TRACKERS[kind]() for kind in kinds(config)], keep_state)
