"""Differential privacy: client-level DP-SGD (``dp=local``) and central DP with
server-side fixed clipping (``dp=central``), both accounted with Opacus.

``PrivateTraining`` is the one entry point the client loop uses: it restores
this client's accountant history from its persistent state (Flower's
``context.state``: the same client in round 1 and round 20), decides the
noise (given, or derived from ``dp-target-epsilon`` for the run's planned
rounds and steps), tells whether the next round would exceed the budget,
attaches Opacus to the model for one round of training and detaches it again,
and saves the grown history.

Opacus × PEFT traps, handled at the root:
- Opacus records activations only in training mode: ``train_local`` calls
  ``model.train()`` before the first forward ("No activations detected").
- The model is never moved or rebuilt after ``make_private``: the cached PEFT
  model is wrapped in place, trained, then the hooks are removed
  (``_close``) so the next message starts from a clean module; the client
  test asserts the adapter really changed.
- Only the trainable tensors (``set_trainable``: B and the head under FFA)
  get per-sample gradients, clipping and noise; names are read from the
  unwrapped PEFT model, so Opacus's ``_module.`` prefix never leaks.

Sampling: Poisson with rate q = 1 / ceil(n / batch-size), ceil(n / batch-size)
steps per epoch (``local-steps`` caps them), as Opacus's ``DPDataLoader``.
An empty Poisson batch is a step too, as in DP-SGD (Abadi et al.) and Opacus:
the clipped-gradient sum of no examples (zero) plus the Gaussian noise, divided
by the expected batch size, accounted like any other step; skipping it would
make the release depend on the sample and leave the ledger short of the plan.
The loader yields ``None`` for it (Opacus's own empty batch is built from the
first non-empty one and fails when the first batch is empty), and
``step_without_examples`` hands the optimiser the empty per-sample gradients a
forward pass over no rows would have left, so clipping, noise, scaling and
accounting are Opacus's.

Randomness: the noise and the Poisson sample come from a generator drawn
from the operating system (``fedlora.core.seeding``), never from the run seed,
which the server and every client know: noise they could regenerate would
protect nothing. ``dp-seeded-noise`` seeds them instead, so that a DP
simulation repeats exactly; it is for simulations only.

``CentralPrivacy`` is the server's: DP-FedAvg with fixed clipping (McMahan et
al. 2018, as Flower's ``DifferentialPrivacyServerSideFixedClipping``, whose
clipping function it uses). Flower's wrapper itself cannot be used:
it clips the reply ArrayRecords, and ours carry encoded (possibly sparse)
payloads, so the clipping happens after decoding (``fedlora.federation.fold``).

Opacus (and the SciPy it loads, about 0.4 s) is imported only when a DP
object is made: every worker and server of a run without DP skips it.
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import ConfigRecord, RecordDict
from flwr.supercore.differential_privacy import (
    clip_inputs_inplace,
    compute_stdv,
    get_norm,
)

from fedlora.core.config import RunConfig
from fedlora.core.seeding import central_noise_rng, secret_generator

if TYPE_CHECKING:  # the server's CentralPrivacy needs neither
    import torch
    from torch.utils.data import DataLoader

HISTORY_KEY = "dp-history"  # the client's accountant history in context.state


def steps_per_round(config: RunConfig, num_examples: int) -> int:
    per_epoch = math.ceil(num_examples / config.batch_size)
    steps = config.local_epochs * per_epoch
    return min(steps, config.local_steps) if config.local_steps > 0 else steps


class PrivateTraining:
    """One client's DP-SGD for one round, and its privacy ledger."""

    def __init__(self, config: RunConfig, memory: RecordDict, num_examples: int,
                 generator: torch.Generator | None = None) -> None:
        from opacus import PrivacyEngine
        from opacus.accountants.utils import get_noise_multiplier

        self.config = config
        self.memory = memory
        # noise and Poisson sampling (fedlora.core.seeding.dp_generator); secret by default
        self.generator = generator or secret_generator()
        self.delta = config.dp_delta
        self.sample_rate = 1.0 / math.ceil(num_examples / config.batch_size)
        self.steps = steps_per_round(config, num_examples)
        self.engine = PrivacyEngine(accountant=config.dp_accountant)
        record = memory.config_records.get(HISTORY_KEY)
        if record is not None:
            self.engine.accountant.history = [
                (float(n), float(q), int(s))
                for n, q, s in zip(record["noise"], record["rate"], record["steps"])]
        self.noise_multiplier = config.dp_noise_multiplier or get_noise_multiplier(
            target_epsilon=config.dp_target_epsilon, target_delta=self.delta,
            sample_rate=self.sample_rate, steps=self.steps * config.rounds,
            accountant=config.dp_accountant)
        self._module = None

    def epsilon(self) -> float:
        """ε spent so far by this client (0 before its first round)."""
        if not self.engine.accountant.history:
            return 0.0
        return float(self.engine.get_epsilon(self.delta))

    def epsilon_after_round(self) -> float:
        """ε this client would have spent after training this round."""
        from opacus.accountants import create_accountant

        preview = create_accountant(self.config.dp_accountant)
        preview.history = [*self.engine.accountant.history,
                           (self.noise_multiplier, self.sample_rate, self.steps)]
        return float(preview.get_epsilon(self.delta))

    def exceeds_budget(self) -> bool:
        target = self.config.dp_target_epsilon
        return target > 0 and self.epsilon_after_round() > target

    def attach(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer,
               loader: DataLoader) -> tuple[torch.optim.Optimizer, DataLoader]:
        """Per-sample clipping and noise on ``optimizer``; Poisson batches."""
        self._module, optimizer, loader = self.engine.make_private(
            module=module, optimizer=optimizer, data_loader=loader,
            noise_multiplier=self.noise_multiplier, noise_generator=self.generator,
            max_grad_norm=self.config.dp_max_grad_norm, poisson_sampling=True)
        loader.collate_fn = functools.partial(_none_when_empty, loader.collate_fn)
        return optimizer, loader

    def step_without_examples(self, optimizer: torch.optim.Optimizer) -> None:
        """DP-SGD's step on an empty Poisson batch: Opacus's DPOptimizer gets
        zero per-sample gradients (no rows), so its empty-batch clipping gives a
        zero sum, to which it adds its noise, divides by the expected batch
        size, records the step in the accountant and steps the optimiser."""
        for param in optimizer.params:
            param.grad_sample = param.new_zeros((0, *param.shape))
        optimizer.step()

    def detach(self) -> None:
        """Remove Opacus's hooks from the (cached) model and save the ledger."""
        if self._module is not None:
            self._module._close()
            self._module = None
        history = self.engine.accountant.history
        self.memory.config_records[HISTORY_KEY] = ConfigRecord({
            "noise": [float(h[0]) for h in history],
            "rate": [float(h[1]) for h in history],
            "steps": [int(h[2]) for h in history]})


