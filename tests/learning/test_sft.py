"""``task=sft``: instruction data in every shape, templates, encoding with the
loss on the response, truncation, the per-example loss for DP, metrics on
hand-computed cases, and one-line errors for malformed rows."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import LABEL_WORDS, write_alpaca

from fedlora.core.config import ConfigError
from fedlora.learning import features
from fedlora.learning.tasks import instructions as inst
from fedlora.learning.tasks import task_for, templates
from fedlora.learning.tasks.sft import (
    IGNORE,
    join,
    normalise,
    response_stats,
    targets_of,
    token_losses,
)
from fedlora.learning.tasks.templates import ALPACA_PREAMBLE, ALPACA_PREAMBLE_INPUT
from fedlora.strategies import resolve


def _config(model: Path, dataset: Path, **keys):
    return resolve({"task": "sft", "model": str(model), "dataset": str(dataset),
                    "partition": "iid", "num-clients": 2, "clients-per-round": 2,
                    "max-seq-len": 64, **keys})


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


# ------------------------------------------------------------ pure pieces by hand

def test_join_keeps_the_prompt_head_its_closing_and_a_short_response_whole():
    assert join([1, 2, 3], [4, 5, 9], 10) == ([1, 2, 3, 4, 5, 9], 3)  # fits
    assert join([1, 2, 3], [4, 5, 9], 5) == ([1, 2, 3, 4, 5], 3)  # response cut
    # a long prompt is cut to its head and closing; a short response stays whole
    assert join(list(range(10)), [4, 9], 6, [98, 99]) == ([0, 1, 98, 99, 4, 9], 4)
    assert join(list(range(10)), [4, 9], 5) == ([0, 1, 2, 4, 9], 3)
    # a long response keeps half, and at least one token, whatever the prompt
    assert join(list(range(10)), list(range(20, 30)), 6, [98, 99]) == (
        [0, 98, 99, 20, 21, 22], 3)
    assert join(list(range(10)), list(range(20, 30)), 2) == ([0, 20], 1)
    assert join([1, 2, 3], [4, 9], 4) == ([1, 2, 4, 9], 2)


def test_targets_cover_the_response_only():
    ids = torch.tensor([[5, 6, 7, 8], [5, 6, 7, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    assert targets_of(ids, mask, [2, 1]).tolist() == [[IGNORE, IGNORE, 7, 8],
                                                      [IGNORE, 6, 7, IGNORE]]


def test_response_stats_by_hand():
    """Vocabulary of 3; logits at t predict the target at t + 1. Row 0's
    response is tokens 2 and 0; row 1's token 1."""
    logits = torch.log(torch.tensor([
        [[0.1, 0.2, 0.7], [0.5, 0.25, 0.25], [0.3, 0.3, 0.4]],
        [[0.2, 0.6, 0.2], [0.9, 0.05, 0.05], [1 / 3, 1 / 3, 1 / 3]],
    ]))
    targets = torch.tensor([[IGNORE, 2, 0], [IGNORE, 1, IGNORE]])
    nll, hits, count = response_stats(logits, targets)
    assert count == 3
    assert nll == pytest.approx(-(math.log(0.7) + math.log(0.5) + math.log(0.6)), rel=1e-6)
    assert hits == 3  # argmax 2, 0 and 1: all right
    wrong = torch.tensor([[IGNORE, 0, 1], [IGNORE, 1, IGNORE]])
    assert response_stats(logits, wrong)[1] == 1


def test_per_example_loss_is_the_mean_of_each_examples_mean():
    """A long answer counts as one example under dp=local, not as its tokens."""
    logits = torch.randn(2, 5, 7, generator=torch.Generator().manual_seed(0))
    targets = torch.tensor([[IGNORE, 1, 2, 3, 4], [IGNORE, IGNORE, IGNORE, IGNORE, 6]])
    nll, counted = token_losses(logits, targets)
    long, short = nll[0, :4].mean(), nll[1, 3]
    per_example = (nll.sum(dim=1) / counted.sum(dim=1)).mean()
    assert float(per_example) == pytest.approx(float((long + short) / 2))
    assert float(nll.sum() / counted.sum()) == pytest.approx(float((4 * long + short) / 5))


