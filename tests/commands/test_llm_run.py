"""A real ``fedlora simulate`` of a decoder with the LLM keys together
(cosine lr-schedule, gradient checkpointing, save-every) under a strategy that
changes the base (fedex), then ``export --merge`` and ``generate`` on what it
left, each as a user would run them."""

from __future__ import annotations

import json

import pytest
import torch
from runs import check_run, run_fedlora
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from fedlora.wire.basedelta import BASE_DELTA_FILE


@pytest.mark.e2e
@pytest.mark.slow
def test_a_decoder_run_snapshots_exports_and_generates(tmp_path, tiny_llama, topic_dataset):
    from fedlora.commands.runmodel import load_run_model

    check_run(tmp_path, tiny_llama, topic_dataset, strategy="fedex", task="causal-lm",
              **{"save-every": 1, "lr-schedule": "cosine", "lr-min": 0.001,
                 "gradient-checkpointing": "true", "max-seq-len": 48})
    run = tmp_path / "run"
    # a snapshot per round; the last one is the run's final adapter and base change
    assert sorted(p.name for p in (run / "snapshots").iterdir()) == ["round-1", "round-2"]
    last = run / "snapshots" / "round-2"
    assert ((last / "adapter" / "adapter_model.safetensors").read_bytes()
            == (run / "adapter" / "adapter_model.safetensors").read_bytes())
    assert (last / BASE_DELTA_FILE).read_bytes() == (run / BASE_DELTA_FILE).read_bytes()
    first = load_file(str(run / "snapshots" / "round-1" / BASE_DELTA_FILE))
    assert any(not torch.equal(v, load_file(str(run / BASE_DELTA_FILE))[k])
               for k, v in first.items())  # round 1's base, not the final one

    merged = tmp_path / "merged"
    done = run_fedlora(tmp_path, "export", str(run), "--merge", str(merged))
    assert done.returncode == 0, done.stderr[-2000:]
    ids = torch.tensor([[101, 2652, 2136, 3398, 102]])
    _, model = load_run_model(run)
    with torch.no_grad():
        expected = model.peft.eval()(input_ids=ids).logits
        got = AutoModelForCausalLM.from_pretrained(merged).eval()(input_ids=ids).logits
    assert torch.allclose(got, expected, atol=1e-5, rtol=0)
    early = tmp_path / "round-1"
    done = run_fedlora(tmp_path, "export", str(run), "--round", "1", "--merge", str(early))
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((early / "config.json").read_text())["architectures"] == [
        "LlamaForCausalLM"]

    said = run_fedlora(tmp_path, "generate", str(run), "--prompt", "team won the match",
                       "--max-new-tokens", "3")
    assert said.returncode == 0 and said.stdout.strip(), said.stderr[-2000:]
