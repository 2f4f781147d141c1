"""How the frozen base sits in memory: ``model-dtype``, ``quantization`` and
``gradient-checkpointing``.

- ``model-dtype=bfloat16`` loads the base weights in bf16 (half the memory of
  float32, the default everywhere: on a GPU the compute runs under bf16
  autocast anyway, ``fedlora.learning.models.autocast``). What trains stays
  float32: PEFT keeps LoRA factors in float32 (``autocast_adapter_dtype``),
  and a trained head (``modules_to_save``) is cast here and fed float32
  inputs, so the wire (``fedlora.core.adapters``: float32 arrays) and the
  optimiser never see bf16. On a CPU it saves memory only: a CPU without
  native bf16 matrix units computes it far slower than float32 (20× per
  step for SmolLM2 on the development machine, BENCHMARKS.md "Instruction
  tuning"), so it is logged as a warning there.
- ``quantization=4bit`` is QLoRA's base (Dettmers et al. 2023): NF4 with
  double quantisation, bf16 compute; ``8bit`` is LLM.int8(). Both are
  bitsandbytes' CUDA kernels: without bitsandbytes or a GPU the run is refused
  in one line, as are strategies that add dense changes to the base weights
  (``LoraStrategy.changes_base``: FLoRA, FedEx-LoRA), which a quantised
  weight cannot take. The base is then prepared the PEFT way
  (``prepare_model_for_kbit_training``: other weights in float32, frozen).
- ``gradient-checkpointing`` recomputes each layer's activations in the
  backward pass. It uses torch's *reentrant* checkpoint, on purpose: Opacus
  (``dp=local``) records a layer's input in a forward hook and pops it in the
  backward hook. The non-reentrant checkpoint runs the layer's forward (and
  its hooks) twice but its backward hook once, so Opacus's per-layer
  counters never return to zero and no per-sample gradient appears. The
  reentrant one runs the first forward without grad (Opacus records
  nothing) and the recomputation with its own backward, so each layer is
  recorded and consumed once; per-sample gradients are then the same as
  without checkpointing, dropout included (tests/learning/test_precision.py).
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

import torch

from fedlora.core.config import ConfigError

LOGGER = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
CHECKPOINTING = {"use_reentrant": True}  # see the module docstring (Opacus)
HEADS = ["classifier", "score"]  # sequence-classification heads: trained, never quantised


def check_quantization(quantization: str) -> None:
    """Refuse a quantised base where bitsandbytes cannot run it."""
    if quantization == "none":
        return
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(f"config key 'quantization': {quantization} needs bitsandbytes "
                          "(pip install 'fedlora[qlora]')")
    if not torch.cuda.is_available():
        raise ConfigError(f"config key 'quantization': {quantization} needs a CUDA GPU "
                          "(bitsandbytes' kernels), and this process sees none")


def load_options(dtype: str, quantization: str, task: str) -> dict[str, Any]:
    """``from_pretrained`` keyword arguments for the base model."""
    options: dict[str, Any] = {"dtype": DTYPES[dtype]}
    if dtype == "bfloat16" and not torch.cuda.is_available():
        LOGGER.warning("model-dtype=bfloat16 on a CPU halves the base's memory but can make "
                       "each step many times slower than float32 (no bf16 matrix units)")
    if quantization == "none":
        return options
    check_quantization(quantization)
    from transformers import BitsAndBytesConfig

    skip = HEADS if task == "seq-cls" else None  # None: transformers' own (the LM head)
    if quantization == "4bit":
        compute = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        options["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute, llm_int8_skip_modules=skip)
    else:
        options["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True,
                                                            llm_int8_skip_modules=skip)
    options["device_map"] = {"": torch.cuda.current_device()}
    return options


def prepare_base(base: torch.nn.Module, quantization: str, checkpointing: bool) -> None:
    """Quantised-base preparation and gradient checkpointing, before PEFT wraps ``base``."""
    if quantization != "none":
        from peft import prepare_model_for_kbit_training

        prepare_model_for_kbit_training(base, use_gradient_checkpointing=checkpointing,
                                        gradient_checkpointing_kwargs=dict(CHECKPOINTING))
    elif checkpointing:
        enable = getattr(base, "activation_checkpointing_enable", None)  # transformers ≥ 5.x's
        if enable is not None:  # name; the old one warns that it is going
            enable(activation_checkpointing_kwargs=dict(CHECKPOINTING))
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=dict(CHECKPOINTING))
        base.enable_input_require_grads()  # the reentrant checkpoint needs a grad input
    if checkpointing:
        base.config.use_cache = False  # a KV cache is useless (and refused) in training


def _inputs_in_float32(_module: torch.nn.Module, args: tuple) -> tuple:
    return tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a
                 for a in args)


def heads_in_float32(peft_model: torch.nn.Module) -> None:
    """Cast a trained head of a bf16 base to float32 (its input too); LoRA
    factors are float32 already (PEFT)."""
    from peft.utils import ModulesToSaveWrapper

    for wrapper in peft_model.modules():
        if not isinstance(wrapper, ModulesToSaveWrapper):
            continue
        for head in wrapper.modules_to_save.values():
            if any(p.dtype != torch.float32 for p in head.parameters()):
                head.float()
                head.register_forward_pre_hook(_inputs_in_float32)
