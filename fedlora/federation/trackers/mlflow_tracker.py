"""MLflow: a run in the experiment ``tracker-project``, through ``MlflowClient``.

The store is ``tracker-uri``, by default the SQLite file
``<tracker-dir>/mlflow.db`` with artifacts beside it (MLflow 3 refuses its
old file store by default). The config goes in as parameters, each round's
numbers as metrics at step = round, and the summary as ``summary/…``
metrics plus ``summary.json`` as an artifact. A round's metrics are one
synchronous batch; a resumed run asks the store which rounds it holds.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedlora.federation.trackers.base import (
    SUMMARY_PREFIX,
    Tracker,
    TrackerRun,
    check_creatable,
    check_reachable,
    numbers,
    tags,
)
from fedlora.federation.trackers.base import location as tracker_dir

PARAMS_PER_CALL = 100  # MLflow's limit on the params of one log_batch
STORE = "mlflow.db"
ARTIFACTS = "mlflow-artifacts"


def store_uri(config: Mapping[str, Any], run_dir: Path) -> str:
    return config["tracker-uri"] or f"sqlite:///{tracker_dir(config, run_dir) / STORE}"


class MlflowTracker(Tracker):
    kind = "mlflow"
    module = "mlflow"

    @classmethod
    def check(cls, config: Mapping[str, Any]) -> None:
        super().check(config)
        uri = config["tracker-uri"]  # other stores (postgresql://, databricks) say it at start
        if uri.startswith(("http://", "https://")):
            check_reachable("tracker-uri", uri, "an MLflow server")
        elif uri.startswith("sqlite:///"):
            check_creatable("tracker-uri", Path(uri.removeprefix("sqlite:///")).parent)

    def start(self, config: Mapping[str, Any], run_dir: Path, name: str,
              resume: TrackerRun | None) -> TrackerRun:
        from mlflow.tracking import MlflowClient

        for library in ("mlflow", "alembic"):  # its table set-up's INFO lines
            logging.getLogger(library).setLevel(logging.WARNING)
        self._client = MlflowClient(tracking_uri=store_uri(config, run_dir))
        if resume is not None:
            self._run_id = resume.run_id
            self._client.update_run(self._run_id, status="RUNNING")
            return TrackerRun(self._run_id, self._held())
        experiment = self._client.get_experiment_by_name(config["tracker-project"])
        experiment_id = (experiment.experiment_id if experiment is not None else
                         self._client.create_experiment(config["tracker-project"],
                                                        self._artifacts(config, run_dir)))
        run = self._client.create_run(experiment_id, run_name=name,
                                      tags={**tags(config), "run_dir": str(run_dir)})
        self._run_id = run.info.run_id
        self._params(config)
        return TrackerRun(self._run_id, 0)

    def _held(self) -> int:
        """The last round the run holds (a round's metrics are one batch:
        all there or none)."""
        keys = [key for key in self._client.get_run(self._run_id).data.metrics
                if not key.startswith(SUMMARY_PREFIX)]
        return max((metric.step for key in keys
                    for metric in self._client.get_metric_history(self._run_id, key)),
                   default=0)

    @staticmethod
    def _artifacts(config: Mapping[str, Any], run_dir: Path) -> str | None:
        """Artifacts beside a local store; a server keeps its own."""
        if config["tracker-uri"]:
            return None
        return (tracker_dir(config, run_dir) / ARTIFACTS).as_uri()

    def _params(self, config: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        params = [Param(key, str(value)) for key, value in sorted(config.items())]
        for first in range(0, len(params), PARAMS_PER_CALL):
            self._client.log_batch(self._run_id, params=params[first:first + PARAMS_PER_CALL])

    def _metrics(self, values: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._client.log_batch(self._run_id, metrics=[Metric(key, value, now, step)
                                                      for key, value in values.items()])

    def log_round(self, record: Mapping[str, Any]) -> None:
        self._metrics(numbers(record), record["round"])

    def finish(self, summary: Mapping[str, Any]) -> None:
        self._metrics({SUMMARY_PREFIX + k: v for k, v in numbers(summary).items()},
                      summary["rounds"])
        self._client.log_dict(self._run_id, dict(summary), "summary.json")
        self._client.set_terminated(self._run_id, "FINISHED")
