"""``task=seq-cls``: an encoder with a classification head over the classes.

An example is the text's token ids and its label; the loss is the head's
cross-entropy (per example already, which is what DP-SGD needs). The head is
trained and aggregated with the LoRA factors (``fedlora.learning.models``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from fedlora.learning.tasks.base import pad_batch
from fedlora.learning.tasks.classify import Classification
from fedlora.learning.tasks.labels import LABEL, TEXT

if TYPE_CHECKING:
    from fedlora.learning.models import LoraModel


class SeqCls(Classification):
    name = "seq-cls"

    def encoder(self, model: LoraModel) -> Callable[[dict], dict]:
        tokenizer, max_len = model.tokenizer, self.config.max_seq_len

        def encode(batch: dict) -> dict:
            ids = tokenizer(batch[TEXT], truncation=True, max_length=max_len)["input_ids"]
            return {"input_ids": ids, LABEL: batch[LABEL]}

        return encode

    def collate(self, rows: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
        batch = pad_batch(rows, pad_id)
        batch[LABEL] = torch.tensor([row[LABEL] for row in rows], dtype=torch.long)
        return batch

    def loss_of(self, model: LoraModel, logits: torch.Tensor, batch: dict[str, torch.Tensor],
                *, per_example: bool) -> torch.Tensor:
        """The classifier's cross-entropy, the mean over examples: what
        transformers' sequence classifiers compute for single-label classes."""
        return F.cross_entropy(logits.view(-1, logits.shape[-1]),
                               batch[LABEL].to(logits.device).view(-1))

    def class_scores(self, model: LoraModel, batch: dict[str, torch.Tensor],
                     logits: torch.Tensor) -> torch.Tensor:
        return logits
