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
