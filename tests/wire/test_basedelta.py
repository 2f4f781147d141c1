"""Base-weight changes (docs/algorithms.md §10): the server's ledger, a node's
copy, writing it into a PEFT model and the exported ``base_delta.safetensors``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import RecordDict

from fedlora.core.adapters import tensor_kind
from fedlora.wire import codec
from fedlora.wire.basedelta import (
    BaseLedger,
    NodeBase,
    add_base_delta,
    base_weight_name,
    base_weights,
    save_base_delta,
    shapes_of,
    write_base,
)

D, K = 10, 12
SHAPES = {"m.q.weight": (D, K), "m.v.weight": (D, K)}


def _increment(rng, rank: int, modules=("m.q.weight", "m.v.weight")):
    return {m: (rng.standard_normal((D, rank)).astype(np.float32),
                rng.standard_normal((rank, K)).astype(np.float32)) for m in modules}


def _sum_of(increments, module):
    return sum(left.astype(np.float64) @ right for inc in increments
               for m, (left, right) in inc.items() if m == module)


def test_base_weight_name():
    assert base_weight_name("base_model.model.bert.encoder.layer.0.attention.self.query"
                            ".lora_A.weight") == "bert.encoder.layer.0.attention.self.query.weight"
    assert base_weight_name("m.q.lora_A.weight") == "m.q.weight"


# -- BaseLedger -------------------------------------------------------------------
def test_ledger_accumulates_products_and_versions():
    rng = np.random.default_rng(0)
    ledger = BaseLedger(SHAPES)
    assert ledger.version == 0 and ledger.cumulative == {}
    increments = [_increment(rng, 2), _increment(rng, 3, ("m.q.weight",))]
    for inc in increments:
        ledger.apply(inc)
    assert ledger.version == 2
    for module in SHAPES:
        np.testing.assert_allclose(ledger.cumulative[module], _sum_of(increments, module),
                                   rtol=1e-5, atol=1e-5)
        assert ledger.cumulative[module].dtype == np.float32


@pytest.mark.parametrize("increment", [
    {"m.x.weight": (np.ones((D, 1), np.float32), np.ones((1, K), np.float32))},  # unknown
    {"m.q.weight": (np.ones((K, 1), np.float32), np.ones((1, D), np.float32))},  # transposed
])
def test_ledger_refuses_unknown_modules_and_wrong_shapes(increment):
    ledger = BaseLedger(SHAPES)
    with pytest.raises(ValueError, match="wrong shape"):
        ledger.apply(increment)
    assert ledger.version == 0 and ledger.cumulative == {}


def test_update_for_sends_increments_since_the_acknowledged_version():
    rng = np.random.default_rng(1)
    ledger = BaseLedger(SHAPES)
    assert ledger.update_for(5) == (0, None)  # nothing changed yet
    ledger.apply(_increment(rng, 1))
    since, blob = ledger.update_for(5)  # rank 1: 2·22 values < 2·120 dense
    assert since == 0
    assert set(codec.decode_any(blob)) == {f"1/{m}/{side}" for m in SHAPES
                                           for side in ("left", "right")}
    ledger.acknowledge(5, 1)
    assert ledger.update_for(5) == (1, None)  # up to date
    ledger.apply(_increment(rng, 1))
    ledger.apply(_increment(rng, 1))
    since, blob = ledger.update_for(5)
    assert since == 1
    tensors = codec.decode_any(blob)
    assert {n.split("/")[0] for n in tensors} == {"2", "3"}
    for version in (2, 3):
        for module in SHAPES:
            np.testing.assert_array_equal(tensors[f"{version}/{module}/left"],
                                          ledger.log[version - 1][module][0])
    # a version beyond what exists, or negative, is not believed
    ledger.acknowledge(5, 9)
    ledger.acknowledge(5, -1)
    assert ledger.acknowledged[5] == 1


def test_update_for_sends_the_dense_change_when_smaller():
    rng = np.random.default_rng(2)
    ledger = BaseLedger(SHAPES)
    for _ in range(3):
        ledger.apply(_increment(rng, 4))  # 3·4·22 = 264 values a module > 120 dense
    since, blob = ledger.update_for(7)
    assert since == 0
    tensors = codec.decode_any(blob)
    assert set(tensors) == {f"set/{m}" for m in SHAPES}
    for module in SHAPES:
        np.testing.assert_array_equal(tensors[f"set/{module}"], ledger.cumulative[module])
    # one small increment after an acknowledged version goes as an increment again
    ledger.acknowledge(7, 3)
    ledger.apply(_increment(rng, 1))
    since, blob = ledger.update_for(7)
    assert since == 3 and all(n.startswith("4/") for n in codec.decode_any(blob))


# -- NodeBase ---------------------------------------------------------------------
def _catch_up(node: NodeBase, ledger: BaseLedger, node_id: int) -> None:
    since, blob = ledger.update_for(node_id)
    node.update(blob, since, ledger.version, SHAPES)


@pytest.mark.parametrize("rank", [1, 4])  # increments / dense catch-up
def test_node_reaches_the_ledger_and_keeps_it(rank):
    rng = np.random.default_rng(3)
    ledger, memory = BaseLedger(SHAPES), RecordDict()
    for _ in range(3):
        ledger.apply(_increment(rng, rank))
    node = NodeBase(memory)
    assert node.version == 0 and node.delta == {}
    _catch_up(node, ledger, 1)
    assert node.version == 3
    for module in SHAPES:  # formed by the same float32 product, in the same order
        np.testing.assert_array_equal(node.delta[module], ledger.cumulative[module])
    again = NodeBase(memory)  # its persistent state holds it for the next message
    assert again.version == 3
    for module in SHAPES:
        np.testing.assert_array_equal(again.delta[module], ledger.cumulative[module])
    ledger.acknowledge(1, 3)
    ledger.apply(_increment(rng, 1, ("m.v.weight",)))
    _catch_up(again, ledger, 1)
    assert again.version == 4
    for module in SHAPES:
        np.testing.assert_allclose(again.delta[module], ledger.cumulative[module],
                                   rtol=1e-6, atol=1e-6)


def test_node_ahead_of_its_acknowledgement_skips_what_it_has():
    rng = np.random.default_rng(4)
    ledger, memory = BaseLedger(SHAPES), RecordDict()
    ledger.apply(_increment(rng, 1))
    ledger.apply(_increment(rng, 1))
    node = NodeBase(memory)
    _catch_up(node, ledger, 1)  # node at 2
    ledger.acknowledge(1, 1)  # the server last heard version 1 (an older reply)
    ledger.apply(_increment(rng, 1))
    since, blob = ledger.update_for(1)
    assert since == 1 and {n.split("/")[0] for n in codec.decode_any(blob)} == {"2", "3"}
    node.update(blob, since, ledger.version, SHAPES)
    assert node.version == 3
    for module in SHAPES:  # increment 2 counted once
        np.testing.assert_allclose(node.delta[module], ledger.cumulative[module],
                                   rtol=1e-6, atol=1e-6)


def test_node_behind_the_update_refuses_it():
    rng = np.random.default_rng(5)
    ledger = BaseLedger(SHAPES)
    for _ in range(2):
        ledger.apply(_increment(rng, 1))
    ledger.acknowledge(1, 1)
    since, blob = ledger.update_for(1)
    node = NodeBase(RecordDict())  # its state was lost: it holds version 0
    with pytest.raises(codec.PayloadError, match="version"):
        node.update(blob, since, ledger.version, SHAPES)


def test_node_behind_an_empty_update_refuses_it():
    """The server believes the node is up to date (no blob) at version 2, but
    the node holds version 0 (its state was lost): training on the wrong base
    must not go unnoticed."""
    rng = np.random.default_rng(6)
    ledger = BaseLedger(SHAPES)
    for _ in range(2):
        ledger.apply(_increment(rng, 1))
    ledger.acknowledge(1, 2)
    since, blob = ledger.update_for(1)
    assert (since, blob) == (2, None)
    node = NodeBase(RecordDict())
    with pytest.raises(codec.PayloadError, match="version"):
        node.update(blob, since, ledger.version, SHAPES)


@pytest.mark.parametrize("tensors, problem", [
    ({"set/m.x.weight": np.zeros((D, K), np.float32)}, "m.x.weight"),
    ({"set/m.q.weight": np.zeros((K, D), np.float32)}, "shape"),
    ({"1/m.x.weight/left": np.zeros((D, 1), np.float32),
      "1/m.x.weight/right": np.zeros((1, K), np.float32)}, "m.x.weight"),
    ({"1/m.q.weight/left": np.zeros((K, 1), np.float32),
      "1/m.q.weight/right": np.zeros((1, D), np.float32)}, "shape"),
    ({"1/m.q.weight/left": np.zeros((D, 1), np.float32)}, "lacks a factor"),
    ({"weights": np.zeros((D, K), np.float32)}, "unexpected tensor"),
])
def test_node_refuses_bad_modules_and_shapes(tensors, problem):
    memory = RecordDict()
    node = NodeBase(memory)
    with pytest.raises(codec.PayloadError, match=problem):
        node.update(codec.encode(tensors), 0, 1, SHAPES)
    assert NodeBase(memory).version == 0  # nothing kept


# -- a PEFT model -----------------------------------------------------------------
@pytest.fixture(scope="module")
def peft_model(tiny_bert):
    from fedlora.learning.models import ModelSpec, build_lora_model

    spec = ModelSpec(str(tiny_bert), "seq-cls", ("a", "b"), 4, 8.0, 0.0, None, 0)
    return build_lora_model(spec)


def test_base_names_and_shapes_match_the_adapter(peft_model):
    """What a server's ledger is keyed by (from the adapter's names) is what a
    node's model has (``shapes_of``)."""
    state = peft_model.initial_state
    from_adapter = {base_weight_name(a): (state[a.replace(".lora_A.", ".lora_B.")].shape[0],
                                          state[a].shape[1])
                    for a in state if tensor_kind(a) == "lora_A"}
    assert from_adapter and shapes_of(peft_model.peft) == from_adapter


