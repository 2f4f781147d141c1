"""The one interface every tracker implements, and what they share.

A tracker is told three things: ``start`` (the run's config; ``resume``
names the tracker's own run to continue), ``log_round`` (one round's
record, at step = round) and ``finish`` (the summary). ``start`` answers
with the last round the tracker's run holds, so that a resumed run logs
exactly the rounds it misses (those a stop cut off before they were
written, included), whatever ``tracker.json`` last heard. It logs every
number of a record (``numbers``), not a fixed list of names: the metrics
a round reports grow with its strategy, federated evaluation and task, and
each new one reaches the trackers without a change here.

A tracker's library is imported in ``start`` only: ``fedlora`` runs without
the extras, and a client never imports one (the server alone logs).
"""

from __future__ import annotations

import importlib.util
import math
import socket
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlsplit

from fedlora.core.config import ConfigError, key_values

CONNECT_TIMEOUT_S = 5.0
SUMMARY_PREFIX = "summary/"  # the summary's numbers, apart from the rounds' (uplink_bytes)


@dataclass(frozen=True)
class TrackerRun:
    """A tracker's run: its id, and the last round it holds."""

    run_id: str
    logged: int


def numbers(record: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of a round's record or a summary, as metrics.jsonl keeps
    them: no ``round`` (the step), no flags, lists or text, and no NaN
    (metrics.jsonl writes null)."""
    return {key: float(value) for key, value in record.items()
            if key != "round" and isinstance(value, (int, float))
            and not isinstance(value, bool) and math.isfinite(value)}


def tags(config: Mapping[str, Any]) -> dict[str, str]:
    return key_values(config["tracker-tags"])


def run_name(config: Mapping[str, Any], fallback: str) -> str:
    """``label/seed-s`` for a run of ``fedlora compare`` (its tags say so),
    else ``fallback`` (the run directory's name)."""
    given = tags(config)
    if "label" in given and "seed" in given:
        return f"{given['label']}/seed-{given['seed']}"
    return fallback


def location(config: Mapping[str, Any], run_dir: Path) -> Path:
    """The local directory the trackers write in (``tracker-dir``)."""
    given = config["tracker-dir"]
    return Path(given).expanduser().resolve() if given else run_dir / "tracker"


def check_creatable(key: str, path: Path) -> None:
    """One line now if ``path`` cannot be made (a file in its way, no
    permission), instead of a failure at the first round: a real try in the
    nearest existing parent, which is left as it was."""
    parent = path
    while not parent.exists():
        parent = parent.parent
    try:
        if not parent.is_dir():
            raise NotADirectoryError(f"{parent} is not a directory")
        tempfile.TemporaryDirectory(dir=parent).cleanup()
    except OSError as err:
        raise ConfigError(f"config key '{key}': cannot write in {path} "
                          f"({getattr(err, 'strerror', None) or err})") from None


def check_reachable(key: str, url: str, what: str) -> None:
    """One line now if nothing listens at ``url``'s host and port."""
    parts = urlsplit(url)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        socket.create_connection((parts.hostname or "", port), CONNECT_TIMEOUT_S).close()
    except (OSError, ValueError) as err:
        raise ConfigError(f"config key '{key}': cannot reach {what} at {url} "
                          f"({getattr(err, 'strerror', None) or err})") from None


class Tracker(ABC):
    """One tracker's run. Every call may raise: ``Tracking`` logs it once and
    the run goes on without this tracker."""

    kind: ClassVar[str]
    module: ClassVar[str]  # its library (imported in start), in the extra named ``kind``

    @classmethod
    def check(cls, config: Mapping[str, Any]) -> None:
        """Raise a one-line ConfigError if this tracker cannot start: before
        the run directory exists, so a refused run leaves nothing behind."""
        if importlib.util.find_spec(cls.module) is None:
            raise ConfigError(f"config key 'tracker': {cls.kind} needs its library: "
                              f"pip install 'fedlora[{cls.kind}]'")
        if config["tracker-dir"]:
            check_creatable("tracker-dir", location(config, Path()))

    @abstractmethod
    def start(self, config: Mapping[str, Any], run_dir: Path, name: str,
              resume: TrackerRun | None) -> TrackerRun:
        """Open the run ``name`` (a new one, or ``resume``'s: its id, and the
        last round it was told of) and, when new, log the config as its
        parameters; returns the run and the last round it holds."""

    @abstractmethod
    def log_round(self, record: Mapping[str, Any]) -> None:
        """Log the record's ``numbers`` at step = its round, durably."""

    @abstractmethod
    def finish(self, summary: Mapping[str, Any]) -> None:
        """Log the summary and close the run as finished."""
