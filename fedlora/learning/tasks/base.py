"""The task contract: what a kind of fine-tuning reads, trains and reports.

A strategy says how adapters travel and merge; a task says what one example
is and what "better" means. Each task is one module of this package
(``seq_cls``, ``causal_lm``, ``sft``), and everything above it (data
partitions, the training loop, the round record, the summary, ``report``)
asks the task instead of assuming labels and accuracy:

- its data: train and test splits in the task's own columns
  (``TaskSplits``), found in the run's dataset by detection or by the keys
  that name them, and a deployed node's own examples;
- encoding one example (``encoder``: token ids and where the loss starts);
- a batch (``collate``) and its loss (``loss``; a per-example mean where
  DP-SGD clips per example);
- evaluation (``evaluate`` → named metrics, in record order) and the
  primary metric with its direction (``primary``);
- what a label-flip attacker does to its data (``relabel``), or a refusal.

A task is light: it holds the run config and builds nothing until asked.
The heavy things it returns (splits, tokenised data) are cached per process
by ``fedlora.learning.features``.
"""

from __future__ import annotations

import functools
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch.utils.data import DataLoader

from fedlora.core.config import ConfigError, RunConfig
from fedlora.core.fields import Round
from fedlora.core.metric import Metric

if TYPE_CHECKING:
    from datasets import Dataset

    from fedlora.learning.models import LoraModel

EVAL_BATCH_SIZE = 64


@dataclass(frozen=True)
class TaskSplits:
    """Train and test splits in a task's columns.

    ``label_names``: the classes (a classifier's outputs, a label-word
    model's answers, or the responses of classification data run as
    instructions); empty for free text. ``partition_by``: the column that
    label-skew partitions cut by (None for free text)."""

    train: Dataset
    test: Dataset
    label_names: tuple[str, ...]
    test_source: str = ""  # the file (or Hub split) the test split came from, for messages
    partition_by: str | None = None

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


def pad_batch(rows: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` of a batch padded (on the right)
    to its longest example: short texts cost what they are."""
    width = max(len(row["input_ids"]) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        ids[i, :n] = torch.tensor(row["input_ids"], dtype=torch.long)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask}


def loader(data: Dataset, batch_size: int, collate: Callable[[Sequence[dict]], dict],
           generator: torch.Generator | None = None) -> DataLoader:
    """Batches of ``data`` (shuffled when a generator is given)."""
    return DataLoader(data.to_list(), batch_size=batch_size, shuffle=generator is not None,
                      generator=generator, collate_fn=collate)


def inputs(model: LoraModel, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's inputs of a batch, on its device."""
    return {"input_ids": batch["input_ids"].to(model.device),
            "attention_mask": batch["attention_mask"].to(model.device)}


def safe_exp(value: float) -> float:
    """exp, with inf where it overflows (a perplexity of a diverged model)."""
    try:
        return math.exp(value)
    except OverflowError:
        return math.inf


class Task(ABC):
    """One kind of fine-tuning (see the module docstring). Subclasses set
    ``name`` and implement the abstract methods."""

    name: ClassVar[str]

    def __init__(self, config: RunConfig) -> None:
        self.config = config

    # -- what it reports ---------------------------------------------------------
    @property
    @abstractmethod
    def metrics(self) -> tuple[str, ...]:
        """The names ``evaluate`` returns, in the order the round record holds them."""

    @property
    @abstractmethod
    def primary(self) -> Metric:
        """The metric a run is judged by: summary best/final, report, compare."""

    def progress(self, record: dict) -> str:
        """The evaluation part of a round's progress line."""
        name = self.primary.name
        value = record.get(name)
        return f"{name} -" if value is None else f"{name} {value:.4f}"

    def reply_values(self, metrics: dict[str, float]) -> tuple[float, float, float | None]:
        """(accuracy, loss, primary) that a federated evaluation reply
        carries: the wire's two standing fields, and the primary metric
        where it is neither (``fedlora.wire.messages.EvaluateReply``)."""
        return metrics[Round.ACCURACY], metrics[Round.LOSS], None

    # -- data --------------------------------------------------------------------
    @abstractmethod
    def splits(self) -> TaskSplits:
        """The run dataset's train and test splits in this task's columns."""

    @abstractmethod
    def node_examples(self, data_path: str, label_names: tuple[str, ...]) -> Dataset:
        """A deployed node's own training examples (``data-path``), in this
        task's columns, labelled by the server's classes."""

    def for_model(self, test: Dataset, label_names: tuple[str, ...], where: str,
                  label_map: Mapping[str, str] | None = None) -> Dataset:
        """``test`` in a trained model's terms (``fedlora evaluate``, maybe on
        another dataset; ``label_map`` renames its classes first): as it is, by
        default, and a ``label_map`` is refused — there are no classes to map."""
        if label_map:
            raise ConfigError(f"--label-map: task {self.name} has no classes to map")
        return test

    # -- encoding and batches ------------------------------------------------------
    @abstractmethod
    def encoder(self, model: LoraModel) -> Callable[[dict], dict]:
        """The batched ``datasets.map`` function that tokenises examples."""

    @abstractmethod
    def encoded_columns(self) -> tuple[str, ...]:
        """The columns the encoder replaces (removed after mapping)."""

    @abstractmethod
    def collate(self, rows: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
        """A batch of encoded examples as tensors."""

    def batches(self, model: LoraModel, data: Dataset, batch_size: int,
                generator: torch.Generator | None = None) -> DataLoader:
        return loader(data, batch_size, functools.partial(self.collate,
                                                          pad_id=model.pad_token_id),
                      generator)

    def loss(self, model: LoraModel, batch: dict[str, torch.Tensor], *,
             per_example: bool) -> torch.Tensor:
        """The training loss of a batch: with ``per_example``, the mean over
        examples of each example's own mean (what DP-SGD's per-example
        clipping needs: one example per row)."""
        return self.loss_of(model, self.logits(model, batch), batch, per_example=per_example)

    def logits(self, model: LoraModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The model's output logits for a batch (rows in the batch's order).
        Split from the loss so that one forward pass can serve several
        clients' batches (``fedlora.learning.cohort_pass``)."""
        return model.peft(**inputs(model, batch)).logits

    @abstractmethod
    def loss_of(self, model: LoraModel, logits: torch.Tensor, batch: dict[str, torch.Tensor],
                *, per_example: bool) -> torch.Tensor:
        """``loss`` of a batch whose ``logits`` are already computed."""

    # -- evaluation ----------------------------------------------------------------
    @abstractmethod
    def evaluate(self, model: LoraModel, data: Dataset) -> dict[str, float]:
        """The named metrics (``metrics``, in order) of ``model`` on ``data``."""

    # -- attacks -----------------------------------------------------------------
    def relabel(self, data: Dataset, model: LoraModel,
                new_label: Callable[[int], int]) -> Dataset:
        """``data`` with each example's label y replaced by ``new_label(y)``,
        its encoding rewritten to match (a label-flip attacker's data)."""
        raise ConfigError(f"config key 'attack': label-flip needs labelled data; task "
                          f"{self.name} has none here")
