"""``fedlora simulate --set task=sft`` as a user runs it (a child process,
real Ray), on an Alpaca-style JSONL and the tiny decoder with a chat
template; ``fedlora evaluate`` must then reproduce the final metrics
exactly, and ``report`` reads the run's primary metric."""

from __future__ import annotations

import json

import pytest
from conftest import write_alpaca
from processes import ours, stop, watch
from runs import FEDLORA, _env, run_fedlora

SFT_METRICS = ("eval_loss", "perplexity", "token_accuracy", "exact_match")


@pytest.mark.e2e
def test_sft_simulation_and_evaluate_reproduces_it(tmp_path, tiny_chat_llama):
    dataset = write_alpaca(tmp_path / "alpaca.jsonl", 60)
    out = tmp_path / "run"
    settings = {"task": "sft", "model": str(tiny_chat_llama), "dataset": str(dataset),
                "partition": "iid", "num-clients": 3, "clients-per-round": 2, "rounds": 2,
                "local-steps": 3, "batch-size": 4, "max-seq-len": 48, "lr": 0.01,
                "max-new-tokens": 4, "federated-eval": "true"}
    env, log = _env(tmp_path), tmp_path / "simulate.log"
    command = [*FEDLORA, "simulate", "--set", *[f"{k}={v}" for k, v in settings.items()],
               "--out", str(out)]
    try:
        code, _, _ = watch(command, env, env["FLWR_HOME"], log, timeout=600)
    finally:
        stop(ours(env["FLWR_HOME"]))
    output = log.read_text()
    assert code == 0, output[-3000:]
    lines = [line for line in output.splitlines() if line.startswith("round ")]
    assert len(lines) == 2 and all(" exact_match " in line and " ppl " in line
                                   for line in lines), lines
    assert "done: final exact match" in output

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [list(row)[:5] for row in rows] == [["round", *SFT_METRICS]] * 2
    assert all(row["clients"] == 2 and row["fed_clients"] == 2 for row in rows)
    assert all(0 <= row["fed_exact_match"] <= 1 for row in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["primary_metric"] == "exact_match"
    assert summary["primary_direction"] == "higher"
    assert {f"final_{name}" for name in SFT_METRICS} <= set(summary)
    assert summary["final_client_exact_match"] == rows[-1]["fed_exact_match"]

    evaluated = run_fedlora(tmp_path, "evaluate", str(out))
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    report = json.loads(evaluated.stdout.strip().splitlines()[-1])
    assert {name: report[name] for name in SFT_METRICS} == {
        name: summary[f"final_{name}"] for name in SFT_METRICS}

    reported = run_fedlora(tmp_path, "report", str(out), "--out", str(tmp_path / "report"))
    assert reported.returncode == 0, reported.stderr[-3000:]
    assert "| final exact_match | best exact_match |" in reported.stdout