@pytest.mark.parametrize("said, meant", [
    ("The capital of France is Paris.", "the capital of france is paris"),
    ("  sci / tech!! ", "Sci / Tech"),
    ("Sports\n", "sports."),
])
def test_exact_match_normalises_case_whitespace_and_trailing_punctuation(said, meant):
    assert normalise(said) == normalise(meant)
    assert normalise("paris, france") != normalise("paris france")


def test_exact_match_counts_replies_equal_to_the_reference(tiny_chat_llama, tmp_path,
                                                           monkeypatch):
    """Greedy replies (here given) against references, normalised, both read
    back through the tokenizer (WordPiece spells 'Sci/Tech' 'sci / tech')."""
    data = _jsonl(tmp_path / "d.jsonl", [{"prompt": f"q{i}", "response": r} for i, r in
                                          enumerate(["Sci/Tech.", "World", "Paris", "x"] * 3)])
    config = _config(tiny_chat_llama, data, **{"eval-examples": 0})
    task, model = task_for(config), features.model_for(config)
    test = features.encoded_splits(config).test
    said = {"sci/tech": "sci / tech", "world": "WORLD!", "paris": "paris is", "x": "x"}
    monkeypatch.setattr(type(task), "generate", lambda self, model, prompts: [
        model.tokenizer(said[normalise(r)], add_special_tokens=False)["input_ids"]
        for r in test["response"]])
    right = sum(normalise(r) in ("sci/tech", "world", "x") for r in test["response"])
    assert task.exact_match(model, test) == right / len(test)


# ------------------------------------------------------------------ data shapes

def test_alpaca_jsonl_with_optional_input(tmp_path):
    path = _jsonl(tmp_path / "alpaca.jsonl", [
        {"instruction": "Add", "input": "2 and 2", "output": "4"},
        {"instruction": "Name a colour", "output": "Blue"},
    ] * 10)
    splits = inst.load_instructions(_config("unused", path))
    assert splits.label_names == () and splits.partition_by is None
    rows = splits.train.to_list() + splits.test.to_list()
    assert len(rows) == 20 and len(splits.test) == 2
    add = next(r for r in rows if r["response"] == "4")
    assert add["messages"] == [{"role": "user", "content": "Add"}] and add["input"] == "2 and 2"
    assert next(r for r in rows if r["response"] == "Blue")["input"] == ""


def test_prompt_response_csv_and_named_columns(tmp_path):
    pd.DataFrame({"q": ["what?"] * 10, "a": ["this"] * 10}).to_csv(tmp_path / "qa.csv",
                                                                   index=False)
    with pytest.raises(ConfigError, match="cannot detect instruction data.*prompt-column"):
        inst.load_instructions(_config("unused", tmp_path / "qa.csv"))
    splits = inst.load_instructions(_config("unused", tmp_path / "qa.csv", **{
        "prompt-column": "q", "response-column": "a"}))
    assert splits.train[0]["messages"] == [{"role": "user", "content": "what?"}]
    assert splits.train[0]["response"] == "this"


def test_chat_messages_directory_and_parquet(tmp_path):
    conversation = [{"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello."},
                    {"role": "user", "content": "Capital of France?"},
                    {"role": "assistant", "content": "Paris."}]
    folder = tmp_path / "chat"
    folder.mkdir()
    _jsonl(folder / "train.jsonl", [{"messages": conversation}] * 4)
    pd.DataFrame({"messages": [conversation] * 2}).to_parquet(tmp_path / "test.parquet")
    _jsonl(folder / "test.jsonl", [{"messages": conversation}] * 2)
    splits = inst.load_instructions(_config("unused", folder))
    assert len(splits.train) == 4 and len(splits.test) == 2
    assert splits.train[0]["messages"] == conversation[:-1]
    assert splits.train[0]["response"] == "Paris."
    parquet = inst.load_instructions(_config("unused", tmp_path / "test.parquet"))
    assert (parquet.train.to_list() + parquet.test.to_list())[0]["response"] == "Paris."


