"""FedEx-LoRA (docs/algorithms.md §9): averaged factors plus the exact
residual folded into the base, and nodes that reach the server's base."""

from __future__ import annotations

import numpy as np
import pytest
from by_hand import (
    A_NAMES,
    B_NAMES,
    EXAMPLES,
    MODULES,
    NODES,
    D,
    K,
    R,
    S,
    ask,
    ideal_delta,
    random_adapter,
    relative,
    run_round,
    strategy_config,
)
from fakes import aggregate
from flwr.app import Error, Message, RecordDict

from fedlora.federation.round import ServerRound
from fedlora.strategies import resolve
from fedlora.strategies.fedex import FedExLoRA
from fedlora.wire import codec
from fedlora.wire.basedelta import BaseLedger, NodeBase
from fedlora.wire.messages import Request, TrainReply

pytestmark = pytest.mark.usefixtures("run_identity")  # server messages need a task identity


def _fedex_round(seed: int, d: int = D, k: int = K):
    rng = np.random.default_rng(seed)
    server = ServerRound(FedExLoRA(strategy_config("fedex"), random_adapter(rng, R, d, k)))
    uploads = {p: random_adapter(rng, R, d, k) for p in range(3)}
    w0 = {f"{m}.weight": rng.standard_normal((d, k)) for m in MODULES}
    _, merged, metrics = run_round(server, uploads)
    return server, uploads, w0, merged, metrics


def test_fedex_base_plus_adapter_is_exact_on_non_square_weights():
    server, uploads, w0, merged, metrics = _fedex_round(13)
    ranks = {0: R, 1: R, 2: R}
    for module, a, b in zip(MODULES, A_NAMES, B_NAMES):
        weight = f"{module}.weight"
        new_w0 = w0[weight] + server.base_delta[weight]
        assert new_w0.shape == (D, K)
        got = new_w0 + S * merged[b].astype(np.float64) @ merged[a]
        want = w0[weight] + ideal_delta(uploads, ranks, module)
        assert relative(got, want) < 1e-6
        assert relative(got - w0[weight], want - w0[weight]) < 1e-6
        # the global is FedAvg's (Ā, B̄), by examples
        for name in (a, b):
            np.testing.assert_allclose(
                merged[name], sum(EXAMPLES[p] / 100 * uploads[p][name].astype(np.float64)
                                  for p in uploads), rtol=1e-5, atol=1e-6)
        left, right = server.base.log[0][weight]
        assert left.shape == (D, 4 * R) and right.shape == (4 * R, K)  # (K+1)·r
    assert metrics["agg_residual"] < 1e-6
    assert metrics["agg_residual_fedavg"] > 0.1  # FedIT's error that the residual fixes


def test_fedex_residual_transposed_would_be_wrong():
    server, uploads, w0, merged, _ = _fedex_round(14)
    left, right = server.base.log[0]["m.q.weight"]
    residual = left.astype(np.float64) @ right
    with pytest.raises(ValueError):  # the public code's R^T does not fit a d×k weight
        w0["m.q.weight"] + residual.T
    ledger = BaseLedger({"m.q.weight": (D, K)})
    with pytest.raises(ValueError, match="wrong shape"):
        ledger.apply({"m.q.weight": (right.T, left.T)})
    # on a square weight R^T fits, and misses the exact update
    server, uploads, w0, merged, _ = _fedex_round(15, d=K, k=K)
    left, right = server.base.log[0]["m.q.weight"]
    residual = left.astype(np.float64) @ right
    adapter = S * merged[B_NAMES[0]].astype(np.float64) @ merged[A_NAMES[0]]
    ideal = sum(EXAMPLES[p] / 100 * S * uploads[p][B_NAMES[0]].astype(np.float64)
                @ uploads[p][A_NAMES[0]] for p in uploads)
    assert relative(residual + adapter, ideal) < 1e-6
    assert relative(residual.T + adapter, ideal) > 0.1


def test_fedex_nodes_reach_the_servers_base():
    """The next round's request carries the change; a node that applies it
    holds the ledger's cumulative change; once it acknowledges, nothing more."""
    server, _, _, _, _ = _fedex_round(16)
    requests = ask(server, server_round=2)
    shapes = {f"{m}.weight": (D, K) for m in MODULES}
    memory = RecordDict()
    request = Request.from_message(requests[1])
    assert request.base is not None and request.task.base_version == 1
    node = NodeBase(memory)
    node.update(request.base, request.task.base_from, request.task.base_version, shapes)
    assert node.version == 1
    for module, change in server.base_delta.items():
        np.testing.assert_array_equal(node.delta[module], change)
    server.base.acknowledge(NODES[1], 1)
    assert server.base.update_for(NODES[1]) == (1, None)


def test_a_node_that_lost_its_base_recovers_after_failing_once():
    """A node whose persistent state was lost (a restarted SuperNode) refuses
    an update that starts beyond what it holds (§10) and fails that round;
    the server must then send it something it can apply, not the same
    unusable increments forever. Sizes where increments beat the dense
    change (as on real models), so the server does send increments."""
    rng = np.random.default_rng(17)
    big, rank = 96, 2
    config = resolve({"num-clients": 3, "clients-per-round": 3, "strategy": "fedex",
                      "lora-rank": rank, "lora-alpha": 4.0})
    server = ServerRound(FedExLoRA(config, random_adapter(rng, rank, big, big)))
    shapes = {f"{m}.weight": (big, big) for m in MODULES}
    memories = {node: RecordDict() for node in NODES}
    failures = {}
    for server_round in range(1, 5):
        if server_round == 3:
            memories[NODES[0]] = RecordDict()  # node 101 restarts and forgets its base
        requests = ask(server, server_round)
        replies, failures[server_round] = [], []
        for partition, message in sorted(requests.items()):
            request, node = Request.from_message(message), NODES[partition]
            held = NodeBase(memories[node])
            try:
                held.update(request.base, request.task.base_from, request.task.base_version,
                            shapes)
            except codec.PayloadError as err:
                failures[server_round].append(node)
                replies.append(Message(Error(code=1, reason=f"PayloadError: {err}"),
                                       reply_to=message))
                continue
            upload = random_adapter(rng, rank, big, big)
            replies.append(TrainReply(partition, EXAMPLES[partition], 0.5, 1, 0.0,
                                      codec.encode(upload), held.version).to_message(message))
        aggregate(server, replies, server_round)
    assert failures[3] == [NODES[0]]  # refused, as it should
    assert failures[4] == []  # and caught up the next time it was asked
    held = NodeBase(memories[NODES[0]])
    for module, change in server.base_delta.items():  # at the version it trained on
        assert held.version == server.base.version - 1
        assert relative(held.delta[module].astype(np.float64),
                        change - server.base.log[-1][module][0].astype(np.float64)
                        @ server.base.log[-1][module][1]) < 1e-5
