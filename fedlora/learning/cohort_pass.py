"""Batched multi-LoRA training: a cohort's clients (issue #29) trained in one
forward and backward pass through the shared frozen base.

Each client ("member") has its own adapter tensors: its LoRA factors and
trained head. While a step runs, every adapter-owned ``nn.Linear`` of the
PEFT model (``lora_A``, ``lora_B``, a ``modules_to_save`` head) computes, for
the batch of all members' examples concatenated in member order,
``x_c · W_cᵀ (+ b_c)`` for each member c: one ``bmm`` over the members'
weights stacked on a leading axis. PEFT's own LoRA layer around them is
unchanged (``base(x) + s · B(A(dropout(x)))``), so what the batched pass
computes is PEFT's forward, member by member; only the adapter's matmuls are
batched, and the base's are one matmul for everyone.

Each member's loss is its task loss on its own rows (``Task.loss_of``), and
the backward pass of their sum gives each member exactly the gradient of its
own loss (the base is frozen and nothing mixes rows). One optimiser holds
every member's tensors; AdamW and SGD are elementwise with per-tensor state,
so this is each member's own optimiser. A member with no batch left drops
out: its tensors get no gradient, and torch's optimisers skip them.

Randomness, as a client alone draws it: ``train_local`` seeds torch's global
generator with the client's seed and every draw of its forward pass (dropout
in the base, in attention and on the LoRA input) comes from it, in module
order. Here each member keeps its own generator state, and every random op
of the forward pass (``F.dropout``, ``F.scaled_dot_product_attention`` with
dropout) runs once per member on that member's rows with that member's state
swapped in (``MemberRandomness``): the very masks the client would draw
alone. A random op this module does not know is an error, not a silent
mismatch. Shuffling uses each member's own loader generator, as alone.

So a member's update equals its update alone up to float rounding: the same
operations, summed in other orders by differently shaped matmuls (the
bound is stated and tested in ``tests/learning/test_cohort_pass.py``).

Members are grouped per step by their batch's shape (rows, tokens): one
forward per group, because a member's masks must be drawn at its own shape.
Where batching cannot apply (``NotBatchable``: a LoRA variant such as DoRA,
an adapter tensor that is not a Linear's), the caller trains the members
one after another.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from datasets import Dataset
from torch.overrides import TorchFunctionMode

from fedlora.core.adapters import adapter_tensors, tensor_kind
from fedlora.learning.models import LoraModel, autocast
from fedlora.learning.tasks import Task
from fedlora.learning.training import TrainResult

# The most tokens (rows × length) one pass carries. On a CPU a larger pass is
# slower per token (its activations leave the caches: 64 clients of 8 × 64
# tokens, 32k tokens a pass, took 1.4× as long per client as 16 of them,
# BENCHMARKS.md "Cohorts: the batched pass"); it also bounds a GPU's
# activation memory. A member's batch larger than this is a pass alone.
PASS_TOKENS = 8192


class NotBatchable(Exception):
    """Why a model cannot be trained by the batched pass (one line)."""


@dataclass
class Member:
    """One client of a batched pass: its adapter (name → its own tensor,
    the names of ``adapter_tensors``), the tensor kinds it trains
    (``lora_A``, ``lora_B``, ``head``), its data and seed (``client_seed``)."""

    tensors: dict[str, torch.Tensor]
    trains: frozenset[str]
    data: Dataset
    seed: int
    # filled by the pass
    losses: list[float] = field(default_factory=list)
    steps: int = 0
    compute_seconds: float = 0.0
    rng_state: torch.Tensor | None = None  # its generator state after its last draw

    def result(self) -> TrainResult:
        if not all(math.isfinite(x) for x in self.losses):
            raise FloatingPointError("local training diverged (non-finite loss)")
        return TrainResult(len(self.data), self.steps,
                           sum(self.losses) / max(len(self.losses), 1), self.compute_seconds)


def train_members(model: LoraModel, members: Sequence[Member], *, task: Task, epochs: int,
                  max_steps: int, batch_size: int, lr: float, optimizer: str) -> None:
    """Train every member's tensors in place on its data, as ``train_local``
    would train each alone (without DP: Opacus needs one model per client).
    Each member's ``result()`` then says what its training did."""
    if any(len(m.data) == 0 for m in members):
        raise ValueError("client has no training examples")
    generator = _generator_for(model.device)
    for member in members:
        member.rng_state = torch.Generator(model.device).manual_seed(member.seed).get_state()
        for name, tensor in member.tensors.items():
            tensor.requires_grad_(tensor_kind(name) in member.trains)
    params = [t for m in members for t in m.tensors.values() if t.requires_grad]
    # torch's multi-tensor kernels: the same elementwise arithmetic over many
    # small tensors, without a Python loop per tensor
    opt = (torch.optim.AdamW(params, lr=lr, weight_decay=0.0, foreach=True)
           if optimizer == "adamw" else torch.optim.SGD(params, lr=lr, foreach=True))
    limit = max_steps if max_steps > 0 else math.inf
    streams = {id(m): _batches(task, model, m, batch_size, epochs, limit) for m in members}
    model.peft.train()
    outer = generator.get_state()
    try:
        with stacked_linears(model) as stack:
            while streams:
                step = {}
                for member in members:
                    stream = streams.get(id(member))
                    if stream is None:
                        continue
                    batch = next(stream, None)
                    if batch is None:
                        del streams[id(member)]
                    else:
                        step[id(member)] = (member, batch)
                if not step:
                    break
                _step(model, task, stack, generator, list(step.values()))
                opt.step()
                opt.zero_grad(set_to_none=True)
    finally:
        generator.set_state(outer)
        for tensor in params:
            tensor.requires_grad_(False)


