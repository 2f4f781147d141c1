"""``fedlora export RUN --merge OUT``: a plain Hugging Face model whose logits
are the run's (PEFT adapter on the base, the base change added), within 1e-5."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import LABEL_WORDS
from peft import PeftModel
from safetensors.torch import load_file
from trained_runs import finished_run
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from fedlora.commands import cli
from fedlora.wire.basedelta import BASE_DELTA_FILE

IDS = torch.tensor([[101, 2054, 2003, 1996, 3007, 1997, 2605, 102],
                    [101, 7592, 2088, 2003, 2307, 102, 0, 0]])
MASK = (IDS != 0).long()


def _reference(run, model_dir, auto_class, with_delta=True, **load):
    """The run's model the PEFT way, independently of fedlora: the base, its
    change added by hand, the adapter loaded with PeftModel.from_pretrained."""
    base = auto_class.from_pretrained(model_dir, **load)
    delta = run / BASE_DELTA_FILE
    if with_delta and delta.is_file():
        params = dict(base.named_parameters())
        with torch.no_grad():
            for name, change in load_file(str(delta)).items():
                params[name].add_(change)
    return PeftModel.from_pretrained(base, run / "adapter").eval()


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS, attention_mask=MASK).logits


def _one_error_line(capsys, code):
    err = capsys.readouterr().err
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("fedlora: error: ") and "Traceback" not in err
    return err.strip()


@pytest.mark.slow
@pytest.mark.parametrize("base_change", [False, True], ids=["fedavg", "fedex"])
def test_a_merged_decoder_gives_the_runs_logits(tmp_path, tiny_llama, topic_dataset, capsys,
                                                base_change):
    run = finished_run(tmp_path / "run", tiny_llama, topic_dataset, base_change=base_change)
    out = tmp_path / "merged"
    assert cli.main(["export", str(run), "--merge", str(out)]) == 0
    assert f"to {out}" in capsys.readouterr().out
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    expected = _logits(_reference(run, tiny_llama, AutoModelForCausalLM))
    assert torch.allclose(_logits(merged), expected, atol=1e-5, rtol=0)
    # the adapter (and the base change) matter at this tolerance: a merge that
    # dropped either would fail above
    without = _logits(AutoModelForCausalLM.from_pretrained(tiny_llama).eval())
    assert (without - expected).abs().max() > 1e-3
    if base_change:
        no_delta = _logits(_reference(run, tiny_llama, AutoModelForCausalLM, with_delta=False))
        assert (no_delta - expected).abs().max() > 1e-3
    assert (out / "tokenizer_config.json").is_file()
    assert not list(tmp_path.glob(".merged*"))  # no temporary directory left


@pytest.mark.slow
def test_a_merged_classifier_keeps_its_head_and_names_its_classes(tmp_path, tiny_bert,
                                                                  topic_dataset):
    run = finished_run(tmp_path / "run", tiny_bert, topic_dataset)
    out = tmp_path / "merged"
    assert cli.main(["export", str(run), "--merge", str(out)]) == 0
    merged = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert merged.config.id2label == dict(enumerate(LABEL_WORDS))
    expected = _logits(_reference(run, tiny_bert, AutoModelForSequenceClassification,
                                  num_labels=len(LABEL_WORDS)))
    assert torch.allclose(_logits(merged), expected, atol=1e-5, rtol=0)


def test_export_refuses_in_one_line(tmp_path, tiny_bert, topic_dataset, capsys):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "file").write_text("x")
    code = cli.main(["export", str(tmp_path / "nowhere"), "--merge", str(tmp_path / "o")])
    assert "not a run directory (no config.json)" in _one_error_line(capsys, code)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"model": str(tiny_bert)}))
    code = cli.main(["export", str(run), "--merge", str(tmp_path / "o")])
    assert "not a finished run (no summary.json)" in _one_error_line(capsys, code)
    code = cli.main(["export", str(run), "--merge", str(taken)])
    assert f"--merge {taken}: exists and is not empty" in _one_error_line(capsys, code)
    code = cli.main(["export", str(run), "--round", "3", "--merge", str(tmp_path / "o")])
    assert "no snapshot of round 3 (snapshots: none; see save-every)" in _one_error_line(
        capsys, code)
    assert not (tmp_path / "o").exists()


def _free_text_sft(run):
    """``run`` as an sft run on free text leaves it: no classes in summary.json,
    and a dataset that export and generate must not need (it is gone)."""
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({**summary, "label_names": []}))
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "dataset": str(run / "gone")}))
    return run


@pytest.mark.slow
def test_an_sft_run_merges_like_a_decoder(tmp_path, tiny_llama, topic_dataset, capsys):
    run = _free_text_sft(finished_run(tmp_path / "run", tiny_llama, topic_dataset, task="sft"))
    out = tmp_path / "merged"
    assert cli.main(["export", str(run), "--merge", str(out)]) == 0, capsys.readouterr().err
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    expected = _logits(_reference(run, tiny_llama, AutoModelForCausalLM))
    assert torch.allclose(_logits(merged), expected, atol=1e-5, rtol=0)
