"""Tokenised train/test splits and client partitions, built once per process.

The whole train split is tokenised once (HF ``datasets.map``, which also
caches the result on disk for the next process), shuffled by the run seed and
handed to the flwr-datasets partitioner; a client's data is then an index
selection, never a re-tokenisation.

Sequence classification examples are ``input_ids`` + ``label``. Causal-LM
examples frame the text as a prompt and the label word as the answer::

    Text: <text>\\nLabel: <label word><eos>

with ``prompt_len`` marking where the answer starts (only answer tokens carry
loss; evaluation compares the model's scores for the label words' first
tokens at the last prompt position).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from datasets import Dataset

from fedlora.core.config import ConfigError, RunConfig, cached_by
from fedlora.learning.data import (
    LabeledSplits,
    load_node_examples,
    load_splits,
    make_partitioner,
    onto_classes,
)
from fedlora.learning.models import LoraModel, ModelSpec, lora_model
from fedlora.runtime.partitioners import Partitioner

PARTITION_ATTEMPTS = 20
PROMPT_PREFIX = "Text: "
PROMPT_SUFFIX = "\nLabel:"
# Entry of the config record sent with every training message, beside the run
# config: the server's classes, onto which a node's own data (data-path) is mapped.


@dataclass(frozen=True)
class EncodedSplits:
    train: Dataset
    test: Dataset
    label_names: tuple[str, ...]


def splits_for(config: RunConfig) -> LabeledSplits:
    return load_splits(config["dataset"], config["text-column"], config["label-column"],
                       config["seed"])


def model_for(config: RunConfig, rank: int | None = None) -> LoraModel:
    """The process-wide LoRA model for this run's model, task and labels, at
    ``rank`` (default ``lora-rank``)."""
    return model_with_labels(config, splits_for(config).label_names, rank)


def model_with_labels(config: RunConfig, label_names: tuple[str, ...],
                      rank: int | None = None) -> LoraModel:
    """The process-wide LoRA model for classes the caller knows: a deployed node
    has no copy of the run's dataset and gets the server's classes by message."""
    return lora_model(ModelSpec.from_config(config, label_names, rank))


def _seq_cls_encoder(model: LoraModel, max_len: int):
    tokenizer = model.tokenizer

    def encode(batch: dict) -> dict:
        ids = tokenizer(batch["text"], truncation=True, max_length=max_len)["input_ids"]
        return {"input_ids": ids, "label": batch["label"]}

    return encode


def answer_tokens(model: LoraModel) -> tuple[tuple[int, ...], ...] | None:
    """Each class's answer tokens (" <label word>") in a causal-LM encoding,
    or None for sequence classification, whose examples carry the label alone."""
    if model.spec.task != "causal-lm":
        return None
    return tuple(tuple(model.tokenizer(" " + name, add_special_tokens=False)["input_ids"])
                 for name in model.spec.label_names)


def _causal_encoder(model: LoraModel, max_len: int, label_names: tuple[str, ...]):
    tokenizer = model.tokenizer

    def pieces(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    prefix, suffix = pieces(PROMPT_PREFIX), pieces(PROMPT_SUFFIX)
    answers = [pieces(" " + name) for name in label_names]
    budget = max_len - len(bos) - len(prefix) - len(suffix) - len(eos) - max(map(len, answers))
    if budget < 1:
        raise ConfigError(f"config key 'max-seq-len': {max_len} leaves no room for the "
                          "text after the prompt and the answer")

    def encode(batch: dict) -> dict:
        texts = tokenizer(batch["text"], add_special_tokens=False, truncation=True,
                          max_length=budget)["input_ids"]
        ids, prompt_lens = [], []
        for text_ids, label in zip(texts, batch["label"]):
            prompt = bos + prefix + text_ids + suffix
            ids.append(prompt + answers[label] + eos)
            prompt_lens.append(len(prompt))
        return {"input_ids": ids, "prompt_len": prompt_lens, "label": batch["label"]}

    return encode


def encoder_for(model: LoraModel, max_len: int, label_names: tuple[str, ...]):
    """The batched ``datasets.map`` function that tokenises raw examples for
    ``model``'s task."""
    if model.spec.task == "seq-cls":
        return _seq_cls_encoder(model, max_len)
    return _causal_encoder(model, max_len, label_names)


_DATA_KEYS = ("dataset", "text-column", "label-column", "seed", "model", "task",
              "max-seq-len")
_PARTITION_KEYS = _DATA_KEYS + ("num-clients", "partition", "dirichlet-alpha",
                                "labels-per-client")


@cached_by(*_DATA_KEYS)
def encoded_splits(config: RunConfig) -> EncodedSplits:
    """Tokenised train and test splits (cached per process and on disk)."""
    splits = splits_for(config)
    model = model_for(config)
    encode = encoder_for(model, config["max-seq-len"], splits.label_names)
    out = {}
    for name, ds in (("train", splits.train), ("test", splits.test)):
        out[name] = ds.map(encode, batched=True, remove_columns=["text"],
                           desc=f"tokenising {name}")
    return EncodedSplits(out["train"], out["test"], splits.label_names)


