"""Tokenised train/test splits and client partitions, built once per process.

The run's task (``fedlora.learning.tasks``) reads the dataset into its own
columns and encodes an example; this module does the rest the same way for
every task. The whole train split is tokenised once (HF ``datasets.map``,
which also caches the result on disk for the next process), shuffled by the
run seed and handed to the flwr-datasets partitioner; a client's data is then
an index selection, never a re-tokenisation.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from datasets import Dataset

from fedlora.core.config import ConfigError, RunConfig, cached_by
from fedlora.learning.data import make_partitioner
from fedlora.learning.models import LoraModel, ModelSpec, lora_model
from fedlora.learning.tasks import TaskSplits, task_for
from fedlora.runtime.partitioners import Partitioner

PARTITION_ATTEMPTS = 20


@dataclass(frozen=True)
class EncodedSplits:
    train: Dataset
    test: Dataset
    label_names: tuple[str, ...]
    partition_by: str | None = None  # the column label-skew partitions cut by


def splits_for(config: RunConfig) -> TaskSplits:
    """The run's dataset in its task's columns (cached by the task)."""
    return task_for(config).splits()


def model_for(config: RunConfig, rank: int | None = None) -> LoraModel:
    """The process-wide LoRA model for this run's model, task and labels, at
    ``rank`` (default ``lora-rank``)."""
    return model_with_labels(config, splits_for(config).label_names, rank)


def model_with_labels(config: RunConfig, label_names: tuple[str, ...],
                      rank: int | None = None) -> LoraModel:
    """The process-wide LoRA model for classes the caller knows: a deployed node
    has no copy of the run's dataset and gets the server's classes by message."""
    return lora_model(ModelSpec.from_config(config, label_names, rank))


def encode(config: RunConfig, model: LoraModel, data: Dataset, what: str) -> Dataset:
    """``data`` (in the task's columns) tokenised for ``model``."""
    task = task_for(config)
    return data.map(task.encoder(model), batched=True, remove_columns=list(
        task.encoded_columns()), desc=f"tokenising {what}")


_DATA_KEYS = ("dataset", "text-column", "label-column", "seed", "model", "task",
              "max-seq-len", "prompt-column", "response-column", "messages-column",
              "sft-prompt", "sft-template", "client-column")
_PARTITION_KEYS = _DATA_KEYS + ("num-clients", "partition", "dirichlet-alpha",
                                "labels-per-client")


@cached_by(*_DATA_KEYS)
def encoded_splits(config: RunConfig) -> EncodedSplits:
    """Tokenised train and test splits (cached per process and on disk)."""
    splits = splits_for(config)
    model = model_for(config)
    return EncodedSplits(encode(config, model, splits.train, "train"),
                         encode(config, model, splits.test, "test"), splits.label_names,
                         splits.partition_by)


@cached_by(*_DATA_KEYS, "eval-examples")
def central_test_set(config: RunConfig) -> Dataset:
    """The server's evaluation set: the test split, or a seeded sample of
    ``eval-examples`` of it (fast evaluation when the test split is large)."""
    return _eval_sample(config, encoded_splits(config).test)


def _eval_sample(config: RunConfig, test: Dataset) -> Dataset:
    """The seeded ``eval-examples`` sample of ``test`` (all of it for 0): the
    same rows of any split as long, tokenised or not."""
    wanted = config.eval_examples
    if not wanted or wanted >= len(test):
        return test
    return test.shuffle(seed=config.seed).select(range(wanted)).flatten_indices()


def evaluation_set(config: RunConfig, model: LoraModel, whole: bool = False,
                   label_map: Mapping[str, str] | None = None) -> Dataset:
    """``config``'s test split as a trained ``model`` (``fedlora evaluate``) is
    scored on: in the model's terms (classes mapped by name, after
    ``label_map``, the user's renaming of the dataset's classes), the run's
    ``eval-examples`` sample unless ``whole``, tokenised for the model. On the
    run's own dataset these are the rows of ``central_test_set``, in its order,
    so the run's final metrics are reproduced."""
    splits = splits_for(config)
    test = task_for(config).for_model(splits.test, model.spec.label_names, splits.test_source,
                                      label_map)
    if not whole:
        test = _eval_sample(config, test)
    return encode(config, model, test, "test")


@cached_by(*_PARTITION_KEYS, "attack")
def partitioner_for(config: RunConfig) -> Partitioner:
    """The run's partitioner over the tokenised train split (cached per
    process); refuses a label-flip attack on data without labels."""
    encoded = encoded_splits(config)
    if config.attack == "label-flip" and encoded.partition_by is None:
        raise ConfigError(f"config key 'attack': label-flip needs labelled data, and "
                          f"dataset {config.dataset} is free text")
    if (config.partition == "pathological"
            and config.labels_per_client > len(encoded.label_names)):
        raise ConfigError(
            f"config key 'labels-per-client': {config.labels_per_client} is more than "
            f"the {len(encoded.label_names)} labels in the dataset")
    column = config.client_column
    if config.partition == "natural" and column not in encoded.train.column_names:
        raise ConfigError("config key 'client-column': partition=natural needs "
                          + (f"column {column!r} in the training data (task sft keeps it; "
                             f"task {task_for(config).name} here)" if column else
                             "the column that names each example's client"))
    # IidPartitioner cuts contiguous shards: shuffle first so that a file sorted
    # by label still yields IID clients.
    shuffled = encoded.train.shuffle(seed=config.seed).flatten_indices()
    # DirichletPartitioner gives up after 10 draws that leave a client empty
    # (likely with small α and many clients); further draws use derived seeds,
    # so the assignment stays a function of the run seed.
    for attempt in range(PARTITION_ATTEMPTS):
        partitioner = make_partitioner(config, len(encoded.train),
                                       config.seed + 7919 * attempt, encoded.partition_by)
        partitioner.dataset = shuffled
        try:
            partitioner.load_partition(0)  # computes the whole assignment, once
            _check_natural(config, partitioner)
            return partitioner
        except ValueError as err:
            failure = err
    raise ConfigError(f"config key 'partition': the {config.partition} split failed "
                      f"({failure}); raise dirichlet-alpha or use fewer clients")


def _check_natural(config: RunConfig, partitioner: Partitioner) -> None:
    """A natural partition has a client per value of ``client-column``."""
    if config.partition == "natural" and partitioner.num_partitions != config.num_clients:
        raise ConfigError(f"config key 'num-clients': {config.num_clients}, but column "
                          f"{config.client_column!r} names {partitioner.num_partitions} "
                          "clients (partition=natural has one per value)")


def client_dataset(config: RunConfig, partition_id: int) -> Dataset:
    """Client ``partition_id``'s tokenised examples."""
    if not 0 <= partition_id < config.num_clients:
        raise ConfigError(f"partition id {partition_id} outside 0..{config.num_clients - 1}")
    return partitioner_for(config).load_partition(partition_id)


_NODE_DATA: dict[tuple, Dataset] = {}


def node_dataset(config: RunConfig, model: LoraModel, data_path: str) -> Dataset:
    """A deployed node's tokenised examples from its own ``data-path`` (node
    config), labelled by ``model``'s classes (the server's). Built once per
    process like the partitions; ``datasets`` also caches the files on disk for
    the next ClientApp process."""
    key = (data_path, *(config[k] for k in _DATA_KEYS), model.spec)
    if key not in _NODE_DATA:
        examples = task_for(config).node_examples(data_path, model.spec.label_names)
        _NODE_DATA[key] = encode(config, model, examples, "node data")
    return _NODE_DATA[key]


def held_out_split(config: RunConfig, data: Dataset) -> tuple[Dataset, Dataset]:
    """(training part, held-out part) of a client's data for federated
    evaluation: ``client-eval-fraction`` held out by a split seeded by the run
    seed, at least one example each side (a client with one example keeps it
    for training and evaluates on it too)."""
    if len(data) < 2:
        return data, data
    held = min(len(data) - 1, max(1, round(len(data) * config.client_eval_fraction)))
    order = np.random.default_rng(config.seed).permutation(len(data))
    return data.select(sorted(order[held:])), data.select(sorted(order[:held]))
