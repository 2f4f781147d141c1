"""Adapter state ↔ PEFT model: round trips, reset per message, trainable sets."""

from __future__ import annotations

import numpy as np
import pytest
from peft import PeftModel, get_peft_model_state_dict

from fedlora.core.adapters import (
    adapter_state,
    load_adapter_state,
    lora_pairs,
    set_trainable,
    tensor_kind,
)
from fedlora.learning.features import encoded_splits, model_for
from fedlora.learning.models import ModelSpec, load_trained
from fedlora.learning.tasks import task_for
from fedlora.strategies import resolve


@pytest.fixture(scope="module")
def config(tiny_bert, topic_dataset):
    return resolve({"model": str(tiny_bert), "dataset": str(topic_dataset),
                    "num-clients": 4, "clients-per-round": 2})


def _perturbed(state: dict, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {k: (v + rng.standard_normal(v.shape)).astype(np.float32) for k, v in state.items()}


def test_state_has_lora_factors_and_head(config):
    state = model_for(config).initial_state
    kinds = {tensor_kind(name) for name in state}
    assert kinds == {"lora_A", "lora_B", "head"}
    pairs = lora_pairs(list(state))
    assert len(pairs) == 4  # query and value in 2 layers (PEFT's BERT default)
    for a_name, b_name in pairs:
        rank = config["lora-rank"]
        assert state[a_name].shape[0] == rank and state[b_name].shape[1] == rank
        assert not np.any(state[b_name])  # PEFT init: B = 0


def test_load_then_read_is_exact_and_overwrites_everything(config):
    model = model_for(config)
    first, second = _perturbed(model.initial_state, 1), _perturbed(model.initial_state, 2)
    load_adapter_state(model.peft, first)
    load_adapter_state(model.peft, second)
    read = adapter_state(model.peft)
    assert set(read) == set(second)
    for name in second:
        np.testing.assert_array_equal(read[name], second[name])


def test_load_reaches_the_parameters_peft_reads(config):
    """The cached views write into the live parameters: PEFT's own fresh
    state dict and the model's forward pass both see the loaded values."""
    model = model_for(config)
    state = _perturbed(model.initial_state, 4)
    load_adapter_state(model.peft, state)
    fresh = get_peft_model_state_dict(model.peft)
    for name, value in state.items():
        np.testing.assert_array_equal(fresh[name].numpy(), value)
    b_name = next(n for n in state if ".lora_B." in n)
    param = dict(model.peft.named_parameters())[b_name.replace(".lora_B.", ".lora_B.default.")]
    np.testing.assert_array_equal(param.detach().numpy(), state[b_name])


def test_wrong_shape_is_refused(config):
    model = model_for(config)
    bad = dict(model.initial_state)
    name = next(iter(bad))
    bad[name] = np.zeros(bad[name].shape[::-1] + (1,), dtype=np.float32)
    with pytest.raises(ValueError, match="shape"):
        load_adapter_state(model.peft, bad)


def test_partial_state_is_refused(config):
    model = model_for(config)
    partial = dict(model.initial_state)
    partial.pop(next(iter(partial)))
    with pytest.raises(KeyError):
        load_adapter_state(model.peft, partial)


def test_set_trainable_selects_kinds_and_freezes_base(config):
    model = model_for(config)
    params = set_trainable(model.peft, lambda kind: kind == "lora_B")
    names = [n for n, p in model.peft.named_parameters() if p.requires_grad]
    assert names and all(".lora_B." in n for n in names)
    assert len(params) == len(names)
    set_trainable(model.peft, lambda kind: True)
    names = [n for n, p in model.peft.named_parameters() if p.requires_grad]
    assert any(".lora_A." in n for n in names) and any("modules_to_save" in n for n in names)
    assert not any("word_embeddings" in n or n.endswith("query.base_layer.weight")
                   for n in names)


def test_save_pretrained_loads_with_peft_from_pretrained(config, tmp_path):
    model = model_for(config)
    state = _perturbed(model.initial_state, 3)
    load_adapter_state(model.peft, state)
    model.peft.save_pretrained(str(tmp_path / "adapter"))
    test = encoded_splits(config).test
    expected = task_for(config).evaluate(model, test)

    trained = load_trained(model.spec, tmp_path / "adapter")
    assert isinstance(trained.peft, PeftModel)
    reloaded = adapter_state(trained.peft)
    for name in state:
        np.testing.assert_array_equal(reloaded[name], state[name])
    assert task_for(config).evaluate(trained, test) == expected


def test_spec_is_the_same_across_processes_by_seed(config):
    """The round-0 adapter is built under the run seed: rebuilding gives it again."""
    from fedlora.learning.models import build_lora_model

    spec = ModelSpec.from_config(config, encoded_splits(config).label_names)
    again = build_lora_model(spec).initial_state
    for name, value in model_for(config).initial_state.items():
        np.testing.assert_array_equal(again[name], value)
