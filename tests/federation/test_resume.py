"""Where a resumed run starts (``fedlora.federation.resume``): its own config, the
rounds after its checkpoint, metrics.jsonl cut back to them, and the
refusals, each in one line."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from fedlora.commands.cli import main
from fedlora.core.config import ConfigError
from fedlora.federation import checkpoint
from fedlora.federation.checkpoint import Checkpoint
from fedlora.federation.results import RunWriter
from fedlora.federation.resume import check_unchanged, saved_config, start_run
from fedlora.strategies import resolve


@pytest.fixture
def interrupted(tmp_path, tiny_bert, topic_dataset):
    """A run directory stopped during round 3: rounds 1-2 checkpointed, a
    metrics line of round 3 and half a line after it."""
    run = tmp_path / "run"
    config = resolve({"model": str(tiny_bert), "dataset": str(topic_dataset),
                      "strategy": "cellm", "rounds": 4, "out-dir": str(run)})
    writer = RunWriter(run, config)
    for server_round in (1, 2, 3):
        writer.add_round({"round": server_round, "accuracy": 0.5})
    with (run / "metrics.jsonl").open("a") as handle:
        handle.write('{"round": 4, "accur')
    checkpoint.save(run, Checkpoint(2, "ab12", "aa:1", {"x": np.zeros(2, np.float32)}))
    return run, config


def test_a_resume_goes_on_after_the_checkpoint(interrupted):
    run, config = interrupted
    start = start_run(resolve({"resume-from": str(run)}), run.parent / "unused")
    assert start.out_dir == run and start.completed == 2 and start.run_id == "ab12"
    assert start.config["strategy"] == "cellm" and start.config["rounds"] == 4
    assert str(start.lineage).startswith("aa:1,") and str(start.lineage).endswith(":3")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [row["round"] for row in rows] == [1, 2]  # round 3 runs again
    assert [row["round"] for row in start.writer.rounds] == [1, 2]


def test_flwr_run_resumes_with_the_saved_config_and_says_what_it_ignored(interrupted, caplog):
    run, _ = interrupted
    given = resolve({"resume-from": str(run), "strategy": "fedavg", "round-timeout": 30.0})
    with caplog.at_level(logging.WARNING, logger="fedlora.federation.resume"):
        start = start_run(given, run.parent / "unused")
    assert start.config["strategy"] == "cellm"  # the run's own
    assert start.config["round-timeout"] == 30.0  # free to change
    assert "strategy='fedavg'" in caplog.text and "round-timeout" not in caplog.text


def test_a_run_stopped_in_round_one_starts_again(interrupted):
    run, _ = interrupted
    (run / checkpoint.CHECKPOINT_FILE).unlink()
    start = start_run(resolve({"resume-from": str(run)}), run.parent / "unused")
    assert start.completed == 0 and start.writer.rounds == []
    assert (run / "metrics.jsonl").read_text() == ""
    # a new attempt alone in the lineage: nothing its clients saved before is read
    assert [first for _, first in start.lineage.entries] == [1]
    assert start.lineage.current != "aa"


def test_metrics_missing_a_checkpointed_round_are_refused(interrupted):
    run, _ = interrupted
    (run / "metrics.jsonl").write_text('{"round": 2}\n')
    with pytest.raises(ConfigError, match="rounds 1..2"):
        start_run(resolve({"resume-from": str(run)}), run.parent / "unused")


def test_a_finished_run_or_a_stray_directory_is_refused(interrupted, tmp_path):
    run, _ = interrupted
    with pytest.raises(ConfigError, match="no config.json"):
        saved_config(tmp_path)
    (run / "summary.json").write_text("{}")
    with pytest.raises(ConfigError, match="the run finished"):
        saved_config(run)


def test_a_set_that_would_change_the_run_is_refused(interrupted):
    run, _ = interrupted
    saved = saved_config(run)
    check_unchanged(saved, {"round-timeout": 5, "ray-address": "auto", "rounds": 4})
    for key, value in (("rounds", 5), ("strategy", "fedavg"), ("seed", 2)):
        with pytest.raises(ConfigError, match=f"config key '{key}': a resumed run keeps"):
            check_unchanged(saved, {key: value})


@pytest.mark.parametrize("argv, message", [
    (["--set", "lr=0.5"], "config key 'lr': a resumed run keeps"),
    (["--out", "elsewhere"], "no --out or --config"),
])
def test_simulate_resume_refuses_in_one_line(interrupted, capsys, argv, message):
    run, _ = interrupted
    assert main(["simulate", "--resume", str(run), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_simulate_refuses_resume_from_as_a_key(tmp_path, capsys):
    assert main(["simulate", "--set", "resume-from='x'", "--out", str(tmp_path / "o")]) == 2
    assert "--resume DIR" in capsys.readouterr().err


def test_a_new_run_into_an_unfinished_one_points_to_resume(interrupted, capsys):
    run, _ = interrupted
    assert main(["simulate", "--out", str(run)]) == 2
    assert f"fedlora simulate --resume {run}" in capsys.readouterr().err


def test_a_checkpoint_that_does_not_fit_the_model_is_refused(interrupted):
    """The fixture's checkpoint holds a 2-vector, not this model's adapter."""
    from fedlora.federation.round import ServerRound
    from fedlora.learning.features import model_for
    from fedlora.strategies import strategy_class

    run, config = interrupted
    server = ServerRound(strategy_class("cellm")(config, model_for(config).initial_state))
    with pytest.raises(ConfigError, match="does not fit this run's model"):
        server.load_state_dict(checkpoint.load(run).server_state())