def _none_when_empty(collate, rows: list) -> dict | None:
    """``None`` for an empty Poisson batch (see ``step_without_examples``)."""
    return None if len(rows) == 0 else collate(rows)


class CentralPrivacy:
    """Server-side DP over one run: per round, every client's update (the change
    it made to the tensors it trains) is clipped to L2 norm C =
    ``dp-max-grad-norm``, the clipped updates are summed with equal weights and
    divided by m = ``clients-per-round``, and N(0, (σC/m)²) noise is added to
    that average. Accounted as a subsampled Gaussian mechanism, one step per
    round at rate q = m / ``num-clients`` (Flower samples m clients without
    replacement; the Poisson-sampling analysis is the usual approximation).

    The noise is drawn from the operating system, not from the run seed (noise
    that anyone with the config can regenerate protects nothing), unless
    ``dp-seeded-noise`` asks for a repeatable simulation (``fedlora.core.seeding``).
    Flower's ``add_gaussian_noise_inplace`` is not used for that reason: it
    draws from NumPy's global generator.
    """

    def __init__(self, config: RunConfig) -> None:
        from opacus.accountants import create_accountant
        from opacus.accountants.utils import get_noise_multiplier

        self.config = config
        self.delta = config.dp_delta
        self.sampled = config.clients_per_round
        self.sample_rate = min(1.0, self.sampled / config.num_clients)
        self.clipping_norm = config.dp_max_grad_norm
        self.accountant = create_accountant(config.dp_accountant)
        self.noise_multiplier = config.dp_noise_multiplier or get_noise_multiplier(
            target_epsilon=config.dp_target_epsilon, target_delta=self.delta,
            sample_rate=self.sample_rate, steps=config.rounds,
            accountant=config.dp_accountant)

    def clip(self, update: list[np.ndarray]) -> None:
        """Scale ``update`` (all its tensors as one vector) to norm ≤ C, in place."""
        if get_norm(update) > 0:  # Flower's clip divides by the norm
            clip_inputs_inplace(update, self.clipping_norm)

    def noisy_average(self, clipped_sum: list[np.ndarray]) -> list[np.ndarray]:
        """Σ clipped / m plus the Gaussian noise; records the release."""
        rng = central_noise_rng(self.config.dp_seeded_noise, self.config.seed,
                                len(self.accountant.history))
        stdv = compute_stdv(self.noise_multiplier, self.clipping_norm, self.sampled)
        average = [array / self.sampled + rng.normal(0.0, stdv, array.shape)
                   for array in clipped_sum]
        self.accountant.step(noise_multiplier=self.noise_multiplier,
                             sample_rate=self.sample_rate)
        return average

    def epsilon(self) -> float:
        """ε spent by the releases so far (0 before the first)."""
        if not self.accountant.history:
            return 0.0
        return float(self.accountant.get_epsilon(self.delta))