def test_an_empty_response_is_dropped_and_counted(tmp_path, caplog):
    path = _jsonl(tmp_path / "gaps.jsonl", [{"prompt": "a", "response": "yes"}] * 8 + [
        {"prompt": "b", "response": ""}, {"prompt": "c", "response": "  "},
        {"prompt": "d"}])
    with caplog.at_level(logging.WARNING, logger="fedlora"):
        splits = inst.load_instructions(_config("unused", path))
    assert len(splits.train) + len(splits.test) == 8
    assert "3 examples with an empty response dropped" in caplog.text


@pytest.mark.parametrize("row, line, problem", [
    ({"messages": [{"role": "user", "content": "x"}, {"role": "bot", "content": "y"}]},
     3, "message 2 has role 'bot'"),
    ({"messages": [{"role": "user", "content": "x"}]}, 3, "last message is not the assistant"),
    ({"messages": "hello"}, 3, "not a non-empty list"),
    ({"messages": [{"role": "assistant", "content": "y"}]}, 3, "no user message"),
])
def test_a_malformed_chat_row_is_one_line_naming_file_and_row(tmp_path, row, line, problem):
    good = {"messages": [{"role": "user", "content": "x"}, {"role": "assistant",
                                                              "content": "y"}]}
    path = _jsonl(tmp_path / "chat.jsonl", [good, good, row, good])
    with pytest.raises(ConfigError) as err:
        inst.load_instructions(_config("unused", path))
    message = str(err.value)
    assert "\n" not in message and f"{path}, row {line}:" in message and problem in message


