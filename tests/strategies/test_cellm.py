"""CELLM (docs/algorithms.md §4): global top-k, sparse uploads, error
feedback, sparse downloads, and the server's SGD or Adam with its state."""

from __future__ import annotations

import numpy as np
from by_hand import (
    SQ_R,
    SQUARE_SHAPES,
    download_shapes,
    merge_of,
    square_adapter,
    square_strategy,
    square_updates,
)
from flwr.app import RecordDict

from fedlora.strategies import resolve
from fedlora.strategies.base import ClientUpdate
from fedlora.strategies.cellm import RESIDUAL_KEY, Cellm, CellmClient
from fedlora.wire import codec
from fedlora.wire.sparsity import top_k


def test_top_k_keeps_the_largest_entries_globally():
    rng = np.random.default_rng(6)
    tensors = square_adapter(rng)
    kept = top_k(tensors, 0.1)
    total = sum(v.size for v in tensors.values())
    assert sum(len(t.indices) for t in kept.values()) == round(0.1 * total)
    smallest_kept = min(np.abs(t.values).min() for t in kept.values() if len(t.values))
    dropped = np.concatenate([np.delete(np.abs(tensors[n]).ravel(), kept[n].indices)
                              for n in tensors])
    assert smallest_kept >= dropped.max()
    for name, tensor in kept.items():
        assert np.all(np.diff(tensor.indices) > 0)
        np.testing.assert_array_equal(tensor.values, tensors[name].ravel()[tensor.indices])


def test_cellm_upload_is_sparse_and_bytes_shrink():
    rng = np.random.default_rng(7)
    config = resolve({"strategy": "cellm", "cellm-up-density": 0.05})
    shapes = {"m.q.lora_A.weight": (8, 384), "m.q.lora_B.weight": (384, 8)}
    start = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
    trained = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
    sent = CellmClient(config).upload(start, trained, RecordDict())
    kept = sum(len(t.indices) for t in sent.values())
    assert kept == round(0.05 * sum(v.size for v in start.values()))
    sparse_bytes, dense_bytes = len(codec.encode(sent)), len(codec.encode(trained))
    assert sparse_bytes * 10 < dense_bytes
    decoded = codec.decode(codec.encode(sent), {n: v.shape for n, v in start.items()})
    for name, tensor in sent.items():
        np.testing.assert_array_equal(decoded[name], tensor.to_dense())


def test_cellm_error_feedback_conserves_mass():
    rng = np.random.default_rng(8)
    config = resolve({"strategy": "cellm", "cellm-up-density": 0.1,
                      "cellm-error-feedback": True})
    client, memory = CellmClient(config), RecordDict()
    start, trained = square_adapter(rng), square_adapter(rng)
    sent = client.upload(start, trained, memory)
    residual = {n: a.numpy() for n, a in memory.array_records[RESIDUAL_KEY].items()}
    for name in start:
        np.testing.assert_allclose(sent[name].to_dense() + residual[name],
                                   start[name] - trained[name], rtol=0, atol=1e-6)
    # next round: the remainder is added before selection
    start2, trained2 = square_adapter(rng), square_adapter(rng)
    sent2 = client.upload(start2, trained2, memory)
    residual2 = {n: a.numpy() for n, a in memory.array_records[RESIDUAL_KEY].items()}
    for name in start:
        np.testing.assert_allclose(sent2[name].to_dense() + residual2[name],
                                   start2[name] - trained2[name] + residual[name],
                                   rtol=0, atol=1e-5)


def test_cellm_dense_sgd_equals_averaging_client_models():
    rng = np.random.default_rng(10)
    strategy = square_strategy(Cellm, rng, **{"cellm-up-density": 1.0})
    clients = [square_adapter(rng) for _ in range(3)]
    weights = [1.0, 2.0, 5.0]
    updates = [ClientUpdate(i, i, SQ_R, w, {n: strategy.sent[n] - c[n] for n in c})
               for i, (w, c) in enumerate(zip(weights, clients))]
    merged = merge_of(strategy, updates)
    for name in SQUARE_SHAPES:
        expected = sum(w / 8.0 * c[name] for w, c in zip(weights, clients))
        np.testing.assert_allclose(merged[name], expected, rtol=1e-5, atol=1e-5)


def test_cellm_sparse_download_masks_the_global():
    rng = np.random.default_rng(11)
    strategy = square_strategy(Cellm, rng, **{"cellm-down-density": 0.2})
    sent, blob = strategy.download(strategy.state)
    nonzero = sum(int(np.count_nonzero(v)) for v in sent.values())
    assert nonzero == round(0.2 * sum(v.size for v in strategy.state.values()))
    assert len(blob) < len(codec.encode(strategy.state))
    decoded = codec.decode(blob, download_shapes(strategy))
    for name in sent:
        np.testing.assert_array_equal(decoded[name], sent[name])


ADAM = {"cellm-server-optimizer": "adam", "cellm-server-lr": 1e-3}


class ForgetfulCellm(Cellm):
    """CELLM with LoraStrategy's default, a no-op load_state_dict."""

    def load_state_dict(self, state):
        pass


def _resumed_second_round(cls) -> tuple[dict, dict]:
    """(round 2 of an uninterrupted CELLM run with server Adam, round 2 of a
    run restarted after round 1 from the global adapter and ``state_dict``,
    as ``cls``). The two rounds' updates differ: with one gradient repeated,
    Adam's bias-corrected step is the same whatever its moments and step
    count, so a restart that forgot them would go unnoticed."""
    rng = np.random.default_rng(12)
    first = square_strategy(Cellm, rng, **ADAM)
    one, two = square_updates(rng), square_updates(rng)
    first.start_round(merge_of(first, one))  # round 1's global is round 2's start
    saved = {k: v.copy() for k, v in first.state_dict().items()}
    resumed = square_strategy(cls, np.random.default_rng(12), **ADAM)
    resumed.start_round(first.state)
    resumed.load_state_dict(saved)
    return merge_of(first, two), merge_of(resumed, two)


def test_cellm_adam_state_round_trips():
    uninterrupted, resumed = _resumed_second_round(Cellm)
    assert set(resumed) == set(SQUARE_SHAPES)
    for name in SQUARE_SHAPES:
        np.testing.assert_array_equal(resumed[name], uninterrupted[name])


def test_a_no_op_load_state_dict_would_fail_the_cellm_round_trip():
    """The round trip above checks something: forgetting the moments and the
    step count changes round 2."""
    uninterrupted, resumed = _resumed_second_round(ForgetfulCellm)
    assert any(not np.allclose(resumed[n], uninterrupted[n], rtol=0, atol=1e-6)
               for n in SQUARE_SHAPES)
