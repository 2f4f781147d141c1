"""FedSA-LoRA (docs/algorithms.md §5): A travels and is averaged; B and the
head stay with each client, in its persistent memory."""

from __future__ import annotations

import numpy as np
import pytest
from by_hand import (
    A_NAMES,
    B_NAMES,
    EXAMPLES,
    HEAD,
    NODES,
    K,
    R,
    adapter_shapes,
    ask,
    random_adapter,
    run_round,
    strategy_config,
)
from flwr.app import RecordDict

from fedlora.federation.fold import Fold
from fedlora.federation.round import ServerRound
from fedlora.strategies.base import ClientUpdate
from fedlora.strategies.fedsa import PERSONAL_KEY, FedSA, FedSAClient
from fedlora.wire import codec
from fedlora.wire.messages import Request

pytestmark = pytest.mark.usefixtures("run_identity")  # server messages need a task identity


def test_fedsa_moves_only_a():
    config = strategy_config("fedsa")
    roles = FedSAClient(config)
    assert roles.download_names(adapter_shapes()) == A_NAMES
    assert roles.upload_names(adapter_shapes()) == A_NAMES
    assert all(roles.trains(kind) for kind in ("lora_A", "lora_B", "head"))
    strategy = FedSA(config, random_adapter(np.random.default_rng(0)))
    assert set(strategy.upload_shapes) == set(A_NAMES)
    assert strategy.personal and FedSA.evaluation_prefix(config) == "personal"
    server = ServerRound(strategy)
    requests = ask(server)
    sent = codec.decode_any(Request.from_message(requests[0]).payload)
    assert set(sent) == set(A_NAMES)
    for name in A_NAMES:
        np.testing.assert_array_equal(sent[name], server.adapter[name])


def test_fedsa_merge_averages_a_and_leaves_b_and_head():
    rng = np.random.default_rng(1)
    strategy = FedSA(strategy_config("fedsa"), random_adapter(rng))
    before = {n: v.copy() for n, v in strategy.state.items()}
    uploads = {p: {n: rng.standard_normal((R, K)).astype(np.float32) for n in A_NAMES}
               for p in range(3)}
    _, merged, metrics = run_round(ServerRound(strategy), uploads)
    assert metrics["clients"] == 3 and metrics["rejected"] == 0
    for name in A_NAMES:
        want = sum(EXAMPLES[p] / 100 * uploads[p][name].astype(np.float64) for p in uploads)
        np.testing.assert_allclose(merged[name], want, rtol=1e-6, atol=1e-7)
    for name in (*B_NAMES, *HEAD):
        np.testing.assert_array_equal(merged[name], before[name])
    # the sums path gives the same (ClientUpdate → sums → merge)
    updates = [ClientUpdate(NODES[p], p, R, float(EXAMPLES[p]), uploads[p]) for p in (2, 0, 1)]
    again = strategy.merge(Fold(strategy).sums(updates))
    for name in merged:
        np.testing.assert_array_equal(again[name], merged[name])


def test_fedsa_client_keeps_b_and_head():
    rng = np.random.default_rng(2)
    roles = FedSAClient(strategy_config("fedsa"))
    template, memory = random_adapter(rng), RecordDict()
    received = {n: rng.standard_normal((R, K)).astype(np.float32) for n in A_NAMES}
    start = roles.start_state(received, template, memory)  # first round: the template's B/head
    for name, value in start.items():
        np.testing.assert_array_equal(value, received[name] if name in received
                                      else template[name])
    trained = random_adapter(rng)
    upload = roles.upload(start, trained, memory)
    assert set(upload) == set(A_NAMES)
    for name in A_NAMES:
        np.testing.assert_array_equal(upload[name], trained[name])
    kept = {n: a.numpy() for n, a in memory.array_records[PERSONAL_KEY].items()}
    assert set(kept) == {*B_NAMES, *HEAD}
    received = {n: rng.standard_normal((R, K)).astype(np.float32) for n in A_NAMES}
    start = roles.start_state(received, template, memory)  # next round: its own B/head
    for name in A_NAMES:
        np.testing.assert_array_equal(start[name], received[name])
    for name in (*B_NAMES, *HEAD):
        np.testing.assert_array_equal(start[name], trained[name])
        assert not np.array_equal(start[name], template[name])