def test_a_missing_prompt_names_the_csv_row_counting_the_header(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text("prompt,response\nhi,there\n,orphan\n")
    with pytest.raises(ConfigError, match=rf"{path}, row 3: empty prompt \(column 'prompt'\)"):
        inst.load_instructions(_config("unused", path))


def test_labelled_data_runs_as_instructions(topic_dataset):
    config = _config("unused", topic_dataset, **{"sft-prompt": "Topic of {text}? ({classes})",
                                                 "partition": "dirichlet"})
    splits = inst.load_instructions(config)
    assert splits.label_names == LABEL_WORDS and splits.partition_by == "label"
    row = splits.train[0]
    text = row["messages"][0]["content"]
    assert text.startswith("Topic of ") and text.endswith(f"? ({', '.join(LABEL_WORDS)})")
    assert row["response"] == LABEL_WORDS[row["label"]]
    with pytest.raises(ConfigError, match="'sft-prompt'.*no \\{text\\}"):
        inst.load_instructions(_config("unused", topic_dataset, **{"sft-prompt": "Topic?"}))


def test_natural_partition_by_client_column(tiny_chat_llama, tmp_path):
    path = _jsonl(tmp_path / "users.jsonl", [
        {"prompt": f"q{i}", "response": f"a{i}", "user": f"u{i % 3}"} for i in range(30)])
    config = _config(tiny_chat_llama, path, partition="natural", **{
        "client-column": "user", "num-clients": 3})
    clients = [features.client_dataset(config, i) for i in range(3)]
    assert sorted(len(set(c["user"])) for c in clients) == [1, 1, 1]
    assert sum(map(len, clients)) == len(features.encoded_splits(config).train)
    with pytest.raises(ConfigError, match="'num-clients': 2.*names 3 clients"):
        features.partitioner_for(_config(tiny_chat_llama, path, partition="natural", **{
            "client-column": "user"}))
    with pytest.raises(ConfigError, match="'partition': dirichlet cuts by label"):
        features.partitioner_for(_config(tiny_chat_llama, path, partition="dirichlet"))


def test_label_flip_is_refused_for_free_text(tiny_chat_llama, tmp_path):
    path = write_alpaca(tmp_path / "alpaca.jsonl", 40)
    config = _config(tiny_chat_llama, path, attack="label-flip")
    with pytest.raises(ConfigError, match="'attack': label-flip needs labelled data"):
        features.partitioner_for(config)


def test_label_flip_swaps_the_response_of_labelled_instructions(tiny_chat_llama,
                                                                topic_dataset):
    from fedlora.learning.attacks import flip_labels

    config = _config(tiny_chat_llama, topic_dataset, attack="label-flip")
    task, model = task_for(config), features.model_for(config)
    data = features.encoded_splits(config).train.select(range(20))
    flipped = flip_labels(data, task, model)
    for row, new in zip(data, flipped):
        start, y = row["prompt_len"], row["label"]
        assert new["label"] == 3 - y and new["response"] == LABEL_WORDS[3 - y]
        assert new["input_ids"][:start] == row["input_ids"][:start]
        assert new["input_ids"][start:] == task.response_ids(model, LABEL_WORDS[3 - y])


# ------------------------------------------------------------- templates, encoding

def test_chat_template_is_the_default_and_the_loss_is_on_the_response(tiny_chat_llama,
                                                                       tmp_path):
    path = _jsonl(tmp_path / "qa.jsonl", [{"instruction": "name the colour", "input": "sky",
                                           "output": "blue"}] * 10)
    config = _config(tiny_chat_llama, path)
    task, model = task_for(config), features.model_for(config)
    tokenizer = model.tokenizer
    row = features.encoded_splits(config).train[0]
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "name the colour\n\nsky"}], tokenize=False,
        add_generation_prompt=True)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert row["input_ids"] == prompt_ids + tokenizer("blue", add_special_tokens=False)[
        "input_ids"] + [tokenizer.eos_token_id]
    assert row["prompt_len"] == len(prompt_ids)
    batch = task.collate([row], model.pad_token_id)
    counted = (batch["targets"] != IGNORE).nonzero()[:, 1].tolist()
    assert counted == list(range(len(prompt_ids), len(row["input_ids"])))  # blue + EOS


def test_alpaca_and_plain_templates(tiny_chat_llama, tiny_llama, tmp_path):
    path = _jsonl(tmp_path / "qa.jsonl", [{"instruction": "Add", "input": "2 and 2",
                                           "output": "4"},
                                          {"instruction": "Say hi", "output": "hi"}] * 5)
    from fedlora.learning.tasks import templates

    messages = [{"role": "user", "content": "Add"}]
    assert templates.prompt_text("alpaca", None, messages, "2 and 2") == (
        ALPACA_PREAMBLE_INPUT + "### Instruction:\nAdd\n\n### Input:\n2 and 2\n\n"
        "### Response:\n")
    assert templates.prompt_text("alpaca", None, messages, "") == (
        ALPACA_PREAMBLE + "### Instruction:\nAdd\n\n### Response:\n")
    assert templates.prompt_text("plain", None, messages, "2 and 2") == "Add\n\n2 and 2\n"
    config = _config(tiny_chat_llama, path, **{"sft-template": "plain"})
    model = features.model_for(config)
    row = features.encoded_splits(config).train[0]
    text = model.tokenizer.decode(row["input_ids"][:row["prompt_len"]])
    assert text in ("add 2 and 2", "say hi")  # WordPiece: lower case, no newlines
    with pytest.raises(ConfigError, match="'sft-template': chat needs a tokenizer with a "
                                          "chat template"):
        features.encoded_splits(_config(tiny_llama, path, **{"sft-template": "chat"}))


