"""Local training and evaluation loops (plain torch), the same for every strategy.

Batches are padded to their longest example (no fixed-length padding), so
short texts cost what they are. ``compute_seconds`` counts only forward,
backward and optimiser step time: the work the orchestration exists to serve.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from datasets import Dataset
from torch.utils.data import DataLoader

from fedlora.learning.models import LoraModel, autocast
from fedlora.learning.privacy import PrivateTraining

EVAL_BATCH_SIZE = 64


@dataclass(frozen=True)
class TrainResult:
    num_examples: int
    steps: int
    mean_loss: float
    compute_seconds: float


def _collate(rows: Sequence[dict], model: LoraModel) -> dict[str, torch.Tensor]:
    """Pad a batch to its longest example; causal-LM labels cover only the answer."""
    width = max(len(row["input_ids"]) for row in rows)
    ids = torch.full((len(rows), width), model.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        ids[i, :n] = torch.tensor(row["input_ids"], dtype=torch.long)
        mask[i, :n] = 1
    batch = {"input_ids": ids, "attention_mask": mask,
             "label": torch.tensor([row["label"] for row in rows], dtype=torch.long)}
    if model.spec.task == "causal-lm":
        targets = ids.clone()
        targets[mask == 0] = -100
        for i, row in enumerate(rows):
            targets[i, : row["prompt_len"]] = -100
        batch["lm_labels"] = targets
        batch["prompt_len"] = torch.tensor([row["prompt_len"] for row in rows])
    return batch


def _loader(data: Dataset, batch_size: int, model: LoraModel,
            generator: torch.Generator | None) -> DataLoader:
    """Batches of ``data`` (shuffled when a generator is given)."""
    return DataLoader(data.to_list(), batch_size=batch_size, shuffle=generator is not None,
                      generator=generator, collate_fn=functools.partial(_collate, model=model))


def _loss(model: LoraModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    dev = model.device
    inputs = {"input_ids": batch["input_ids"].to(dev),
              "attention_mask": batch["attention_mask"].to(dev)}
    if model.spec.task == "causal-lm":
        return model.peft(**inputs, labels=batch["lm_labels"].to(dev)).loss
    return model.peft(**inputs, labels=batch["label"].to(dev)).loss


def train_local(model: LoraModel, params: list[torch.nn.Parameter], data: Dataset, *,
                epochs: int, max_steps: int, batch_size: int, lr: float,
                optimizer: str, seed: int, private: PrivateTraining | None = None
                ) -> TrainResult:
    """Train ``params`` (the adapter's trainable tensors) on ``data``; a fresh
    optimiser every call, so no state leaks between clients. ``seed`` fixes
    every draw of the call (shuffling, and dropout through torch's global
    generator), so the result does not depend on what this process ran
    before. With ``private`` the optimiser clips and noises per-example
    gradients (Opacus) and batches are Poisson-sampled, both from the
    private generator."""
    if len(data) == 0:
        raise ValueError("client has no training examples")
    torch.manual_seed(seed)
    opt = (torch.optim.AdamW(params, lr=lr, weight_decay=0.0) if optimizer == "adamw"
           else torch.optim.SGD(params, lr=lr))
    sampling = private.generator if private is not None else torch.Generator().manual_seed(seed)
    loader = _loader(data, batch_size, model, sampling)
    model.peft.train()  # also what Opacus needs to see activations
    if private is not None:
        opt, loader = private.attach(model.peft, opt, loader)
    try:
        return _optimise(model, opt, loader, epochs, max_steps, len(data))
    finally:
        if private is not None:
            private.detach()


def _optimise(model: LoraModel, opt: torch.optim.Optimizer, loader: DataLoader,
              epochs: int, max_steps: int, num_examples: int) -> TrainResult:
    losses, compute, steps = [], 0.0, 0
    limit = max_steps if max_steps > 0 else math.inf
    for _ in range(epochs):
        for batch in loader:
            if steps >= limit:
                break
            if batch["input_ids"].shape[0] == 0:  # an empty Poisson batch
                continue
            started = time.perf_counter()
            with autocast(model.device):
                loss = _loss(model, batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            compute += time.perf_counter() - started
            losses.append(float(loss.detach()))
            steps += 1
    if not all(math.isfinite(x) for x in losses):
        raise FloatingPointError("local training diverged (non-finite loss)")
    return TrainResult(num_examples, steps, sum(losses) / max(len(losses), 1), compute)


@torch.no_grad()
def evaluate(model: LoraModel, data: Dataset) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) on ``data``. Causal LMs are scored on the
    label words' first tokens at the last prompt position."""
    model.peft.eval()
    correct, total_loss, count = 0, 0.0, 0
    for batch in _loader(data, EVAL_BATCH_SIZE, model, generator=None):
        dev = model.device
        with autocast(dev):
            logits = model.peft(input_ids=batch["input_ids"].to(dev),
                                attention_mask=batch["attention_mask"].to(dev)).logits
        logits = logits.float()
        if model.spec.task == "causal-lm":
            last = (batch["prompt_len"] - 1).to(dev)
            rows = torch.arange(logits.shape[0], device=dev)
            logits = logits[rows, last][:, list(model.label_token_ids)]
        labels = batch["label"].to(dev)
        total_loss += float(F.cross_entropy(logits, labels, reduction="sum"))
        correct += int((logits.argmax(dim=-1) == labels).sum())
        count += len(labels)
    return correct / count, total_loss / count
