"""The local training loop (plain torch), the same for every strategy and task.

The task (``fedlora.learning.tasks``) makes the batches (padded to their
longest example, so short texts cost what they are) and says what their loss
is; evaluation is the task's too (``Task.evaluate``). ``compute_seconds``
counts only forward, backward and optimiser step time: the work the
orchestration exists to serve.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from datasets import Dataset
from torch.utils.data import DataLoader

from fedlora.learning.models import LoraModel, autocast
from fedlora.learning.privacy import PrivateTraining
from fedlora.learning.tasks import Task


@dataclass(frozen=True)
class TrainResult:
    num_examples: int
    steps: int
    mean_loss: float
    compute_seconds: float


def train_local(model: LoraModel, params: list[torch.nn.Parameter], data: Dataset, *,
                task: Task, epochs: int, max_steps: int, batch_size: int, lr: float,
                optimizer: str, seed: int, private: PrivateTraining | None = None
                ) -> TrainResult:
    """Train ``params`` (the adapter's trainable tensors) on ``data`` for
    ``task``; a fresh optimiser every call, so no state leaks between
    clients. ``seed`` fixes every draw of the call (shuffling, and dropout
    through torch's global generator), so the result does not depend on what
    this process ran before. With ``private`` the optimiser clips and noises
    per-example gradients (Opacus), batches are Poisson-sampled, both from
    the private generator, and the task's loss is a per-example mean; an
    empty Poisson batch is still a step (noise only, accounted: DP-SGD's
    analysis assumes every planned step is released), so ``steps`` counts it
    and ``mean_loss`` does not (it has no loss)."""
    if len(data) == 0:
        raise ValueError("client has no training examples")
    torch.manual_seed(seed)
    opt = (torch.optim.AdamW(params, lr=lr, weight_decay=0.0) if optimizer == "adamw"
           else torch.optim.SGD(params, lr=lr))
    sampling = private.generator if private is not None else torch.Generator().manual_seed(seed)
    loader = task.batches(model, data, batch_size, sampling)
    model.peft.train()  # also what Opacus needs to see activations
    if private is not None:
        opt, loader = private.attach(model.peft, opt, loader)
    try:
        return _optimise(model, task, opt, loader, epochs, max_steps, len(data), private)
    finally:
        if private is not None:
            private.detach()


def _optimise(model: LoraModel, task: Task, opt: torch.optim.Optimizer, loader: DataLoader,
              epochs: int, max_steps: int, num_examples: int, private: PrivateTraining | None
              ) -> TrainResult:
    losses, compute, steps = [], 0.0, 0
    limit = max_steps if max_steps > 0 else math.inf
    for _ in range(epochs):
        for batch in loader:
            if steps >= limit:
                break
            started = time.perf_counter()
            if batch is None:  # an empty Poisson batch (only under DP): a noise-only step
                private.step_without_examples(opt)
                loss = None
            else:
                with autocast(model.device):
                    loss = task.loss(model, batch, per_example=private is not None)
                loss.backward()
                opt.step()
            opt.zero_grad(set_to_none=True)
            compute += time.perf_counter() - started
            if loss is not None:
                losses.append(float(loss.detach()))
            steps += 1
    if not all(math.isfinite(x) for x in losses):
        raise FloatingPointError("local training diverged (non-finite loss)")
    # the mean over the batches that had examples (0.0 if every Poisson batch was empty)
    return TrainResult(num_examples, steps, sum(losses) / max(len(losses), 1), compute)
