"""Experiment trackers: a run also logged to TensorBoard, MLflow or Weights &
Biases (config key ``tracker``, docs/trackers.md).

The server logs; a client never imports a tracker. Each tracker is one
module behind one interface (``base.Tracker``: start, log_round, finish),
using the tracker's own library from an optional extra; ``tracking`` runs
them together and keeps them in step with the run.
"""

from fedlora.federation.trackers.tracking import (
    STATE_FILE,
    TRACKERS,
    Tracking,
    check,
    kinds,
    open_tracking,
)

__all__ = ["STATE_FILE", "TRACKERS", "Tracking", "check", "kinds", "open_tracking"]
