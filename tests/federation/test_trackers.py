"""Experiment trackers (``fedlora.federation.trackers``) without a real run:
the keys, the up-front checks that refuse a run in one line, the fan-out
that drops a failing tracker and goes on, and what a resumed run logs.
The real runs, read back with each tracker's reader, are in
test_trackers_run.py."""

from __future__ import annotations

import importlib.util
import json
import logging
import socket
from pathlib import Path

import pytest
from tracker_logs import float32, tensorboard_run, wandb_run

from fedlora.commands.cli import main
from fedlora.core.config import ConfigError
from fedlora.federation import trackers
from fedlora.federation.trackers import wandb_tracker
from fedlora.federation.trackers.base import Tracker, TrackerRun, numbers, run_name
from fedlora.federation.trackers.wandb_files import last_step
from fedlora.strategies import resolve


def _config(**keys) -> dict:
    return resolve(keys).to_dict()


def _closed_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# --- the keys -----------------------------------------------------------------------

@pytest.mark.parametrize("value, problem", [
    ("comet", "must be one or a comma list of none, tensorboard, mlflow, wandb, got 'comet'"),
    ("mlflow,mlflow", "lists one twice"), ("none,wandb", "lists none with others"),
    ("", "must be one or a comma list of"), (" , ", "must be one or a comma list of"),
])
def test_a_bad_tracker_is_one_line_naming_the_key(value, problem):
    with pytest.raises(ConfigError) as refused:
        resolve({"tracker": value})
    assert str(refused.value).startswith(f"config key 'tracker': {problem}")
    assert "\n" not in str(refused.value)


def test_trackers_and_tags_as_lists():
    config = _config(tracker=" tensorboard , wandb", **{"tracker-tags": "a=1, b = x=y"})
    assert trackers.kinds(config) == ["tensorboard", "wandb"]
    assert run_name(config, "dir") == "dir"
    assert run_name(_config(**{"tracker-tags": "label=avg,seed=3"}), "dir") == "avg/seed-3"
    with pytest.raises(ConfigError, match="config key 'tracker-tags': expected key=value"):
        resolve({"tracker-tags": "a=1,b"})
    with pytest.raises(ConfigError, match="'a' is given twice"):
        resolve({"tracker-tags": "a=1,a=2"})


def test_numbers_are_what_metrics_jsonl_keeps():
    record = {"round": 3, "accuracy": 0.5, "clients": 4, "epsilon": None, "updated": True,
              "train_loss": float("nan"), "client_ids": [1, 2], "strategy": "ffa"}
    assert numbers(record) == {"accuracy": 0.5, "clients": 4.0}


# --- refused before the run: one line, nothing written ----------------------------------

def test_a_missing_extra_names_it(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "mlflow" else find_spec(name, *a))
    with pytest.raises(ConfigError, match=r"mlflow needs its library: pip install "
                                          r"'fedlora\[mlflow\]'"):
        trackers.check(_config(tracker="tensorboard,mlflow"))
    trackers.check(_config(tracker="tensorboard"))


