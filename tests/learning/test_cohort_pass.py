"""The batched multi-LoRA pass (``fedlora.learning.cohort_pass``) trains each
member as ``train_local`` trains that client alone: the same dropout masks,
batches and optimiser semantics, up to float rounding.

The bound: every trained tensor within 1e-5 absolute and 1e-4 relative of
its value alone, after several AdamW steps on a tiny random encoder and
decoder with dropout on (attention, hidden and LoRA input) and members of
unequal data, so that some drop out early. A wrong dropout mask, a member's
gradient leaking into another's or a skipped step moves tensors by ~1e-2,
a thousand times the bound.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from fedlora.core.adapters import adapter_state, adapter_tensors, load_adapter_state, set_trainable
from fedlora.learning.cohort_pass import Member, NotBatchable, stacked_linears, train_members
from fedlora.learning.features import client_dataset, model_for
from fedlora.learning.tasks import task_for
from fedlora.learning.training import train_local
from fedlora.strategies import resolve

ATOL, RTOL = 1e-5, 1e-4
KINDS = frozenset({"lora_A", "lora_B", "head"})


def _config(model, dataset, **keys):
    return resolve({"model": str(model), "dataset": str(dataset), "partition": "iid",
                    "num-clients": 4, "clients-per-round": 4, "max-seq-len": 24,
                    "lora-dropout": 0.2, **keys})


def _starts(model, count: int) -> list[dict[str, np.ndarray]]:
    """A different start adapter per member (B nonzero, so LoRA is live)."""
    rng = np.random.default_rng(7)
    return [{n: (v + rng.normal(0, 0.05, v.shape)).astype(np.float32)
             for n, v in model.initial_state.items()} for _ in range(count)]


def _alone(model, task, start, data, seed, trains, **train):
    load_adapter_state(model.peft, start)
    params = set_trainable(model.peft, lambda kind: kind in trains)
    result = train_local(model, params, data, task=task, seed=seed, **train)
    return adapter_state(model.peft), result


def _compare(model, task, config, trains=KINDS, **train) -> list[Member]:
    starts = _starts(model, 4)
    datas = [client_dataset(config, i).select(range(n)) for i, n in enumerate((12, 5, 9, 12))]
    seeds = [11, 12, 13, 14]
    alone = [_alone(model, task, s, d, seed, trains, **train)
             for s, d, seed in zip(starts, datas, seeds)]
    members = [Member({n: torch.tensor(v) for n, v in s.items()}, trains, d, seed)
               for s, d, seed in zip(starts, datas, seeds)]
    train_members(model, members, task=task, **train)
    for member, (state, result) in zip(members, alone):
        mine = member.result()
        assert (mine.steps, mine.num_examples) == (result.steps, result.num_examples)
        assert mine.mean_loss == pytest.approx(result.mean_loss, rel=1e-4)
        for name, value in state.items():
            np.testing.assert_allclose(member.tensors[name].detach().numpy(), value,
                                       atol=ATOL, rtol=RTOL, err_msg=name)
    return members


TRAIN = {"epochs": 2, "max_steps": 0, "batch_size": 4, "lr": 0.01, "optimizer": "adamw"}


def test_members_of_an_encoder_train_as_each_alone(tiny_bert, topic_dataset, quiet_datasets):
    config = _config(tiny_bert, topic_dataset)
    model = model_for(config)
    members = _compare(model, task_for(config), config, **TRAIN)
    assert [m.steps for m in members] == [6, 4, 6, 6]  # ceil(n/4) per epoch, 2 epochs


def test_members_cut_into_several_passes_train_as_each_alone(tiny_bert, topic_dataset,
                                                             quiet_datasets, monkeypatch):
    """A step's equally shaped batches go in passes of at most
    ``PASS_TOKENS`` tokens (a batch larger than that alone): cut small, the
    members still train as alone, in more passes than uncut."""
    from fedlora.learning import cohort_pass

    real = cohort_pass._pass
    config = _config(tiny_bert, topic_dataset)
    passes: dict[int, list[tuple[int, int]]] = {}
    for budget in (8192, 64):
        seen = passes.setdefault(budget, [])

        def counted(model, task, stack, generator, group, seen=seen):
            seen.append((len(group), group[0][1]["input_ids"].numel()))
            return real(model, task, stack, generator, group)

        monkeypatch.setattr(cohort_pass, "PASS_TOKENS", budget)
        monkeypatch.setattr(cohort_pass, "_pass", counted)
        _compare(model_for(config), task_for(config), config, **TRAIN)
    assert len(passes[64]) > len(passes[8192])
    assert all(members == 1 or members * tokens <= 64 for members, tokens in passes[64])


def test_members_train_only_what_their_strategy_trains(tiny_bert, topic_dataset,
                                                       quiet_datasets):
    config = _config(tiny_bert, topic_dataset)
    model = model_for(config)
    before = _starts(model, 4)
    members = _compare(model, task_for(config), config, trains=frozenset({"lora_B", "head"}),
                       **{**TRAIN, "optimizer": "sgd"})
    for member, start in zip(members, before):
        for name, value in start.items():
            if ".lora_A." in name:
                assert np.array_equal(member.tensors[name].numpy(), value)


def test_members_of_a_decoder_train_as_each_alone(tiny_chat_llama, topic_dataset,
                                                  quiet_datasets):
    config = _config(tiny_chat_llama, topic_dataset, task="sft",
                     **{"sft-prompt": "topic? {text}"})
    model = model_for(config)
    _compare(model, task_for(config), config, **{**TRAIN, "epochs": 1, "max_steps": 2})


def test_the_bound_catches_a_member_drawing_another_members_masks(tiny_bert, topic_dataset,
                                                                  quiet_datasets,
                                                                  monkeypatch):
    """Break the per-member randomness (every member draws from the first
    member's state) and the comparison fails: the masks matter."""
    from fedlora.learning import cohort_pass

    real = cohort_pass.MemberRandomness._per_member

    def shared(self, *args, **kwargs):
        for member in self.members[1:]:
            member.rng_state = self.members[0].rng_state
        return real(self, *args, **kwargs)

    monkeypatch.setattr(cohort_pass.MemberRandomness, "_per_member", shared)
    config = _config(tiny_bert, topic_dataset)
    with pytest.raises(AssertionError):
        _compare(model_for(config), task_for(config), config, **TRAIN)


def test_a_lora_variant_is_not_batched(tiny_bert, topic_dataset, quiet_datasets):
    config = _config(tiny_bert, topic_dataset)
    model = model_for(config)
    layer = next(m for m in model.peft.modules() if hasattr(m, "lora_variant"))
    layer.lora_variant["default"] = object()
    try:
        with pytest.raises(NotBatchable, match="variant"), stacked_linears(model):
            pass
    finally:
        del layer.lora_variant["default"]
    assert adapter_tensors(model.peft)  # the model is left as it was


def _backward_nodes(graph_root) -> Counter:
    """How many autograd nodes of each kind the graph below ``graph_root`` has."""
    seen, todo, kinds = set(), [graph_root], Counter()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        kinds[type(node).__name__] += 1
        todo.extend(following for following, _ in node.next_functions)
    return kinds


def test_the_members_rows_are_cut_once_per_op_not_once_per_member(
        tiny_bert, topic_dataset, quiet_datasets, monkeypatch):
    """The backward pass of a member's rows cut by its own slice builds a
    whole-batch gradient per member (C² work: at 250 members the pass was
    2.5× slower per client than at 50); one ``split`` per op joins them in one
    pass. So the graph of a step has no per-member slices, and as many split
    nodes for 4 members as for 2."""
    graphs: list[Counter] = []
    backward = torch.Tensor.backward

    def recording(self, *args, **kwargs):
        graphs.append(_backward_nodes(self.grad_fn))
        return backward(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "backward", recording)
    config = _config(tiny_bert, topic_dataset)
    model = model_for(config)
    data = client_dataset(config, 0).select(range(1))  # one shape: one pass per step
    for count in (2, 4):
        members = [Member({n: torch.tensor(v) for n, v in start.items()}, KINDS, data, seed)
                   for seed, start in enumerate(_starts(model, count))]
        train_members(model, members, task=task_for(config), **{**TRAIN, "epochs": 1})
    two, four = graphs
    assert two["SplitBackward0"] == four["SplitBackward0"] > 0
    assert four["SliceBackward0"] == 0, four
