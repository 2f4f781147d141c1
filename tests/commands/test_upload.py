"""``fedlora report RUN... --tracker KIND``: finished runs logged to trackers
after the fact, read back with each tracker's reader; everything checked
before the first upload, and the run directories only read."""

from __future__ import annotations

import json
from pathlib import Path

from tracker_logs import float32, jsonl_rounds, mlflow_run, tensorboard_run

from fedlora.commands.cli import main
from fedlora.federation.results import RunWriter
from fedlora.strategies import resolve


def _finished(directory: Path, strategy: str, tags: str = "") -> Path:
    """A finished run directory of two rounds, as ``fedlora simulate`` writes it."""
    config = resolve({"strategy": strategy, "out-dir": str(directory), "tracker-tags": tags})
    writer = RunWriter(directory, config)
    for n in (1, 2):
        writer.add_round({"round": n, "accuracy": 0.5 + n / 10, "loss": 1.0 / n,
                          "train_loss": 1.5 / n, "clients": 4, "rejected": 0,
                          "uplink_bytes": 123_456_789 * n, "downlink_bytes": 1000,
                          "epsilon": None, "seconds": 0.25 * n, "updated": True})
    writer.finish({"strategy": strategy})
    return directory


def _files(directories: list[Path]) -> dict:
    return {d: sorted(p.name for p in d.iterdir()) for d in directories}


def test_finished_runs_are_uploaded_as_they_would_have_been_logged(tmp_path, capsys):
    runs = [_finished(tmp_path / "avg" / "seed-1", "fedavg"),
            _finished(tmp_path / "other" / "seed-1", "ffa", "label=ffa,group=g,seed=1")]
    before, out = _files(runs), tmp_path / "report"
    assert main(["report", *map(str, runs), "--out", str(out),
                 "--tracker", "tensorboard,mlflow"]) == 0
    assert "avg/seed-1: 2 rounds logged to tensorboard,mlflow" in capsys.readouterr().out
    assert _files(runs) == before and (out / "report.md").is_file()
    store = out / "tracker"  # --tracker-dir's default with --out
    for run, name in zip(runs, ("avg/seed-1", "ffa/seed-1")):  # the second by its tags
        rounds, config, summary = tensorboard_run(store / "tensorboard" / name)
        assert rounds == float32(jsonl_rounds(run))  # uplink_bytes > 2**24: rounded there
        assert summary == json.loads((run / "summary.json").read_text())
        assert config["strategy"] == json.loads((run / "config.json").read_text())["strategy"]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{store / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("fedlora")  # beside MLflow's "Default"
    found = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert sorted(found) == ["avg/seed-1", "ffa/seed-1"]
    for run, name in zip(runs, ("avg/seed-1", "ffa/seed-1")):
        rounds, _, _, logged = mlflow_run(client.tracking_uri, found[name].info.run_id)
        assert rounds == jsonl_rounds(run) and logged.info.status == "FINISHED"
        assert logged.data.tags["run_dir"] == str(run)


def test_nothing_is_uploaded_unless_every_run_is_finished(tmp_path, capsys):
    done = _finished(tmp_path / "a", "fedavg")
    unfinished = _finished(tmp_path / "b", "fedavg")
    (unfinished / "summary.json").unlink()
    store = tmp_path / "store"
    assert main(["report", str(done), str(unfinished), "--tracker", "mlflow",
                 "--tracker-dir", str(store)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"fedlora: error: {unfinished}: not a finished run (no summary.json)"]
    assert not store.exists()


def test_report_needs_out_or_a_tracker(tmp_path, capsys):
    run = str(_finished(tmp_path / "a", "fedavg"))
    assert main(["report", run]) == 2
    assert "report needs --out DIR, --tracker KIND or both" in capsys.readouterr().err
    assert main(["report", run, "--out", str(tmp_path / "r"), "--tracker-dir", "x"]) == 2
    assert "--tracker-dir and --tracker-uri go with --tracker" in capsys.readouterr().err
    assert main(["report", run, "--tracker", "none"]) == 2
    assert "--tracker none: name the trackers" in capsys.readouterr().err
    assert main(["report", run, "--tracker", "comet"]) == 2
    assert "config key 'tracker': must be one or a comma list" in capsys.readouterr().err
    assert not (tmp_path / "r").exists() and not Path("tracker").exists()
