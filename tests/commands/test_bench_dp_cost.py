"""simulations/bench_dp_cost.py on a tiny model: one line per setting, the
DP settings really run DP-SGD (their clients report ε), and bad repeats are
refused before anything runs."""

from __future__ import annotations

import json

import pytest
from scripts import simulation_script


@pytest.fixture(scope="module")
def bench():
    return simulation_script("bench_dp_cost")


@pytest.mark.slow
def test_one_line_per_setting_relative_to_no_dp(bench, tiny_bert, topic_dataset, capsys):
    assert bench.main(["--set", f"model={tiny_bert}", f"dataset={topic_dataset}",
                       "local-steps=2", "--repeats", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {row["setting"]: row for row in map(json.loads, lines)}
    assert set(rows) == {"fedavg", "fedavg-dp", "ffa", "ffa-dp"}
    for row in rows.values():
        assert row["repeats"] == 2 and row["round_s"] >= row["compute_s"] > 0
    assert rows["fedavg"]["vs_no_dp"] == rows["ffa"]["vs_no_dp"] == 1.0
    # on a tiny model Opacus's per-round attach and accounting dominate
    assert rows["fedavg-dp"]["vs_no_dp"] > 1 and rows["ffa-dp"]["vs_no_dp"] > 1


@pytest.mark.slow
def test_dp_settings_spend_epsilon(bench, tiny_bert, topic_dataset):
    from fedlora.node.client_loop import handle_train as train
    from fedlora.strategies import resolve

    config = resolve({**bench.BENCH_KEYS, **bench.SETTINGS["ffa-dp"], "model": str(tiny_bert),
                      "dataset": str(topic_dataset), "local-steps": 2})
    reply = train(bench.training_message(config, 1), bench.client_context())
    assert reply.content.metric_records["metrics"]["epsilon"] > 0


def test_more_repeats_than_planned_rounds_are_refused(bench, tiny_bert, topic_dataset):
    with pytest.raises(SystemExit) as stop:
        bench.main(["--set", f"model={tiny_bert}", f"dataset={topic_dataset}",
                    "--repeats", "9"])
    assert stop.value.code == 2
