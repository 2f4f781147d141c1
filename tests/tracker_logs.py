"""What each tracker holds, read back with the tracker's own reader, as
{step: {metric: value}} (shared by the tracker tests).

- TensorBoard: its event reader (``event_accumulator.EventAccumulator``,
  which applies a resumed writer's purge); its scalars are float32.
- MLflow: ``MlflowClient`` on the store.
- W&B: its offline transaction log (``run-<id>.wandb``), whose records are
  W&B's own protobuf (``wandb.proto.wandb_internal_pb2.Record``). wandb 0.31
  reads these files in Go only (its Python ``datastore`` is gone): the
  framing is read by ``fedlora.federation.trackers.wandb_files`` (a resumed
  run reads them too), each chunk's CRC checked.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from fedlora.federation.trackers.wandb_files import records, run_files

Rounds = dict[int, dict[str, float]]


def jsonl_rounds(run_dir: Path) -> Rounds:
    """metrics.jsonl's numbers per round, as the trackers should hold them."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {row["round"]: {k: float(v) for k, v in row.items()
                           if k != "round" and isinstance(v, (int, float))
                           and not isinstance(v, bool)} for row in rows}


# --- TensorBoard ----------------------------------------------------------------------

def float32(rounds: Rounds) -> Rounds:
    """``rounds`` as TensorBoard keeps them: float32 scalars."""
    return {step: {k: float(np.float32(v)) for k, v in values.items()}
            for step, values in rounds.items()}


def tensorboard_run(folder: Path) -> tuple[Rounds, dict[str, Any], dict[str, Any]]:
    """(rounds, config, summary) of one run's event folder."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    rounds: Rounds = defaultdict(dict)
    for tag in events.Tags()["scalars"]:
        for event in events.Scalars(tag):
            if not tag.startswith("summary/"):
                assert tag not in rounds[event.step], f"{tag} twice at step {event.step}"
                rounds[event.step][tag] = event.value
    config, summary = (json.loads(tensor_util.make_ndarray(events.Tensors(
        f"{name}/text_summary")[-1].tensor_proto).item().decode().strip("`")
        .removeprefix("json")) for name in ("config", "summary"))
    return dict(rounds), config, summary


# --- MLflow --------------------------------------------------------------------------

def mlflow_run(uri: str, run_id: str) -> tuple[Rounds, dict[str, str], dict[str, float], Any]:
    """(rounds, params, summary metrics, the run) from the store at ``uri``."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    rounds: Rounds = defaultdict(dict)
    summary = {}
    for key in run.data.metrics:
        history = client.get_metric_history(run_id, key)
        if key.startswith("summary/"):
            summary[key.removeprefix("summary/")] = history[-1].value
            continue
        for metric in history:
            assert key not in rounds[metric.step], f"{key} logged twice at step {metric.step}"
            rounds[metric.step][key] = metric.value
    return dict(rounds), run.data.params, summary, run


# --- Weights & Biases ----------------------------------------------------------------

def wandb_run(directory: Path, run_id: str) -> tuple[Rounds, dict[str, Any], dict[str, Any],
                                                    list[Any]]:
    """(rounds, config, summary, the run records) over every attempt's file
    of ``run_id`` under W&B's ``dir`` (a resumed run has one per attempt)."""
    rounds: Rounds = defaultdict(dict)
    config, summary, runs = {}, {}, []
    for path in run_files(directory, run_id):
        for record in records(path):
            which = record.WhichOneof("record_type")
            if which == "history":
                step = record.history.step.num
                for item in record.history.item:
                    key = item.key or "/".join(item.nested_key)
                    if not key.startswith("_"):  # W&B's own (_step, _timestamp, _runtime)
                        assert key not in rounds[step], f"{key} logged twice at step {step}"
                        rounds[step][key] = float(json.loads(item.value_json))
            elif which in ("config", "run"):  # init's config comes with the run record
                items = (record.config if which == "config" else record.run.config).update
                config.update({item.key: json.loads(item.value_json)
                               for item in items if item.key != "_wandb"})
            elif which == "summary":
                summary.update({item.key or "/".join(item.nested_key):
                                json.loads(item.value_json) for item in record.summary.update})
            if which == "run":
                runs.append(record.run)
    return dict(rounds), config, summary, runs
