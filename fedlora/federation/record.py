"""What one round did, typed: one line of ``metrics.jsonl``.

``RoundRecord.to_dict`` is the row, in the order the round loop has always
written it (``fedlora.federation.results`` puts ``Round.fixed`` first; the
central evaluation's fields are the task's):
fields that only some runs have (``clipped`` under a robust mode,
``attackers`` under an attack, the merge's ``aggregate_s``, residuals and
``base_version``, the evaluation's) are left out while None, as before.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from fedlora.core.fields import Round


@dataclass
class RoundRecord:
    """One round: training (from ``ServerRound.aggregate_train``), then the
    round loop's evaluation and wall time."""

    round: int
    sampled: int  # nodes asked
    missing: int = 0  # asked nodes that never answered
    clients: int = 0  # updates folded in
    rejected: int = 0  # replies refused (invalid, stale, duplicate, screened out)
    declined: int = 0  # DP clients over their budget
    uplink_bytes: int = 0
    clipped: int | None = None  # robust modes: clients whose weight or change was cut
    downlink_bytes: int = 0
    train_loss: float = math.nan  # example-weighted mean over the folded updates
    compute_s: float = 0.0  # the clients' reported training time, summed
    compute_max_s: float = 0.0  # the slowest client's
    epsilon: float | None = None  # local DP: the largest ε reported; central: the run's
    attackers: int | None = None  # attack runs: simulated attackers among the asked
    aggregate_s: float | None = None  # merged rounds: decoding, folding and merging
    agg_residual: float | None = None  # merged rounds with products (docs/algorithms.md §0)
    agg_residual_fedavg: float | None = None
    base_version: int | None = None  # strategies that change the base
    updated: bool = False  # the global adapter changed
    # central evaluation by the task's metrics (None in rounds not evaluated);
    # classification's accuracy and loss unless the round loop names the task's
    central: dict[str, float | None] = field(
        default_factory=lambda: dict.fromkeys(Round.CLASSIFICATION))
    evaluate_s: float | None = None
    evaluation: dict[str, float] = field(default_factory=dict)  # federated: {prefix}_*
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """The ``metrics.jsonl`` row."""
        row: dict[str, Any] = {"round": self.round, **self.central, "epsilon": self.epsilon,
                               "sampled": self.sampled, "missing": self.missing,
                               "clients": self.clients, "rejected": self.rejected,
                               "declined": self.declined, "uplink_bytes": self.uplink_bytes}
        optional = {"clipped": self.clipped}
        row.update({k: v for k, v in optional.items() if v is not None})
        row.update({"downlink_bytes": self.downlink_bytes, "train_loss": self.train_loss,
                    "compute_s": self.compute_s, "compute_max_s": self.compute_max_s})
        optional = {"attackers": self.attackers, "aggregate_s": self.aggregate_s,
                    "agg_residual": self.agg_residual,
                    "agg_residual_fedavg": self.agg_residual_fedavg,
                    "base_version": self.base_version}
        row.update({k: v for k, v in optional.items() if v is not None})
        row["updated"] = self.updated
        if self.evaluate_s is not None:
            row["evaluate_s"] = self.evaluate_s
        row.update(self.evaluation)
        row["seconds"] = self.seconds
        return row
