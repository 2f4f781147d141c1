"""What the two classification tasks share: labelled data, accuracy and
cross-entropy over the classes, and the label-flip rewrite of the label.

``seq_cls`` scores the classes with a classifier head; ``causal_lm`` with
the LM's scores for each label word's first token. Both are judged by
accuracy (higher is better), and a round record holds ``accuracy`` and
``loss`` (mean cross-entropy over the classes), as fedlora always wrote them.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from fedlora.core.fields import Round
from fedlora.core.metric import ACCURACY, Metric
from fedlora.learning.models import autocast
from fedlora.learning.tasks.base import EVAL_BATCH_SIZE, Task, TaskSplits, inputs
from fedlora.learning.tasks.labels import (
    LABEL,
    TEXT,
    load_node_examples,
    load_splits,
    onto_classes,
)

if TYPE_CHECKING:
    from datasets import Dataset

    from fedlora.learning.models import LoraModel

class Classification(Task):
    """A task whose examples are (text, label) and whose model scores classes."""

    @property
    def metrics(self) -> tuple[str, ...]:
        return Round.CLASSIFICATION

    @property
    def primary(self) -> Metric:
        return ACCURACY

    def progress(self, record: dict) -> str:
        if record.get(Round.ACCURACY) is None:
            return "acc -"
        return f"acc {record[Round.ACCURACY]:.4f} loss {record[Round.LOSS]:.4f}"

    def splits(self) -> TaskSplits:
        config = self.config
        return load_splits(config.dataset, config.text_column, config.label_column,
                           config.seed)

    def node_examples(self, data_path: str, label_names: tuple[str, ...]) -> Dataset:
        return load_node_examples(data_path, label_names, self.config.text_column,
                                  self.config.label_column)

    def for_model(self, test: Dataset, label_names: tuple[str, ...], where: str,
                  label_map: Mapping[str, str] | None = None) -> Dataset:
        return onto_classes(test, label_names, where, label_map)

    def encoded_columns(self) -> tuple[str, ...]:
        return (TEXT,)

    @abstractmethod
    def class_scores(self, model: LoraModel, batch: dict[str, torch.Tensor],
                     logits: torch.Tensor) -> torch.Tensor:
        """The (batch, classes) scores within the model's output ``logits``."""

    @torch.no_grad()
    def evaluate(self, model: LoraModel, data: Dataset) -> dict[str, float]:
        """Accuracy and mean cross-entropy over the classes on ``data``."""
        model.peft.eval()
        correct, total_loss, count = 0, 0.0, 0
        for batch in self.batches(model, data, EVAL_BATCH_SIZE):
            with autocast(model.device):
                logits = model.peft(**inputs(model, batch)).logits
            logits = self.class_scores(model, batch, logits.float())
            labels = batch[LABEL].to(model.device)
            total_loss += float(F.cross_entropy(logits, labels, reduction="sum"))
            correct += int((logits.argmax(dim=-1) == labels).sum())
            count += len(labels)
        return {Round.ACCURACY: correct / count, Round.LOSS: total_loss / count}

    def relabel(self, data: Dataset, model: LoraModel,
                new_label: Callable[[int], int]) -> Dataset:
        from datasets import Dataset

        columns = data.to_dict()
        classes = len(model.spec.label_names)
        labels = [int(y) for y in columns[LABEL]]
        if any(not 0 <= y < classes for y in labels):
            raise ValueError(f"a label outside 0..{classes - 1}")
        relabelled = [new_label(y) for y in labels]
        self.rewrite(columns, model, labels, relabelled)
        columns[LABEL] = relabelled
        return Dataset.from_dict(columns, features=data.features)

    def rewrite(self, columns: dict[str, list], model: LoraModel, old: list[int],
                new: list[int]) -> None:
        """Make ``columns``' encoding say the ``new`` labels (in place); the
        label column alone says it, by default."""
