"""Changes to the frozen base weights (FLoRA, FedEx-LoRA; docs/algorithms.md §10).

A strategy that folds an update into the base weights hands the server an
*increment* per round: for some LoRA-targeted modules, factors (left d×q,
right q×k) whose product is added to that module's weight (nn.Linear's
(out, in) layout, the layout of PEFT's ``lora_B @ lora_A``). Modules are named
by the base model's own parameter (``bert.encoder.layer.0.attention.self.query.weight``),
so the export loads into a plain transformers model.

Server (``BaseLedger``): the cumulative change per module, dense (its own
evaluation and the export need it), and the log of increments. A node is
sent what it has not seen: the increments after the version it last
acknowledged (each reply reports the version it trained on), or the dense
cumulative change when that is fewer bytes. Node (``NodeBase``): its
cumulative change in its persistent state, one d×k float32 matrix per changed
module, written into the shared, process-wide model before each message and
taken out again (``write_base``) for a message of a run that changes nothing.
"""

from __future__ import annotations

import os
import re
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from fedlora.wire import codec

if TYPE_CHECKING:  # imported where a model is used (the server's ledger needs neither)
    import torch
    from peft import PeftModel

Increment = dict[str, tuple[np.ndarray, np.ndarray]]  # module → (left d×q, right q×k)
VERSION_KEY = "fedlora-base-version"  # node memory: ConfigRecord {"version": v}
DELTA_KEY = "fedlora-base-delta"  # node memory: ArrayRecord module → d×k
_INCREMENT = re.compile(r"^(\d+)/(.+)/(left|right)$")
_DENSE = re.compile(r"^set/(.+)$")


def base_weight_name(lora_a_name: str) -> str:
    """The base model's parameter a LoRA module adapts, from its lora_A name
    (``base_model.model.X.lora_A.weight`` → ``X.weight``)."""
    module = lora_a_name.split(".lora_A.")[0]
    return module.removeprefix("base_model.model.") + ".weight"