def test_an_unwritable_directory_is_refused(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="config key 'tracker-dir': cannot write in"):
        trackers.check(_config(tracker="tensorboard", **{"tracker-dir": str(tmp_path / "file"
                                                                              / "tb")}))
    with pytest.raises(ConfigError, match="config key 'tracker-uri': cannot write in"):
        trackers.check(_config(tracker="mlflow", **{
            "tracker-uri": f"sqlite:///{tmp_path / 'file' / 'mlflow.db'}"}))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_an_unreachable_server_is_refused(monkeypatch):
    url = f"http://127.0.0.1:{_closed_port()}"
    with pytest.raises(ConfigError, match=f"'tracker-uri': cannot reach an MLflow server at "
                                          f"{url}"):
        trackers.check(_config(tracker="mlflow", **{"tracker-uri": url}))
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_BASE_URL", url)
    with pytest.raises(ConfigError, match=f"'tracker': cannot reach W&B .* at {url}"):
        trackers.check(_config(tracker="wandb"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    trackers.check(_config(tracker="wandb"))


def test_a_uri_only_mlflow_reads_is_refused_for_others():
    with pytest.raises(ConfigError, match="'tracker-uri': only the mlflow tracker reads it"):
        trackers.check(_config(tracker="tensorboard", **{"tracker-uri": "sqlite:///x.db"}))


def test_wandb_is_offline_unless_set_up(monkeypatch, tmp_path):
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    netrc = tmp_path / "netrc"
    netrc.write_text("machine example.org login user password secret\n")
    monkeypatch.setenv("NETRC", str(netrc))
    assert wandb_tracker.mode() == "offline"
    netrc.write_text("machine api.wandb.ai login user password key\n")
    assert wandb_tracker.mode() is None  # `wandb login` was run: W&B decides
    netrc.unlink()
    monkeypatch.setenv("WANDB_API_KEY", "key")
    assert wandb_tracker.mode() is None


def test_simulate_refuses_an_unreachable_tracker_in_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    url = f"http://127.0.0.1:{_closed_port()}"
    assert main(["simulate", "--set", "tracker=mlflow", f"tracker-uri={url}",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot reach an MLflow server" in err[0]
    assert list(tmp_path.iterdir()) == []


def test_simulate_refuses_a_missing_extra_in_one_line(tmp_path, capsys, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    assert main(["simulate", "--set", "tracker=wandb", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["fedlora: error: config key 'tracker': wandb needs its library: "
                   "pip install 'fedlora[wandb]'"]
    assert list(tmp_path.iterdir()) == []


# --- the fan-out: a failing tracker, a resumed run ---------------------------------------

class Recorder(Tracker):
    """A tracker that records what it is told; it raises at ``fail_at``
    ("start" or a round), and on a resume holds ``held`` rounds."""

    module = "json"

    def __init__(self, kind: str, fail_at=None, held: int | None = None) -> None:
        self.kind, self.fail_at, self.held, self.calls = kind, fail_at, held, []

    def start(self, config, run_dir, name, resume):
        if self.fail_at == "start":
            raise OSError("no such store")
        self.calls.append(("start", name, resume))
        held = self.held if self.held is not None else (resume.logged if resume else 0)
        return TrackerRun(resume.run_id if resume else f"{self.kind}-id", held)

    def log_round(self, record):
        if record["round"] == self.fail_at:
            raise ConnectionError("the server went away\nand a second line")
        self.calls.append(record["round"])

    def finish(self, summary):
        self.calls.append("finish")


def _state(run_dir: Path) -> dict:
    return json.loads((run_dir / trackers.STATE_FILE).read_text())


def test_a_tracker_failing_mid_run_is_logged_once_and_the_run_goes_on(tmp_path, caplog):
    failing, working = Recorder("a", fail_at=2), Recorder("b")
    tracking = trackers.Tracking([failing, working])
    with caplog.at_level(logging.WARNING, logger="fedlora"):
        tracking.start(_config(), tmp_path, [])
        for server_round in (1, 2, 3):
            tracking.log_round({"round": server_round, "accuracy": 0.5})
        tracking.finish({"rounds": 3})
    assert failing.calls == [("start", tmp_path.name, None), 1]
    assert working.calls == [("start", tmp_path.name, None), 1, 2, 3, "finish"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["tracker a failed at round 2 (ConnectionError: the server went "
                        "away); the run goes on without it"]
    assert tracking.failed == ["a"]
    # a later resume catches the failed one up from the round it last took
    assert _state(tmp_path) == {"a": {"id": "a-id", "logged": 1},
                                "b": {"id": "b-id", "logged": 3}}


def test_a_tracker_failing_to_start_is_dropped(tmp_path, caplog):
    tracking = trackers.Tracking([Recorder("a", fail_at="start"), working := Recorder("b")])
    with caplog.at_level(logging.WARNING, logger="fedlora"):
        tracking.start(_config(), tmp_path, [{"round": 1}])
    assert "tracker a failed at start (OSError: no such store)" in caplog.text
    assert working.calls == [("start", tmp_path.name, None), 1]
    assert _state(tmp_path) == {"b": {"id": "b-id", "logged": 1}}


def test_a_resumed_run_logs_only_the_rounds_each_tracker_lacks(tmp_path):
    """tracker.json heard of round 1; the checkpoint says 3 rounds are done;
    tracker a turns out to hold 2 of them (it logged round 2, then the
    run stopped before tracker.json was written), tracker b the 1 it was
    told of; c is new to this attempt."""
    (tmp_path / trackers.STATE_FILE).write_text(json.dumps({
        "a": {"id": "a-run", "logged": 1}, "b": {"id": "b-run", "logged": 1},
        "old": {"id": "kept", "logged": 7}}))
    a, b, c = Recorder("a", held=2), Recorder("b"), Recorder("c")
    done = [{"round": n} for n in (1, 2, 3)]
    trackers.Tracking([a, b, c]).start(_config(**{"tracker-tags": "label=x,seed=2"}),
                                       tmp_path, done)
    assert a.calls == [("start", "x/seed-2", TrackerRun("a-run", 1)), 3]
    assert b.calls == [("start", "x/seed-2", TrackerRun("b-run", 1)), 2, 3]
    assert c.calls == [("start", "x/seed-2", None), 1, 2, 3]
    assert _state(tmp_path) == {"a": {"id": "a-run", "logged": 3},
                                "b": {"id": "b-run", "logged": 3},
                                "c": {"id": "c-id", "logged": 3},
                                "old": {"id": "kept", "logged": 7}}


def test_an_unreadable_state_file_starts_new_tracker_runs(tmp_path, caplog):
    (tmp_path / trackers.STATE_FILE).write_text('{"a": {"id"')
    a = Recorder("a")
    with caplog.at_level(logging.WARNING, logger="fedlora"):
        trackers.Tracking([a]).start(_config(), tmp_path, [{"round": 1}])
    assert a.calls == [("start", tmp_path.name, None), 1]
    assert "cannot be read" in caplog.text


def test_tracker_none_writes_nothing(tmp_path):
    tracking = trackers.open_tracking(_config())
    tracking.start(_config(), tmp_path, [{"round": 1}])
    tracking.log_round({"round": 2})
    tracking.finish({"rounds": 2})
    assert list(tmp_path.iterdir()) == []


# --- the real trackers' resume paths -------------------------------------------------------

def test_tensorboard_drops_what_an_earlier_attempt_logged_past_tracker_json(tmp_path):
    """Round 3 was written, then the run stopped before tracker.json said so
    and before its checkpoint: the resumed attempt logs round 3 again, with
    its own values, and TensorBoard's reader shows it once."""
    config = _config(tracker="tensorboard")
    tracking = trackers.open_tracking(config)
    tracking.start(config, tmp_path, [])
    for server_round in (1, 2, 3):
        tracking.log_round({"round": server_round, "accuracy": server_round / 10})
    state = _state(tmp_path)
    state["tensorboard"]["logged"] = 2
    (tmp_path / trackers.STATE_FILE).write_text(json.dumps(state))
    resumed = trackers.open_tracking(config)
    resumed.start(config, tmp_path, [{"round": 1, "accuracy": 0.1},
                                     {"round": 2, "accuracy": 0.2}])
    resumed.log_round({"round": 3, "accuracy": 0.33})
    resumed.finish({"rounds": 3, "final_accuracy": 0.33})
    rounds, logged_config, summary = tensorboard_run(
        tmp_path / "tracker" / "tensorboard" / tmp_path.name)
    assert rounds == float32({1: {"accuracy": 0.1}, 2: {"accuracy": 0.2}, 3: {"accuracy": 0.33}})
    assert logged_config == config and summary == {"rounds": 3, "final_accuracy": 0.33}


def test_a_wandb_file_cut_short_holds_the_rounds_before_the_cut(tmp_path, monkeypatch):
    """What a killed run leaves: a file cut anywhere (W&B writes it every
    second), down to its header only (nothing written yet); a resume logs
    the rest."""
    import wandb

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    config = _config(tracker="wandb")
    tracking = trackers.open_tracking(config)
    tracking.start(config, tmp_path, [{"round": n, "loss": 1.0 / n} for n in (1, 2, 3)])
    tracking.finish({"rounds": 3})
    assert not tracking.failed
    run_id = _state(tmp_path)["wandb"]["id"]
    directory = tmp_path / "tracker"
    wandb.teardown()  # finish() returns before W&B's service has written the whole file
    assert last_step(directory, run_id) == 3
    [path] = (directory / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
    data, steps = path.read_bytes(), {}
    for cut in range(len(data), 6, -5):
        path.write_bytes(data[:cut])
        steps[cut] = last_step(directory, run_id)
    assert list(steps.values()) == sorted(steps.values(), reverse=True)
    assert set(steps.values()) == {3, 2, 1, 0}

    # killed with 2 rounds in the file, though W&B had been told of 3: the
    # resumed run continues the same W&B run and logs round 3 again, once
    path.write_bytes(data[:max(cut for cut, step in steps.items() if step == 2)])
    resumed = trackers.open_tracking(config)
    resumed.start(config, tmp_path, [{"round": n, "loss": 1.0 / n} for n in (1, 2, 3)])
    resumed.finish({"rounds": 3})
    wandb.teardown()
    rounds, _, _, _ = wandb_run(directory, run_id)  # asserts no step twice
    assert rounds == {n: {"loss": 1.0 / n} for n in (1, 2, 3)}
    assert _state(tmp_path)["wandb"] == {"id": run_id, "logged": 3}
