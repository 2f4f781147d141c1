"""How the base sits in memory: gradient checkpointing (with and without
DP-SGD), bf16 base weights with float32 adapters, and the refusals of a
quantised base where it cannot run (no bitsandbytes, no GPU, a strategy that
changes the base weights). The GPU path of ``quantization`` is not run here:
this machine has neither a GPU nor bitsandbytes."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from conftest import LABEL_WORDS
from flwr.app import RecordDict

from fedlora.core.adapters import adapter_state, set_trainable
from fedlora.core.config import ConfigError
from fedlora.core.seeding import dp_generator
from fedlora.learning import precision
from fedlora.learning.features import client_dataset
from fedlora.learning.models import ModelSpec, build_lora_model
from fedlora.learning.privacy import PrivateTraining
from fedlora.learning.tasks import task_for
from fedlora.learning.training import train_local
from fedlora.strategies import resolve


def _config(model_dir, dataset, **keys):
    return resolve({"model": str(model_dir), "dataset": str(dataset), "num-clients": 4,
                    "clients-per-round": 2, "partition": "iid", "batch-size": 4,
                    "max-seq-len": 32, "lora-dropout": 0.2, **keys})


def _first_query(peft_model) -> torch.nn.Module:
    """The first layer's LoRA-wrapped query projection: inside the checkpointed
    part of the layer (the layer's own hooks stay outside it)."""
    return next(m for n, m in peft_model.named_modules() if n.endswith("layers.0.self_attn.q_proj"))


def _train(config, dp: bool) -> tuple[dict[str, np.ndarray], int]:
    """(adapter after 3 local steps, how often the first query projection ran)."""
    model = build_lora_model(ModelSpec.from_config(config, LABEL_WORDS))
    data = client_dataset(config, 0)
    calls = []
    _first_query(model.peft).register_forward_pre_hook(lambda *_: calls.append(1))
    private = None
    if dp:
        private = PrivateTraining(config, RecordDict(), len(data),
                                  dp_generator(True, config["seed"], 1, 0))
    params = set_trainable(model.peft, lambda kind: True)
    train_local(model, params, data, task=task_for(config), epochs=1, max_steps=3,
                batch_size=4, lr=0.01, optimizer="adamw", seed=7, private=private)
    return adapter_state(model.peft), len(calls)


@pytest.mark.slow
@pytest.mark.parametrize("dp", [False, True], ids=["plain", "dp-local"])
def test_gradient_checkpointing_trains_the_same_adapter(tiny_llama, topic_dataset, dp):
    """Recomputed activations give the same gradients, per example too
    (Opacus), dropout included: the same adapter, bit for bit."""
    keys = {"dp": "local", "dp-noise-multiplier": 0.5, "dp-seeded-noise": True} if dp else {}
    plain, plain_calls = _train(_config(tiny_llama, topic_dataset, **keys), dp)
    saved, saved_calls = _train(_config(tiny_llama, topic_dataset, **keys,
                                        **{"gradient-checkpointing": True}), dp)
    assert saved_calls == 2 * plain_calls > 0  # each layer really ran again in backward
    assert any(np.abs(v).sum() > 0 for n, v in plain.items() if ".lora_B." in n)  # trained
    for name, value in plain.items():
        np.testing.assert_array_equal(saved[name], value, err_msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("model_fixture", ["tiny_llama", "tiny_bert"])
def test_a_bfloat16_base_trains_float32_adapters(request, topic_dataset, model_fixture):
    config = _config(request.getfixturevalue(model_fixture), topic_dataset,
                     **{"model-dtype": "bfloat16"})
    model = build_lora_model(ModelSpec.from_config(config, LABEL_WORDS))
    adapters = {n: p for n, p in model.peft.named_parameters()
                if ".lora_" in n or ".modules_to_save." in n}
    frozen = [p for n, p in model.peft.named_parameters() if n.endswith("base_layer.weight")]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    assert adapters and all(p.dtype == torch.float32 for p in adapters.values())
    assert any(".modules_to_save." in n for n in adapters) == (model.spec.task == "seq-cls")
    before = adapter_state(model.peft)
    params = set_trainable(model.peft, lambda kind: True)
    result = train_local(model, params, client_dataset(config, 0), task=task_for(config),
                         epochs=1, max_steps=2, batch_size=4, lr=0.05, optimizer="adamw",
                         seed=3)
    assert np.isfinite(result.mean_loss) and result.steps == 2
    after = adapter_state(model.peft)
    assert all(v.dtype == np.float32 for v in after.values())
    assert any(not np.array_equal(after[n], before[n]) for n in before if ".lora_B." in n)


def test_float32_is_the_default_and_passed_explicitly():
    assert precision.load_options("float32", "none", "causal-lm") == {"dtype": torch.float32}
    assert precision.load_options("bfloat16", "none", "seq-cls") == {"dtype": torch.bfloat16}


@pytest.mark.skipif(torch.cuda.is_available(), reason="the warning is for a CPU-only machine")
def test_a_bfloat16_base_on_a_cpu_is_warned_slow(caplog):
    precision.load_options("float32", "none", "causal-lm")
    assert not caplog.records
    precision.load_options("bfloat16", "none", "causal-lm")
    assert "bfloat16 on a CPU" in caplog.text and caplog.records[0].levelname == "WARNING"


# --- quantisation: the refusals ---------------------------------------------------

@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is not None,
                    reason="bitsandbytes is installed")
@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_a_quantised_base_without_bitsandbytes_is_one_line(bits):
    with pytest.raises(ConfigError, match=rf"^config key 'quantization': {bits} needs "
                       r"bitsandbytes \(pip install 'fedlora\[qlora\]'\)$"):
        precision.load_options("float32", bits, "causal-lm")


def test_a_quantised_base_without_a_gpu_is_one_line(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "bitsandbytes" else real(name, *a))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"^config key 'quantization': 4bit needs a CUDA "
                       r"GPU \(bitsandbytes' kernels\), and this process sees none$"):
        precision.check_quantization("4bit")
    precision.check_quantization("none")  # nothing to check


def test_loading_a_quantised_model_here_is_refused_before_it_loads(tiny_llama, topic_dataset):
    config = _config(tiny_llama, topic_dataset, quantization="4bit")
    with pytest.raises(ConfigError, match=r"^config key 'quantization': 4bit needs "):
        build_lora_model(ModelSpec.from_config(config, LABEL_WORDS))


@pytest.mark.parametrize("strategy", ["flora", "fedex"])
def test_strategies_that_change_the_base_refuse_a_quantised_one(strategy):
    with pytest.raises(ConfigError, match=rf"^config key 'quantization': strategy {strategy} "
                       "adds dense changes to the base weights"):
        resolve({"strategy": strategy, "quantization": "8bit"})
    resolve({"strategy": "fedavg", "quantization": "8bit"})  # refused only where it loads