def _step(model: LoraModel, task: Task, stack: StackedLinears, generator: torch.Generator,
          step: list[tuple[Member, dict]]) -> None:
    """One optimiser step's forward and backward for the members with a
    batch: one pass per group of equally shaped batches, each cut into
    passes of at most ``PASS_TOKENS`` tokens."""
    def shape(item: tuple[Member, dict]) -> tuple[int, ...]:
        return tuple(item[1]["input_ids"].shape)

    for size, same_shape in itertools.groupby(sorted(step, key=shape), key=shape):
        same_shape = list(same_shape)
        per_pass = max(1, PASS_TOKENS // math.prod(size))
        for first in range(0, len(same_shape), per_pass):
            _pass(model, task, stack, generator, same_shape[first:first + per_pass])


def _pass(model: LoraModel, task: Task, stack: StackedLinears, generator: torch.Generator,
          group: list[tuple[Member, dict]]) -> None:
    """One forward and backward pass for members whose batches have one shape."""
    started = time.perf_counter()
    members = [m for m, _ in group]
    batches = [b for _, b in group]
    joined = {k: torch.cat([b[k] for b in batches]) for k in batches[0]
              if isinstance(batches[0][k], torch.Tensor)}
    rows = batches[0]["input_ids"].shape[0]
    stack.use(members)
    with MemberRandomness(generator, members, rows), autocast(model.device):
        logits = task.logits(model, joined)
        losses = [task.loss_of(model, own, batch, per_example=False)
                  for own, batch in zip(logits.split(rows), batches)]
    torch.stack(losses).sum().backward()
    share = (time.perf_counter() - started) / len(members)
    for member, loss in zip(members, losses):
        member.losses.append(float(loss.detach()))
        member.steps += 1
        member.compute_seconds += share


def _batches(task: Task, model: LoraModel, member: Member, batch_size: int, epochs: int,
             limit: float) -> Iterator[dict]:
    """A member's batches in ``train_local``'s order: its loader shuffled by
    its own seed, epoch after epoch, at most ``limit`` of them."""
    loader = task.batches(model, member.data, batch_size,
                          torch.Generator().manual_seed(member.seed))
    count = 0
    for _ in range(epochs):
        for batch in loader:
            if count >= limit:
                return
            count += 1
            yield batch


def _generator_for(device: torch.device) -> torch.Generator:
    """torch's default generator on ``device`` (what ``torch.manual_seed``
    seeds and dropout draws from)."""
    if device.type == "cuda":
        return torch.cuda.default_generators[device.index or 0]
    return torch.default_generator


class StackedLinears:
    """The adapter-owned Linears of a model, computing per member while the
    context of ``stacked_linears`` is open (``use`` picks the members)."""

    def __init__(self, linears: dict[torch.nn.Linear, tuple[str, str | None]]) -> None:
        self.linears = linears  # module → (weight name, bias name)
        self.weights: dict[torch.nn.Linear, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def use(self, members: Sequence[Member]) -> None:
        """The next forward pass computes for ``members``, in this order."""
        self.weights = {
            module: (torch.stack([m.tensors[w] for m in members]),
                     torch.stack([m.tensors[b] for m in members]) if b else None)
            for module, (w, b) in self.linears.items()}

    def forward(self, module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
        """``x`` holds the members' rows in order, equally many each:
        ``x_c · W_cᵀ + b_c`` per member, as one bmm."""
        weight, bias = self.weights[module]
        count = weight.shape[0]
        flat = x.reshape(count, -1, x.shape[-1]).to(weight.dtype)
        out = (torch.bmm(flat, weight.transpose(1, 2)) if bias is None
               else torch.baddbmm(bias.unsqueeze(1), flat, weight.transpose(1, 2)))
        return out.reshape(*x.shape[:-1], weight.shape[1])


@contextmanager
def stacked_linears(model: LoraModel) -> Iterator[StackedLinears]:
    """Make every adapter-owned Linear of ``model`` compute per member (see
    the module docstring) until the context closes. ``NotBatchable`` where
    an adapter tensor is not a plain Linear's weight or bias, or a LoRA
    layer runs a variant (DoRA) whose forward is not ``B(A(x))``."""
    names = {t.data_ptr(): n for n, t in adapter_tensors(model.peft).items()}
    linears: dict[torch.nn.Linear, tuple[str, str | None]] = {}
    for module in model.peft.modules():
        if getattr(module, "lora_variant", None):
            raise NotBatchable(f"a LoRA variant ({type(module).__name__} with "
                               f"{sorted(module.lora_variant)}) is not batched")
        if type(module) is torch.nn.Linear and module.weight.data_ptr() in names:
            bias = module.bias
            linears[module] = (names[module.weight.data_ptr()],
                               names[bias.data_ptr()] if bias is not None else None)
    owned = {n for pair in linears.values() for n in pair if n}
    stray = sorted(set(names.values()) - owned)
    if stray:
        raise NotBatchable(f"adapter tensor {stray[0]} is not a Linear's weight or bias")
    stack = StackedLinears(linears)
    for module in linears:
        module.forward = lambda x, module=module: stack.forward(module, x)
    try:
        yield stack
    finally:
        for module in linears:
            del module.forward


# the random ops a transformer's forward pass makes, and which never: an op
# here is an error inside the batched pass (its draws could not be split)
_UNSPLITTABLE = {torch.bernoulli, torch.rand, torch.rand_like, torch.randn, torch.randn_like,
                 torch.randint, torch.randint_like, torch.randperm, torch.normal,
                 torch.multinomial, torch.Tensor.bernoulli_, torch.Tensor.uniform_,
                 torch.Tensor.normal_, torch.Tensor.random_, torch.Tensor.exponential_,
                 F.alpha_dropout, F.feature_alpha_dropout, F.dropout1d, F.dropout2d,
                 F.dropout3d, torch.dropout, torch.native_dropout}


class MemberRandomness(TorchFunctionMode):
    """Inside a batched forward pass, run each random op once per member, on
    its rows, from its own generator state (see the module docstring)."""

    def __init__(self, generator: torch.Generator, members: Sequence[Member],
                 rows: int) -> None:
        super().__init__()
        self.generator, self.members, self.rows = generator, members, rows

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.dropout:
            p = _arg(args, kwargs, 1, "p", 0.5)
            training = _arg(args, kwargs, 2, "training", True)
            if training and p > 0:
                return self._per_member(func, args, kwargs, split=(0,))
        elif func is F.scaled_dot_product_attention:
            if _arg(args, kwargs, 4, "dropout_p", 0.0) > 0:
                return self._per_member(func, args, kwargs, split=(0, 1, 2, 3),
                                        split_kw=("query", "key", "value", "attn_mask"))
        elif func in _UNSPLITTABLE:
            raise NotBatchable(f"the forward pass draws from {getattr(func, '__name__', func)}"
                               ", which the batched pass cannot split per client")
        return func(*args, **kwargs)

    def _per_member(self, func, args, kwargs, split: tuple[int, ...],
                    split_kw: tuple[str, ...] = ("input",)):
        total = self.rows * len(self.members)

        def pieces(value) -> list:
            """``value`` per member: its rows, cut by one ``split`` (whose
            backward joins the members' gradients in one pass; a slice per
            member would build a whole-batch gradient each, C² in all), or
            the same value for all (a mask of one row, not a tensor)."""
            if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == total:
                return list(value.split(self.rows))
            return [value] * len(self.members)

        own_args = [pieces(a) if i_arg in split else [a] * len(self.members)
                    for i_arg, a in enumerate(args)]
        own_kwargs = {k: pieces(v) if k in split_kw else [v] * len(self.members)
                      for k, v in kwargs.items()}
        outer = self.generator.get_state()
        outputs = []
        for i, member in enumerate(self.members):
            self.generator.set_state(member.rng_state)
            outputs.append(func(*(a[i] for a in own_args),
                                **{k: v[i] for k, v in own_kwargs.items()}))
            member.rng_state = self.generator.get_state()
        self.generator.set_state(outer)
        return torch.cat(outputs)


def _arg(args: tuple, kwargs: dict, index: int, name: str, default):
    return args[index] if len(args) > index else kwargs.get(name, default)
