"""``task=sft`` end to end under every strategy × {no DP, dp=local,
robust=median}, on the tiny decoder with a chat template.

One process per case (``fedlora simulate``: Ray, a SuperLink) costs 30-120 s
here, 30 cases an hour; so the matrix runs the server's round loop
(``run_federation``) and the client loop (``handle_train``,
``handle_evaluate``) in this process, with a grid that hands each message to
the client loop at once: the same code on both sides, without the transport
(``test_sft_run.py`` runs the real command). About 2-4 s a case.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import write_alpaca
from fakes import InProcessGrid

from fedlora.federation.loop import run_federation
from fedlora.strategies import resolve, strategies, strategy_class

MODES = {"plain": {}, "dp-local": {"dp": "local", "dp-noise-multiplier": 0.5,
                                   "dp-seeded-noise": True},
         "median": {"robust": "median"}}
SFT_METRICS = ("eval_loss", "perplexity", "token_accuracy", "exact_match")


@pytest.fixture(scope="module")
def alpaca(tmp_path_factory) -> Path:
    return write_alpaca(tmp_path_factory.mktemp("alpaca") / "train.jsonl", 40)


@pytest.mark.e2e
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("strategy", list(strategies()))
def test_sft_runs_under_every_strategy(strategy, mode, tiny_chat_llama, alpaca, tmp_path,
                                       run_identity):
    config = resolve({"task": "sft", "model": str(tiny_chat_llama), "dataset": str(alpaca),
                      "strategy": strategy, "partition": "iid", "num-clients": 2,
                      "clients-per-round": 2, "rounds": 1, "local-steps": 2,
                      "batch-size": 4, "max-seq-len": 48, "eval-examples": 4,
                      "max-new-tokens": 3, "lr": 0.01, "out-dir": str(tmp_path / "run"),
                      **MODES[mode]})
    summary = run_federation(InProcessGrid([11, 12]), config, simulation=True)
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    assert row["clients"] == 2 and row["rejected"] == 0, row
    assert list(row)[1:5] == list(SFT_METRICS) and "accuracy" not in row
    assert all(math.isfinite(row[name]) for name in SFT_METRICS)
    assert 0 <= row["exact_match"] <= 1 and 0 <= row["token_accuracy"] <= 1
    assert row["perplexity"] == pytest.approx(math.exp(row["eval_loss"]))
    assert (row["epsilon"] is not None) == (mode == "dp-local")
    prefix = strategy_class(strategy).evaluation_prefix(config)
    if prefix:  # a strategy with personal parts evaluates on the clients too
        assert row[f"{prefix}_clients"] == 2 and 0 <= row[f"{prefix}_exact_match"] <= 1
    assert summary["primary_metric"] == "exact_match"
    assert summary["primary_direction"] == "higher"
    assert summary["final_exact_match"] == summary["best_exact_match"] == row["exact_match"]
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
