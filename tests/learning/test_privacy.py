"""Client-level DP-SGD (Opacus): real updates, exact accounting, budgets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import RecordDict
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

from fedlora.core.adapters import adapter_state, load_adapter_state, set_trainable
from fedlora.core.config import ConfigError
from fedlora.learning.features import client_dataset, model_for
from fedlora.learning.privacy import PrivateTraining, steps_per_round
from fedlora.learning.tasks import task_for
from fedlora.learning.training import train_local
from fedlora.strategies import resolve


def _config(tiny_bert, topic_dataset, **keys):
    return resolve({"model": str(tiny_bert), "dataset": str(topic_dataset),
                    "num-clients": 4, "clients-per-round": 2, "partition": "iid",
                    "batch-size": 8, "lr": 0.05, "dp": "local", **keys})


def _train_round(config, memory: RecordDict, trains=lambda kind: True):
    model = model_for(config)
    load_adapter_state(model.peft, model.initial_state)
    params = set_trainable(model.peft, trains)
    data = client_dataset(config, 0)
    private = PrivateTraining(config, memory, len(data))
    base_before = {n: p.detach().clone() for n, p in model.peft.named_parameters()
                   if not p.requires_grad}
    result = train_local(model, params, data, task=task_for(config), epochs=1, max_steps=0,
                         batch_size=8,
                         lr=0.05, optimizer="sgd", seed=0, private=private)
    return model, private, result, base_before, len(data)


def test_dp_changes_only_the_trainable_tensors(tiny_bert, topic_dataset):
    config = _config(tiny_bert, topic_dataset, strategy="ffa", **{"dp-noise-multiplier": 1.0})
    model, _, result, base_before, _ = _train_round(
        config, RecordDict(), trains=lambda kind: kind != "lora_A")
    assert result.steps > 0
    after = adapter_state(model.peft)
    for name, before in model.initial_state.items():
        if ".lora_A." in name:
            np.testing.assert_array_equal(after[name], before)  # frozen under FFA
        else:
            assert not np.array_equal(after[name], before), f"{name} did not move under DP"
    for name, param in model.peft.named_parameters():
        if name in base_before:
            assert torch.equal(param.detach(), base_before[name])
    # Opacus's hooks are gone: the cached model trains normally afterwards
    assert not any(hasattr(p, "grad_sample") and p.grad_sample is not None
                   for p in model.peft.parameters())
    assert not any(len(m._forward_hooks) for m in model.peft.modules())


def test_epsilon_matches_an_independent_opacus_accountant(tiny_bert, topic_dataset):
    config = _config(tiny_bert, topic_dataset, **{"dp-noise-multiplier": 1.1})
    memory = RecordDict()
    _, first, _, _, n = _train_round(config, memory)
    _, second, _, _, _ = _train_round(config, memory)  # same client, next round
    rate, steps = 1.0 / np.ceil(n / 8), steps_per_round(config, n)
    reference = RDPAccountant()
    reference.history = [(1.1, rate, steps)]
    assert first.epsilon() == pytest.approx(reference.get_epsilon(1e-5), rel=1e-9)
    reference.history = [(1.1, rate, 2 * steps)]
    assert second.epsilon() == pytest.approx(reference.get_epsilon(1e-5), rel=1e-9)
    assert second.epsilon() > first.epsilon()


@pytest.mark.slow
def test_target_epsilon_sets_the_noise_for_the_planned_run(tiny_bert, topic_dataset):
    config = _config(tiny_bert, topic_dataset, rounds=5, **{"dp-target-epsilon": 3.0})
    data = client_dataset(config, 0)
    private = PrivateTraining(config, RecordDict(), len(data))
    rate, steps = 1.0 / np.ceil(len(data) / 8), steps_per_round(config, len(data))
    expected = get_noise_multiplier(target_epsilon=3.0, target_delta=1e-5,
                                    sample_rate=rate, steps=5 * steps, accountant="rdp")
    assert private.noise_multiplier == pytest.approx(expected)


def test_budget_is_enforced(tiny_bert, topic_dataset):
    config = _config(tiny_bert, topic_dataset,
                     **{"dp-noise-multiplier": 1.0, "dp-target-epsilon": 1e3})
    memory = RecordDict()
    _, private, _, _, n = _train_round(config, memory)
    one_round = private.epsilon()
    tight = _config(tiny_bert, topic_dataset, **{"dp-noise-multiplier": 1.0,
                                                 "dp-target-epsilon": one_round * 1.1})
    assert PrivateTraining(tight, RecordDict(), n).exceeds_budget() is False
    assert PrivateTraining(tight, memory, n).exceeds_budget() is True


@pytest.mark.parametrize("overrides, needle", [
    ({"dp": "local"}, "dp-noise-multiplier or dp-target-epsilon"),
    ({"dp-noise-multiplier": 1.0}, "applies to dp local"),
    ({"dp": "local", "dp-delta": 1.0, "dp-noise-multiplier": 1.0}, "dp-delta"),
    ({"dp": "central"}, "'dp'"),
])
def test_dp_keys_are_validated(overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        resolve(overrides)


def _train_with_sample(config, client: int, sample_seed: int, max_steps: int):
    """One round of client ``client`` whose Poisson sample and noise come from
    ``sample_seed``; the adapter's trainable tensors before and after."""
    model = model_for(config)
    load_adapter_state(model.peft, model.initial_state)
    params = set_trainable(model.peft, lambda kind: True)
    data = client_dataset(config, client)
    private = PrivateTraining(config, RecordDict(), len(data),
                              generator=torch.Generator().manual_seed(sample_seed))
    before = [p.detach().clone() for p in params]
    result = train_local(model, params, data, task=task_for(config), epochs=1,
                         max_steps=max_steps, batch_size=config.batch_size, lr=0.05,
                         optimizer="sgd", seed=0, private=private)
    return private, result, [p.detach() - b for p, b in zip(params, before)], len(data)