def test_write_base_sets_and_restores_the_originals(peft_model):
    weights = base_weights(peft_model.peft)
    original = {n: p.detach().clone() for n, p in weights.items()}
    names = sorted(weights)
    rng = np.random.default_rng(7)
    delta = {names[0]: rng.standard_normal(tuple(weights[names[0]].shape)).astype(np.float32),
             names[1]: rng.standard_normal(tuple(weights[names[1]].shape)).astype(np.float32)}
    write_base(peft_model.peft, delta)
    for name in names:
        want = original[name] + torch.from_numpy(delta[name]) if name in delta else original[name]
        torch.testing.assert_close(weights[name].detach(), want, rtol=0, atol=0)
    write_base(peft_model.peft, {names[1]: delta[names[1]]})  # another node's version
    torch.testing.assert_close(weights[names[0]].detach(), original[names[0]], rtol=0, atol=0)
    torch.testing.assert_close(weights[names[1]].detach(),
                               original[names[1]] + torch.from_numpy(delta[names[1]]),
                               rtol=0, atol=0)
    write_base(peft_model.peft, {})  # a run that changes nothing
    for name in names:
        torch.testing.assert_close(weights[name].detach(), original[name], rtol=0, atol=0)


def test_saved_base_delta_loads_into_a_plain_model(tiny_bert, tmp_path):
    from transformers import AutoModelForSequenceClassification

    def plain():
        torch.manual_seed(0)
        return AutoModelForSequenceClassification.from_pretrained(str(tiny_bert), num_labels=2)

    before = dict(plain().named_parameters())
    name = "bert.encoder.layer.1.attention.self.value.weight"
    change = np.random.default_rng(8).standard_normal(tuple(before[name].shape)
                                                      ).astype(np.float32)
    path = tmp_path / "base_delta.safetensors"
    save_base_delta(path, {name: change})
    assert [p.name for p in tmp_path.iterdir()] == ["base_delta.safetensors"]  # no temp left
    model = plain()
    add_base_delta(model, path)
    after = dict(model.named_parameters())
    torch.testing.assert_close(after[name].detach(),
                               before[name].detach() + torch.from_numpy(change),
                               rtol=0, atol=0)
    other = "bert.encoder.layer.0.attention.self.value.weight"
    torch.testing.assert_close(after[other].detach(), before[other].detach(), rtol=0, atol=0)
    save_base_delta(path, {"bert.nothing.weight": change})
    with pytest.raises(ValueError, match="does not match"):
        add_base_delta(plain(), path)
    wide = "bert.encoder.layer.1.intermediate.dense.weight"  # 64×32: its transpose differs
    save_base_delta(path, {wide: np.zeros(tuple(before[wide].shape)[::-1], np.float32)})
    with pytest.raises(ValueError, match="does not match"):
        add_base_delta(plain(), path)