def product(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """left @ right in float32: the one way server and nodes form a change."""
    return np.matmul(left.astype(np.float32), right.astype(np.float32))


class BaseLedger:
    """The server's record of base-weight changes."""

    def __init__(self, shapes: Mapping[str, tuple[int, int]]) -> None:
        self.shapes = dict(shapes)  # module → (d, k): the modules a change may touch
        self.cumulative: dict[str, np.ndarray] = {}
        self.log: list[Increment] = []
        self.acknowledged: dict[int, int] = {}  # node id → version it trained on

    @property
    def version(self) -> int:
        return len(self.log)

    def apply(self, increment: Increment) -> None:
        for module, (left, right) in increment.items():
            if module not in self.shapes or (left.shape[0], right.shape[1]) != self.shapes[module]:
                raise ValueError(f"base increment for {module!r} has the wrong shape")
            change = product(left, right)
            self.cumulative[module] = self.cumulative.get(module, 0) + change
        self.log.append({m: (left.astype(np.float32), right.astype(np.float32))
                         for m, (left, right) in increment.items()})

    def forget(self, node_id: int) -> None:
        """Assume nothing of a node whose reply failed (it may have lost its
        state): its next update starts from version 0."""
        self.acknowledged.pop(node_id, None)

    def acknowledge(self, node_id: int, version: int) -> None:
        """A node reported training on ``version``; never beyond what exists."""
        if 0 <= version <= self.version:
            self.acknowledged[node_id] = version

    def update_for(self, node_id: int) -> tuple[int, bytes | None]:
        """(the version the update starts from, its payload) for one node:
        None when the node is up to date."""
        since = self.acknowledged.get(node_id, 0)
        if since == self.version:
            return since, None
        tensors: dict[str, np.ndarray] = {}
        for version in range(since + 1, self.version + 1):
            for module, (left, right) in self.log[version - 1].items():
                tensors[f"{version}/{module}/left"] = left
                tensors[f"{version}/{module}/right"] = right
        dense = sum(v.size for v in self.cumulative.values())
        if sum(v.size for v in tensors.values()) > dense:
            return 0, codec.encode({f"set/{m}": v for m, v in self.cumulative.items()})
        return since, codec.encode(tensors)


class NodeBase:
    """A node's cumulative base change, kept in its persistent state."""

    def __init__(self, memory: RecordDict) -> None:
        self.memory = memory
        record = memory.config_records.get(VERSION_KEY)
        self.version = int(record["version"]) if record is not None else 0
        stored = memory.array_records.get(DELTA_KEY)
        self.delta = {m: a.numpy() for m, a in stored.items()} if stored is not None else {}

    def update(self, blob: bytes | None, since: int, version: int,
               shapes: Mapping[str, tuple[int, int]]) -> None:
        """Apply the server's update (from version ``since`` to ``version``)
        and keep the result; refuses one that does not connect to what this
        node holds or names a module or shape the model does not have."""
        if since > self.version:  # checked first: "nothing new" needs it too
            raise codec.PayloadError(f"base update starts at version {since}, this node "
                                     f"holds {self.version} (its state was lost)")
        if blob is None or version == self.version:
            return
        tensors = codec.decode_any(blob)
        dense = {m.group(1): v for n, v in tensors.items() if (m := _DENSE.match(n))}
        if dense:
            self.delta = {}
        for module, change in dense.items():
            self._check(module, change.shape, shapes)
            self.delta[module] = change.astype(np.float32)
        steps: dict[int, dict[str, dict[str, np.ndarray]]] = {}
        for name, value in tensors.items():
            if (m := _INCREMENT.match(name)) is not None:
                steps.setdefault(int(m.group(1)), {}).setdefault(m.group(2), {})[m.group(3)] = value
            elif not _DENSE.match(name):
                raise codec.PayloadError(f"base update: unexpected tensor {name!r}")
        for step in sorted(s for s in steps if s > self.version and not dense):
            for module, parts in steps[step].items():
                if set(parts) != {"left", "right"}:
                    raise codec.PayloadError(f"base update {step}: {module!r} lacks a factor")
                change = product(parts["left"], parts["right"])
                self._check(module, change.shape, shapes)
                self.delta[module] = self.delta.get(module, 0) + change
        self.version = version
        self.memory.config_records[VERSION_KEY] = ConfigRecord({"version": version})
        self.memory.array_records[DELTA_KEY] = ArrayRecord(
            {m: Array(np.ascontiguousarray(v)) for m, v in self.delta.items()})

    @staticmethod
    def _check(module: str, shape: tuple[int, ...], shapes: Mapping[str, tuple[int, int]]):
        if module not in shapes:
            raise codec.PayloadError(f"base update names {module!r}, not a LoRA-targeted "
                                     "weight of this model")
        if tuple(shape) != tuple(shapes[module]):
            raise codec.PayloadError(f"base update for {module!r} has shape {tuple(shape)}, "
                                     f"the weight {tuple(shapes[module])}")


def base_weights(model: PeftModel) -> dict[str, torch.nn.Parameter]:
    """The LoRA-adapted base weights of ``model``, by base parameter name.
    Found once per model: every client session asks (twice), and walking a
    model's parameters cost a few ms each time, which a cohort's clients
    (``cohort-size``) pay one after another."""
    found = _BASE_WEIGHTS.get(model)
    if found is None:
        found = _BASE_WEIGHTS[model] = {}
        for name, param in model.named_parameters():
            if name.endswith(".base_layer.weight"):
                plain = name.removeprefix("base_model.model.").replace(".base_layer.weight",
                                                                       ".weight")
                found[plain] = param
    return dict(found)


_BASE_WEIGHTS: weakref.WeakKeyDictionary[PeftModel, dict[str, torch.nn.Parameter]] = (
    weakref.WeakKeyDictionary())
_PRISTINE: weakref.WeakKeyDictionary[PeftModel, dict[str, torch.Tensor]] = (
    weakref.WeakKeyDictionary())  # the original weights of each model changed once


def write_base(model: PeftModel, delta: Mapping[str, np.ndarray]) -> None:
    """Set the model's adapted base weights to original + ``delta`` (original
    where ``delta`` has no entry). The first call keeps a copy of the
    originals, so a process-wide model serves nodes at any version."""
    weights = base_weights(model)
    original = _PRISTINE.get(model)
    if original is None:
        if not delta:
            return  # never changed: nothing to restore
        original = _PRISTINE[model] = {n: p.detach().clone() for n, p in weights.items()}
    import torch

    with torch.no_grad():
        for name, param in weights.items():
            if name in delta:
                param.copy_(original[name] + torch.from_numpy(
                    np.asarray(delta[name], dtype=np.float32)).to(param.device, param.dtype))
            else:
                param.copy_(original[name])


def shapes_of(model: PeftModel) -> dict[str, tuple[int, int]]:
    return {n: tuple(p.shape) for n, p in base_weights(model).items()}


BASE_DELTA_FILE = "base_delta.safetensors"


def save_base_delta(path, cumulative: Mapping[str, np.ndarray]) -> None:
    """The cumulative change, by base parameter name (safetensors), written
    under a temporary name and renamed: never half a file."""
    from safetensors.numpy import save_file

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({n: np.ascontiguousarray(v, dtype=np.float32) for n, v in cumulative.items()},
              str(tmp))
    os.replace(tmp, path)


def add_base_delta(model: torch.nn.Module, path) -> None:
    """Add a saved change to a plain transformers model's weights, before
    ``PeftModel.from_pretrained`` wraps it (docs/algorithms.md §10)."""
    import torch
    from safetensors.numpy import load_file

    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, change in load_file(str(path)).items():
            if name not in params or tuple(params[name].shape) != change.shape:
                raise ValueError(f"{path}: {name!r} {change.shape} does not match the model")
            params[name].add_(torch.from_numpy(change).to(params[name].device,
                                                          params[name].dtype))
