"""``fedlora generate RUN --prompt TEXT``: the run's model's greedy reply."""

from __future__ import annotations

import json

import pytest
import torch
from trained_runs import finished_run
from transformers import AutoModelForCausalLM, AutoTokenizer

from fedlora.commands import cli
from fedlora.learning.generation import prompt_ids
from fedlora.learning.tasks import templates

TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.mark.slow
def test_the_reply_is_the_greedy_continuation_of_the_runs_model(tmp_path, tiny_llama,
                                                               topic_dataset, capsys):
    run = finished_run(tmp_path / "run", tiny_llama, topic_dataset, base_change=True)
    assert cli.main(["generate", str(run), "--prompt", "markets rallied today",
                     "--max-new-tokens", "4"]) == 0
    printed = capsys.readouterr().out.strip()
    # by hand: the run's model (fedlora evaluate's way) and four argmax steps
    from fedlora.commands.runmodel import load_run_model

    _, model = load_run_model(run)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    ids = tokenizer("markets rallied today", return_tensors="pt")["input_ids"]
    start = ids.shape[1]
    with torch.no_grad():
        for _ in range(4):
            logits = model.peft(input_ids=ids).logits
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert printed == tokenizer.decode(ids[0, start:], skip_special_tokens=True).strip()
    # the adapter (and base change) are used: the base alone scores differently
    base = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    with torch.no_grad():
        assert not torch.equal(base(input_ids=ids).logits, model.peft(input_ids=ids).logits)


@pytest.mark.slow
def test_an_sft_run_is_asked_as_its_examples_were_written(tmp_path, tiny_llama,
                                                          topic_dataset, capsys):
    run = finished_run(tmp_path / "run", tiny_llama, topic_dataset, task="sft",
                       **{"sft-template": "alpaca"})
    summary = json.loads((run / "summary.json").read_text())  # free text: no classes,
    (run / "summary.json").write_text(json.dumps({**summary, "label_names": []}))
    config = json.loads((run / "config.json").read_text())  # and the data is not read
    (run / "config.json").write_text(json.dumps({**config, "dataset": str(run / "gone")}))
    assert cli.main(["generate", str(run), "--prompt", "markets rallied today",
                     "--max-new-tokens", "4"]) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out.strip()
    from fedlora.commands.runmodel import load_run_model

    _, model = load_run_model(run)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    turn = [{"role": "user", "content": "markets rallied today"}]
    ids = torch.tensor([templates.prompt_ids("alpaca", tokenizer, turn, "")])
    assert "instruction : markets" in tokenizer.decode(ids[0]).lower()  # the run's template
    start = ids.shape[1]
    with torch.no_grad():
        for _ in range(4):
            logits = model.peft(input_ids=ids).logits
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert printed == tokenizer.decode(ids[0, start:], skip_special_tokens=True).strip()


def test_a_chat_template_frames_the_prompt_as_a_user_turn(tiny_llama):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    plain = prompt_ids(tokenizer, "hello there")
    assert tokenizer.decode(plain["input_ids"][0]) == "[CLS] hello there [SEP]"
    tokenizer.chat_template = TEMPLATE
    framed = tokenizer.decode(prompt_ids(tokenizer, "hello there")["input_ids"][0])
    assert "user" in framed and framed.rstrip().endswith("assistant | >")
    assert framed != tokenizer.decode(plain["input_ids"][0])


def test_generate_refuses_in_one_line(tmp_path, tiny_bert, topic_dataset, capsys):
    run = finished_run(tmp_path / "run", tiny_bert, topic_dataset)
    for args, words in ((["--max-new-tokens", "0"], "--max-new-tokens: must be >= 1, got 0"),
                        ([], "a seq-cls run (a classifier) cannot generate text")):
        code = cli.main(["generate", str(run), "--prompt", "hi", *args])
        err = capsys.readouterr().err
        assert code == 2 and len(err.splitlines()) == 1 and words in err, err
