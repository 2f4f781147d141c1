"""TensorBoard: event files written with ``torch.utils.tensorboard``.

A run is the folder ``<tracker-dir>/tensorboard/<name>``, so ``tensorboard
--logdir <tracker-dir>/tensorboard`` shows every run logged there (all of a
``fedlora compare``'s). Numbers are TensorBoard's plain float32 scalars:
its default (fast) loader shows no other kind, so byte counts above 2**24
are rounded there (metrics.jsonl keeps them exact). Every writer starts
with a session-start event at the first step it will write (``purge_step``):
when a run goes on after a stop, TensorBoard drops whatever an earlier
attempt logged from that step on, so no step shows twice. (Each round is
flushed before ``tracker.json`` records it: the event files hold at least
the rounds it names.)
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedlora.federation.trackers.base import SUMMARY_PREFIX, Tracker, TrackerRun, numbers, tags
from fedlora.federation.trackers.base import location as tracker_dir


def _free(root: Path, name: str) -> str:
    """``name``, or ``name-2``, ``name-3``… if a run of that name is there:
    two runs in one folder would read as one."""
    candidate, number = name, 1
    while (root / candidate).exists():
        number += 1
        candidate = f"{name}-{number}"
    return candidate


def _json_text(value: Any) -> str:
    return "```json\n" + json.dumps(value, indent=2, sort_keys=True) + "\n```"


class TensorBoardTracker(Tracker):
    kind = "tensorboard"
    module = "tensorboard"  # torch.utils.tensorboard needs it

    def start(self, config: Mapping[str, Any], run_dir: Path, name: str,
              resume: TrackerRun | None) -> TrackerRun:
        from torch.utils.tensorboard import SummaryWriter

        root = tracker_dir(config, run_dir) / "tensorboard"
        folder = resume.run_id if resume else _free(root, name)
        self._writer = SummaryWriter(str(root / folder),
                                     purge_step=resume.logged + 1 if resume else 1)
        if resume is None:
            self._writer.add_text("config", _json_text(dict(config)), 0)
            self._writer.add_text("tags", _json_text({**tags(config),
                                                      "run_dir": str(run_dir)}), 0)
            self._writer.flush()
        return TrackerRun(folder, resume.logged if resume else 0)  # past it: purged

    def _scalars(self, values: Mapping[str, float], step: int) -> None:
        for key, value in values.items():
            self._writer.add_scalar(key, value, step)
        self._writer.flush()

    def log_round(self, record: Mapping[str, Any]) -> None:
        self._scalars(numbers(record), record["round"])

    def finish(self, summary: Mapping[str, Any]) -> None:
        step = summary["rounds"]
        self._scalars({SUMMARY_PREFIX + k: v for k, v in numbers(summary).items()}, step)
        self._writer.add_text("summary", _json_text(dict(summary)), step)
        self._writer.close()
