"""Adapter state: PEFT's LoRA state dict as named float32 numpy arrays.

Names are PEFT's own (``get_peft_model_state_dict``: adapter name stripped),
so a state saved here loads with ``set_peft_model_state_dict`` and with
``PeftModel.from_pretrained``. PEFT's state dict is made once per model: its
tensors share storage with the adapter's parameters, so reading and
overwriting them afterwards is a copy per tensor, not PEFT's walk over every
module (and a re-read of the model's config.json) for every client message.

Each tensor has a *kind*: ``lora_A``, ``lora_B`` or ``head`` (a
``modules_to_save`` module such as the classifier); strategies decide per
kind what trains and what travels.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # imported where a model is used: resolving a run config loads
    # the strategies, which use this module's names, before Ray starts
    import torch
    from peft import PeftModel

State = dict[str, np.ndarray]
TENSOR_KINDS = ("lora_A", "lora_B", "head")  # what tensor_kind tells apart


def tensor_kind(name: str) -> str:
    """``lora_A``, ``lora_B`` or ``head`` for a state-dict or parameter name."""
    if ".lora_A." in name:
        return "lora_A"
    if ".lora_B." in name:
        return "lora_B"
    return "head"


_VIEWS: weakref.WeakKeyDictionary[PeftModel, dict[str, torch.Tensor]] = (
    weakref.WeakKeyDictionary())


def adapter_tensors(model: PeftModel) -> dict[str, torch.Tensor]:
    """PEFT's adapter state dict of ``model``, made on first use: name → a
    tensor that *is* the parameter's storage."""
    views = _VIEWS.get(model)
    if views is None:
        from peft import get_peft_model_state_dict

        views = get_peft_model_state_dict(model, save_embedding_layers=False)
        storage = {p.data_ptr() for p in model.parameters()}
        detached = sorted(n for n, t in views.items() if t.data_ptr() not in storage)
        if detached:  # a PEFT change would make writes here silently go nowhere
            raise RuntimeError(f"PEFT's state dict copies {detached[:3]} instead of "
                               "sharing the parameters' storage")
        _VIEWS[model] = views
    return views


def adapter_state(model: PeftModel) -> State:
    """A copy of the adapter's tensors (LoRA factors and trained head)."""
    import torch

    return {name: tensor.detach().to("cpu", torch.float32).numpy().copy()
            for name, tensor in adapter_tensors(model).items()}


def load_adapter_state(model: PeftModel, state: Mapping[str, np.ndarray]) -> None:
    """Overwrite the adapter's tensors with ``state``; every adapter tensor
    must be given, with its own shape, so nothing of a previous client
    survives."""
    own = adapter_tensors(model)
    missing = sorted(set(own) - set(state))
    unknown = sorted(set(state) - set(own))
    if missing or unknown:
        raise KeyError(f"adapter state mismatch: missing {missing[:3]}, unknown {unknown[:3]}")
    wrong = sorted(n for n, t in own.items() if tuple(np.shape(state[n])) != tuple(t.shape))
    if wrong:
        raise ValueError(f"adapter state mismatch: {wrong[0]} has shape "
                         f"{tuple(np.shape(state[wrong[0]]))}, the model's "
                         f"{tuple(own[wrong[0]].shape)}")
    import torch

    with torch.no_grad():
        for name, tensor in own.items():
            tensor.copy_(torch.from_numpy(np.asarray(state[name], dtype=np.float32)))


def set_trainable(model: PeftModel, trains: Callable[[str], bool]) -> list[torch.nn.Parameter]:
    """Let exactly the adapter parameters whose kind ``trains`` accepts receive
    gradients (the base stays frozen); returns them."""
    chosen = []
    for name, param in model.named_parameters():
        is_adapter = ".lora_" in name or ".modules_to_save." in name
        param.requires_grad_(is_adapter and trains(tensor_kind(name)))
        if param.requires_grad:
            chosen.append(param)
    return chosen


def lora_pairs(names: list[str] | tuple[str, ...]) -> list[tuple[str, str]]:
    """(A name, B name) for each LoRA module in a state."""
    pairs = []
    for name in names:
        if tensor_kind(name) == "lora_A":
            partner = name.replace(".lora_A.", ".lora_B.")
            if partner not in names:
                raise KeyError(f"{name} has no matching lora_B")
            pairs.append((name, partner))
    return pairs
