"""A task's primary metric: the record field a run is judged by, and its
direction. Tasks declare one (``fedlora.learning.tasks``); the summary
records it (``primary_metric``, ``primary_direction``), and ``report`` and
``compare`` read it from there, so they need no task, model or torch.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from fedlora.core.fields import Round, Summary


@dataclass(frozen=True)
class Metric:
    """A metric's record field and whether higher is better."""

    name: str
    higher_is_better: bool = True

    @property
    def direction(self) -> str:
        return "higher" if self.higher_is_better else "lower"

    def best(self, values: Iterable[float]) -> float | None:
        """The best of ``values`` (None for none); the first of equals."""
        return (max if self.higher_is_better else min)(values, default=None)

    @classmethod
    def of_summary(cls, summary: dict[str, Any]) -> Metric:
        """A finished run's primary metric, from its summary.json (accuracy
        for runs from before the field)."""
        return cls(summary.get(Summary.PRIMARY_METRIC, Round.ACCURACY),
                   summary.get(Summary.PRIMARY_DIRECTION, "higher") == "higher")


ACCURACY = Metric(Round.ACCURACY, higher_is_better=True)