def test_truncation_keeps_the_answer_marker_and_a_short_answer(tiny_chat_llama, tmp_path):
    long = " ".join(["word"] * 80)
    path = _jsonl(tmp_path / "long.jsonl", [{"prompt": long, "response": "end"}] * 10)
    config = _config(tiny_chat_llama, path, **{"max-seq-len": 16})
    row = features.encoded_splits(config).train[0]
    model = features.model_for(config)
    answer = task_for(config).response_ids(model, "end")
    closing = templates.closing_ids("chat", model.tokenizer)
    assert len(row["input_ids"]) == 16 and row["prompt_len"] == 16 - len(answer)
    assert row["input_ids"][row["prompt_len"]:] == answer  # the EOS kept
    assert row["input_ids"][:row["prompt_len"]][-len(closing):] == closing


def test_evaluation_metrics_agree_with_their_definitions(tiny_chat_llama, tmp_path):
    path = write_alpaca(tmp_path / "alpaca.jsonl", 60)
    config = _config(tiny_chat_llama, path, **{"max-new-tokens": 3})
    task, model = task_for(config), features.model_for(config)
    test = features.central_test_set(config)
    metrics = task.evaluate(model, test)
    assert list(metrics) == ["eval_loss", "perplexity", "token_accuracy", "exact_match"]
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]))
    batch = task.collate(test.to_list(), model.pad_token_id)
    with torch.no_grad():
        logits = model.peft(input_ids=batch["input_ids"],
                            attention_mask=batch["attention_mask"]).logits
    nll, hits, count = response_stats(logits, batch["targets"])
    assert metrics["eval_loss"] == pytest.approx(nll / count, rel=1e-5)
    assert metrics["token_accuracy"] == hits / count
    assert task.primary.name == "exact_match" and task.primary.higher_is_better
    no_generation = task_for(_config(tiny_chat_llama, path, **{"max-new-tokens": 0}))
    assert no_generation.primary.name == "perplexity"
    assert not no_generation.primary.higher_is_better
    assert "exact_match" not in no_generation.evaluate(model, test)


def test_the_training_loss_is_per_example_under_dp(tiny_chat_llama, tmp_path):
    """Responses of 2 and 6 tokens: without DP the token mean, with it the
    mean of the two examples' own means."""
    path = _jsonl(tmp_path / "qa.jsonl", [{"prompt": "q", "response": "yes"},
                                          {"prompt": "q", "response": "one two three four"}] * 5)
    config = _config(tiny_chat_llama, path)
    task, model = task_for(config), features.model_for(config)
    model.peft.eval()
    rows = features.encoded_splits(config).train.to_list()
    rows = [next(r for r in rows if r["response"] == "yes"),
            next(r for r in rows if r["response"] != "yes")]
    batch = task.collate(rows, model.pad_token_id)
    with torch.no_grad():
        logits = model.peft(input_ids=batch["input_ids"],
                            attention_mask=batch["attention_mask"]).logits
        nll, counted = token_losses(logits, batch["targets"])
        means = [float(nll[i][counted[i]].mean()) for i in range(2)]
        assert counted.sum(dim=1).tolist() == [2, 5]  # the words and EOS
        assert float(task.loss(model, batch, per_example=True)) == pytest.approx(
            sum(means) / 2, rel=1e-5)
        assert float(task.loss(model, batch, per_example=False)) == pytest.approx(
            (2 * means[0] + 5 * means[1]) / 7, rel=1e-5)


def test_a_deployed_node_reads_its_own_instructions(tmp_path):
    node = tmp_path / "node"
    node.mkdir()
    _jsonl(node / "train.jsonl", [{"instruction": "Say hi", "output": "hi"},
                                  {"instruction": "Say no", "output": ""}])
    examples = inst.node_instructions(_config("unused", tmp_path), str(node), ())
    assert examples.to_list() == [{"messages": [{"role": "user", "content": "Say hi"}],
                                   "input": "", "response": "hi"}]
    _jsonl(node / "train.jsonl", [{"instruction": "Say hi", "output": ["hi"]}])
    with pytest.raises(ConfigError, match=rf"^data-path {node}: train.jsonl, row 1: the "
                                          "response is list, not text$"):
        inst.node_instructions(_config("unused", tmp_path), str(node), ())