@cached_by(*_DATA_KEYS, "eval-examples")
def central_test_set(config: RunConfig) -> Dataset:
    """The server's evaluation set: the test split, or a seeded sample of
    ``eval-examples`` of it (fast evaluation when the test split is large)."""
    return _eval_sample(config, encoded_splits(config).test)


def _eval_sample(config: RunConfig, test: Dataset) -> Dataset:
    """The seeded ``eval-examples`` sample of ``test`` (all of it for 0): the
    same rows of any split as long, tokenised or not."""
    wanted = config["eval-examples"]
    if not wanted or wanted >= len(test):
        return test
    return test.shuffle(seed=config["seed"]).select(range(wanted)).flatten_indices()


def evaluation_set(config: RunConfig, model: LoraModel, whole: bool = False,
                   label_map: Mapping[str, str] | None = None) -> Dataset:
    """``config``'s test split as a trained ``model`` (``fedlora evaluate``) is
    scored on: labels mapped onto the model's classes by name (after
    ``label_map``, the user's renaming of the dataset's classes), the run's
    ``eval-examples`` sample unless ``whole``, tokenised for the model. On the
    run's own dataset these are the rows of ``central_test_set``, in its order,
    so the run's final accuracy is reproduced."""
    splits = splits_for(config)
    test = onto_classes(splits.test, model.spec.label_names, splits.test_source, label_map)
    if not whole:
        test = _eval_sample(config, test)
    encode = encoder_for(model, config["max-seq-len"], model.spec.label_names)
    return test.map(encode, batched=True, remove_columns=["text"], desc="tokenising test")


@cached_by(*_PARTITION_KEYS)
def partitioner_for(config: RunConfig) -> Partitioner:
    """The run's partitioner over the tokenised train split (cached per process)."""
    encoded = encoded_splits(config)
    if (config["partition"] == "pathological"
            and config["labels-per-client"] > len(encoded.label_names)):
        raise ConfigError(
            f"config key 'labels-per-client': {config['labels-per-client']} is more than "
            f"the {len(encoded.label_names)} labels in the dataset")
    # IidPartitioner cuts contiguous shards: shuffle first so that a file sorted
    # by label still yields IID clients.
    shuffled = encoded.train.shuffle(seed=config["seed"]).flatten_indices()
    # DirichletPartitioner gives up after 10 draws that leave a client empty
    # (likely with small α and many clients); further draws use derived seeds,
    # so the assignment stays a function of the run seed.
    for attempt in range(PARTITION_ATTEMPTS):
        partitioner = make_partitioner(config, len(encoded.train),
                                       seed=config["seed"] + 7919 * attempt)
        partitioner.dataset = shuffled
        try:
            partitioner.load_partition(0)  # computes the whole assignment, once
            return partitioner
        except ValueError as err:
            failure = err
    raise ConfigError(f"config key 'partition': the {config['partition']} split failed "
                      f"({failure}); raise dirichlet-alpha or use fewer clients")


def client_dataset(config: RunConfig, partition_id: int) -> Dataset:
    """Client ``partition_id``'s tokenised examples."""
    if not 0 <= partition_id < config["num-clients"]:
        raise ConfigError(f"partition id {partition_id} outside 0..{config['num-clients'] - 1}")
    return partitioner_for(config).load_partition(partition_id)


_NODE_DATA: dict[tuple, Dataset] = {}


def node_dataset(config: RunConfig, model: LoraModel, data_path: str) -> Dataset:
    """A deployed node's tokenised examples from its own ``data-path`` (node
    config), labelled by ``model``'s classes (the server's). Built once per
    process like the partitions; ``datasets`` also caches the files on disk for
    the next ClientApp process."""
    key = (data_path, config["text-column"], config["label-column"], config["max-seq-len"],
           model.spec)
    if key not in _NODE_DATA:
        examples = load_node_examples(data_path, model.spec.label_names,
                                      config["text-column"], config["label-column"])
        encode = encoder_for(model, config["max-seq-len"], model.spec.label_names)
        _NODE_DATA[key] = examples.map(encode, batched=True, remove_columns=["text"],
                                       desc="tokenising node data")
    return _NODE_DATA[key]


def held_out_split(config: RunConfig, data: Dataset) -> tuple[Dataset, Dataset]:
    """(training part, held-out part) of a client's data for federated
    evaluation: ``client-eval-fraction`` held out by a split seeded by the run
    seed, at least one example each side (a client with one example keeps it
    for training and evaluates on it too)."""
    if len(data) < 2:
        return data, data
    held = min(len(data) - 1, max(1, round(len(data) * config["client-eval-fraction"])))
    order = np.random.default_rng(config["seed"]).permutation(len(data))
    return data.select(sorted(order[held:])), data.select(sorted(order[:held]))
