"""Weights & Biases: a run of the project ``tracker-project``, offline unless
the user has set W&B up.

Offline (the default) the run is written to ``<tracker-dir>/wandb/offline-run-*``
and ``wandb sync`` uploads it later. A run that went on after a stop has one
such folder per attempt, all under the same run id, each with the rounds it
logged (a resumed run reads which rounds they hold: ``wandb_files``). W&B
counts as set up when ``WANDB_MODE`` is set (W&B then reads it) or an API
key is there (``WANDB_API_KEY``, or ``wandb login``'s entry in ~/.netrc):
then the run goes where W&B is configured to send it. W&B's console capture
is off: it would wrap the progress display.
"""

from __future__ import annotations

import netrc
import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fedlora.federation.trackers.base import (
    SUMMARY_PREFIX,
    Tracker,
    TrackerRun,
    check_reachable,
    numbers,
    tags,
)
from fedlora.federation.trackers.base import location as tracker_dir
from fedlora.federation.trackers.wandb_files import last_step

DEFAULT_BASE_URL = "https://api.wandb.ai"
LOCAL_MODES = ("offline", "disabled", "dryrun")
FLUSH_S = 1.0  # how often W&B writes its file (its default, 15 s, would lose more to a kill)


def base_url() -> str:
    return os.environ.get("WANDB_BASE_URL") or DEFAULT_BASE_URL


def _logged_in() -> bool:
    try:
        entry = netrc.netrc(os.environ.get("NETRC")).authenticators(urlsplit(base_url()).hostname)
    except (OSError, netrc.NetrcParseError):
        return False
    return entry is not None


def mode() -> str | None:
    """``offline``, or None where the user has set W&B up (it decides)."""
    if os.environ.get("WANDB_MODE") or os.environ.get("WANDB_API_KEY") or _logged_in():
        return None
    return "offline"


class WandbTracker(Tracker):
    kind = "wandb"
    module = "wandb"

    @classmethod
    def check(cls, config: Mapping[str, Any]) -> None:
        super().check(config)
        if mode() is None and os.environ.get("WANDB_MODE") not in LOCAL_MODES:
            check_reachable("tracker", base_url(), "W&B (set WANDB_MODE=offline to log "
                            "offline)")

    def start(self, config: Mapping[str, Any], run_dir: Path, name: str,
              resume: TrackerRun | None) -> TrackerRun:
        import wandb

        directory = tracker_dir(config, run_dir)
        directory.mkdir(parents=True, exist_ok=True)
        run_id = resume.run_id if resume else secrets.token_hex(4)
        settings = {"console": "off", "silent": True}
        if "x_transaction_log_flush_interval" in wandb.Settings.model_fields:
            settings["x_transaction_log_flush_interval"] = FLUSH_S
        self._run = wandb.init(
            project=config["tracker-project"], dir=str(directory), id=run_id, name=name,
            notes=f"fedlora run {run_dir}", config=None if resume else dict(config),
            tags=[f"{key}={value}" for key, value in tags(config).items()],
            resume="allow", reinit="create_new", mode=mode(),
            settings=wandb.Settings(**settings))
        return TrackerRun(run_id, last_step(directory, run_id) if resume else 0)

    def log_round(self, record: Mapping[str, Any]) -> None:
        # committed now: with a step given, W&B otherwise holds the row until the next one
        self._run.log(numbers(record), step=record["round"], commit=True)

    def finish(self, summary: Mapping[str, Any]) -> None:
        self._run.summary.update({SUMMARY_PREFIX + k: v for k, v in summary.items()})
        self._run.finish()