def _first_poisson_batch(n: int, sample_seed: int) -> list[int]:
    """The first batch Opacus's Poisson sampler draws from ``sample_seed`` (the
    sampler draws first from the generator, so this is the batch training sees)."""
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    sampler = UniformWithReplacementSampler(
        num_samples=n, sample_rate=1.0 / n, generator=torch.Generator().manual_seed(sample_seed))
    return next(iter(sampler))


EMPTY_FIRST = 0  # a sample seed whose first batch of 80 examples at q = 1/80 is empty


def test_an_empty_poisson_batch_is_a_noise_only_step(tiny_bert, topic_dataset):
    config = _config(tiny_bert, topic_dataset, **{"batch-size": 1, "dp-noise-multiplier": 1.0})
    n = len(client_dataset(config, 0))
    assert _first_poisson_batch(n, EMPTY_FIRST) == []  # the forced empty batch
    private, result, change, _ = _train_with_sample(config, 0, EMPTY_FIRST, max_steps=1)
    assert result.steps == 1 and result.mean_loss == 0.0  # no loss: nothing was seen
    assert private.engine.accountant.history == [(1.0, 1.0 / n, 1)]
    assert all(delta.abs().sum() > 0 for delta in change)  # the noise moved every tensor
    # noise alone: another client's examples (same size, same sample) give the same step
    assert len(client_dataset(config, 1)) == n
    _, _, other, _ = _train_with_sample(config, 1, EMPTY_FIRST, max_steps=1)
    for mine, theirs in zip(change, other):
        assert torch.equal(mine, theirs)


def test_empty_poisson_batches_are_accounted_as_planned(tiny_bert, topic_dataset):
    # batch-size 1: about a third of the Poisson batches are empty, the first one among them
    config = _config(tiny_bert, topic_dataset, **{"batch-size": 1, "dp-noise-multiplier": 1.1})
    private, result, _, n = _train_with_sample(config, 0, EMPTY_FIRST, max_steps=0)
    planned = steps_per_round(config, n)
    assert result.steps == planned == n
    assert private.engine.accountant.history == [(1.1, 1.0 / n, planned)]
    reference = RDPAccountant()
    reference.history = [(1.1, 1.0 / n, planned)]
    assert private.epsilon() == pytest.approx(reference.get_epsilon(1e-5), rel=1e-9)
