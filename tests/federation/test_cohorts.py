"""Cohorts (``cohort-size`` > 1): one training message carries several
clients, trained by one worker in one batched pass or one after another
(issue #29, items 1-3).

The equivalence runs the server's round loop (``run_federation``) and the
client loop in this process (``fakes.InProcessGrid``), as
``test_sft_strategies.py`` does: the same code on both sides, without the
transport. Sequential training with each client's own seed makes a cohort's
updates the very bytes a client alone would send, so the global adapter and
every metric but the timings (and, for strategies that change the base, the
downlink: a cohort's clients are sent the whole base change) are equal.
The batched pass computes the same updates up to float rounding.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from fakes import Grid, InProcessGrid, aggregate, pushed, server_identity
from flwr.app import ConfigRecord, Error, Message

from fedlora.core.adapters import lora_pairs
from fedlora.federation.loop import run_federation
from fedlora.federation.round import ServerRound, cohorts_of
from fedlora.strategies import resolve, strategies, strategy_class
from fedlora.wire import codec
from fedlora.wire.messages import (
    Request,
    TrainReply,
    cohort_reply,
    cohort_requests,
    cohort_size,
    is_cohort,
)

NODES = list(range(101, 108))  # 7 nodes; 6 sampled a round → cohorts of 4 and 2
TIMINGS = {"seconds", "compute_s", "compute_max_s", "aggregate_s", "evaluate_s"}


def _run(tmp_path: Path, name: str, tiny_bert, topic_dataset, strategy: str,
         cohort: int, **keys) -> tuple[bytes, list[dict], InProcessGrid]:
    config = resolve({"model": str(tiny_bert), "dataset": str(topic_dataset),
                      "strategy": strategy, "partition": "iid", "num-clients": len(NODES),
                      "clients-per-round": 6, "rounds": 3, "local-steps": 2,
                      "batch-size": 4, "max-seq-len": 32, "eval-examples": 16,
                      "lr": 0.01, "cohort-size": cohort, "out-dir": str(tmp_path / name),
                      **keys})
    grid = InProcessGrid(NODES)
    run_federation(grid, config, simulation=True)
    out = tmp_path / name
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return ((out / "adapter" / "adapter_model.safetensors").read_bytes(), rows, grid)


def _comparable(rows: list[dict], base_changes: bool) -> list[dict]:
    drop = TIMINGS | ({"downlink_bytes"} if base_changes else set())
    return [{k: v for k, v in row.items() if k not in drop} for row in rows]


@pytest.mark.e2e
@pytest.mark.parametrize("strategy", list(strategies()))
def test_a_sequential_cohort_trains_the_same_bytes_as_its_clients_alone(
        strategy, tmp_path, tiny_bert, run_identity, topic_dataset):
    alone, alone_rows, alone_grid = _run(tmp_path, "alone", tiny_bert, topic_dataset,
                                         strategy, 1)
    cohort, cohort_rows, cohort_grid = _run(tmp_path, "cohort", tiny_bert, topic_dataset,
                                            strategy, 4, **{"cohort-pass": "sequential"})
    trains = [m for m in cohort_grid.pushed if is_cohort(m)]
    assert [cohort_size(m) for m in trains] == [4, 2] * 3  # three rounds, 6 clients each
    assert not any(is_cohort(m) for m in alone_grid.pushed)
    assert cohort == alone
    base_changes = strategy_class(strategy).changes_base
    assert _comparable(cohort_rows, base_changes) == _comparable(alone_rows, base_changes)
    assert all(row["clients"] == 6 and row["rejected"] == 0 for row in cohort_rows)


def _tensors(adapter: bytes) -> dict[str, np.ndarray]:
    from safetensors.numpy import load

    return load(adapter)


@pytest.mark.e2e
@pytest.mark.parametrize("strategy", list(strategies()))
def test_a_batched_cohort_trains_its_clients_updates_up_to_float_rounding(
        strategy, tmp_path, tiny_bert, run_identity, topic_dataset, monkeypatch, caplog):
    """The batched pass (``cohort-pass=batched``, the default) gives every
    strategy the global adapter of its clients trained alone, within the
    bound of ``tests/learning/test_cohort_pass.py`` (1e-5 absolute): three
    rounds of 6 clients in cohorts of 4 and 2, dropout on. Strategies that
    change the base train their cohorts one after another (bytes equal)."""
    from fedlora.node import client_loop

    batched = []
    real = client_loop.train_members
    monkeypatch.setattr(client_loop, "train_members",
                        lambda model, members, **kw: (batched.append(len(members)),
                                                      real(model, members, **kw))[1])
    caplog.set_level(logging.INFO, logger="fedlora.node.client_loop")
    keys = {"lora-dropout": 0.1}
    alone, alone_rows, _ = _run(tmp_path, "alone", tiny_bert, topic_dataset, strategy, 1,
                                **keys)
    cohort, cohort_rows, _ = _run(tmp_path, "cohort", tiny_bert, topic_dataset, strategy, 4,
                                  **keys)
    if strategy_class(strategy).changes_base:
        assert batched == [] and cohort == alone
        assert any(f"strategy {strategy} changes the base weights" in r.message
                   for r in caplog.records)
        return
    assert batched == [4, 2] * 3
    _assert_close(cohort, cohort_rows, alone, alone_rows, products=strategy == "flexlora")


def _products(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Each LoRA module's B·A, and the head's tensors as they are."""
    out = {n: t for n, t in tensors.items() if ".lora_" not in n}
    for a_name, b_name in lora_pairs(list(tensors)):
        out[a_name] = tensors[b_name].astype(np.float64) @ tensors[a_name]
    return out


def _assert_close(cohort: bytes, cohort_rows: list[dict], alone: bytes,
                  alone_rows: list[dict], products: bool = False) -> None:
    """The global adapters within 1e-5 (with ``products``: each module's
    B·A, for a strategy that refactors ΔW by SVD, whose factors move much
    more than ΔW where two singular values are close), every metric within
    float rounding."""
    mine, theirs = _tensors(cohort), _tensors(alone)
    if products:
        mine, theirs = _products(mine), _products(theirs)
    assert mine.keys() == theirs.keys()
    for name in theirs:
        np.testing.assert_allclose(mine[name], theirs[name], atol=1e-5, rtol=0, err_msg=name)
    for row, other in zip(_comparable(cohort_rows, False), _comparable(alone_rows, False),
                          strict=True):
        assert row.keys() == other.keys()
        for key, value in other.items():
            if isinstance(value, float):
                assert row[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
            else:
                assert row[key] == value, key


@pytest.mark.e2e
def test_a_batched_cohort_gives_the_same_bytes_twice(tmp_path, tiny_bert, run_identity,
                                                     topic_dataset):
    first, first_rows, _ = _run(tmp_path, "first", tiny_bert, topic_dataset, "fedavg", 4)
    second, second_rows, _ = _run(tmp_path, "second", tiny_bert, topic_dataset, "fedavg", 4)
    assert first == second
    assert _comparable(first_rows, False) == _comparable(second_rows, False)


@pytest.mark.e2e
@pytest.mark.parametrize("keys", [{"dp": "local", "dp-noise-multiplier": 0.5,
                                   "dp-seeded-noise": True},
                                  {"attack": "sign-flip", "attack-fraction": 0.34}],
                         ids=["dp-local", "attack"])
def test_a_cohort_keeps_dp_ledgers_and_attacks_per_client(keys, tmp_path, tiny_bert,
                                                          run_identity,
                                                          topic_dataset):
    """dp=local trains every cohort client alone (bytes equal); an attack
    trains its attackers alone and the honest clients batched."""
    alone, alone_rows, _ = _run(tmp_path, "alone", tiny_bert, topic_dataset, "fedavg", 1,
                                **keys)
    cohort, cohort_rows, _ = _run(tmp_path, "cohort", tiny_bert, topic_dataset, "fedavg", 4,
                                  **keys)
    if keys.get("dp") == "local":
        assert cohort == alone
        assert _comparable(cohort_rows, False) == _comparable(alone_rows, False)
    else:
        _assert_close(cohort, cohort_rows, alone, alone_rows)


def test_cohorts_are_the_sampled_order_cut_in_pieces():
    assert cohorts_of([5, 1, 9, 3, 7], 2) == [(5, 1), (9, 3), (7,)]
    assert cohorts_of([5, 1], 4) == [(5, 1)]
    assert cohorts_of([5, 1, 9], 1) == [(5,), (1,), (9,)]


def _server(cohort: int, seed: int = 42, strategy: str = "fedavg") -> ServerRound:
    config = resolve({"num-clients": 20, "clients-per-round": 10, "cohort-size": cohort,
                      "seed": seed, "lora-rank": 2, "strategy": strategy})
    shapes = {"m.q.lora_A.weight": (2, 6), "m.q.lora_B.weight": (5, 2),
              "m.classifier.weight": (3, 5)}
    state = {n: np.full(s, 0.5, np.float32) for n, s in shapes.items()}
    return ServerRound(strategy_class(strategy)(config, state))


def _cohorts(server: ServerRound, server_round: int, nodes) -> list[list[int]]:
    """Each cohort message's clients, as partition ids."""
    with server_identity():
        messages = server.train_requests(server_round, ConfigRecord({}), Grid(nodes))
    return [[r.task.partition_id for r in cohort_requests(m)] for m in messages]


def test_the_cohorts_depend_on_seed_and_round_alone():
    nodes = list(range(1000, 1020))
    first = _cohorts(_server(4), 3, nodes)
    assert [len(c) for c in first] == [4, 4, 2]
    assert _cohorts(_server(4), 3, nodes) == first  # same seed, same round: same cohorts
    # another process's node ids (Flower's are random): the same partitions
    assert _cohorts(_server(4), 3, list(range(7, 27))) == first
    assert _cohorts(_server(4), 4, nodes) != first  # another round
    assert _cohorts(_server(4, seed=7), 3, nodes) != first  # another seed
    # cohort-size only cuts the round's sample: the same clients, in the same order
    assert sum(_cohorts(_server(3), 3, nodes), []) == sum(first, [])


@pytest.mark.parametrize("cohort", [1, 4])
def test_a_cohorts_clients_are_sent_the_whole_base_change(cohort):
    """A cohort's clients hold no base copy between messages (a fresh memory
    each, in whichever worker): each is sent the change from version 0,
    whatever its node acknowledged before; alone, only what it lacks."""
    server = _server(cohort, strategy="flora")
    rng = np.random.default_rng(1)
    for _ in range(3):  # small steps: the increments are smaller than the dense change
        server.base.apply({"m.q.weight": (rng.standard_normal((5, 1), np.float32),
                                          rng.standard_normal((1, 6), np.float32))})
    nodes = list(range(1000, 1020))
    for node in nodes:
        server.base.acknowledge(node, 2)
    with server_identity():
        messages = server.train_requests(1, ConfigRecord({}), Grid(nodes))
    requests = (sum((cohort_requests(m) for m in messages), []) if cohort > 1
                else [Request.from_message(m) for m in messages])
    assert len(requests) == 10
    assert {(r.task.base_from, r.task.base_version) for r in requests} == {
        (0 if cohort > 1 else 2, 3)}
    assert all(r.base is not None for r in requests)


def _cohort_round(server: ServerRound) -> tuple[list[Message], dict[int, bytes]]:
    """A round of cohort requests (10 of 20 nodes: cohorts of 4, 4 and 2),
    pushed, and each partition's upload."""
    with server_identity():
        messages = server.train_requests(1, ConfigRecord({}), Grid(range(101, 121)))
    messages = pushed(messages, 1)
    rng = np.random.default_rng(0)
    uploads = {}
    for message in messages:
        for request in cohort_requests(message):
            upload = {n: rng.standard_normal(s).astype(np.float32)
                      for n, s in server.strategy.upload_shapes.items()}
            uploads[request.task.partition_id] = codec.encode(upload)
    return messages, uploads


def _reply(message: Message, uploads, bad: dict[int, object] | None = None) -> Message:
    """The cohort's reply, client i's replaced by ``bad[i]`` where given."""
    replies = []
    for index, request in enumerate(cohort_requests(message)):
        partition = request.task.partition_id
        reply = TrainReply(partition, 10 + partition, 0.5, 1, 0.0, uploads[partition])
        replies.append((bad or {}).get(index, reply))
    return cohort_reply(message, replies)


def test_a_bad_update_in_a_cohort_rejects_that_client_only(caplog):
    caplog.set_level(logging.WARNING)
    server = _server(4)
    messages, uploads = _cohort_round(server)
    first = cohort_requests(messages[0])
    garbage = TrainReply(first[1].task.partition_id, 10, 0.5, 1, 0.0, b"not a payload")
    impostor = TrainReply(999, 10, 0.5, 1, 0.0, uploads[first[3].task.partition_id])
    replies = [_reply(messages[0], uploads, {1: garbage, 2: "RuntimeError: out of memory",
                                             3: impostor}),
               _reply(messages[1], uploads),
               _reply(messages[1], uploads),  # sent twice: a duplicate for each client
               _reply(messages[2], uploads)]
    _, row = aggregate(server, replies)
    assert row["sampled"] == 10 and row["clients"] == 7 and row["missing"] == 0
    assert row["rejected"] == 3 + 4
    rejected = [r.message for r in caplog.records if "rejected" in r.message]
    assert len(rejected) == 7
    assert "client failed: RuntimeError: out of memory" in rejected[1]
    assert "answers as partition 999" in rejected[2]
    assert sum("duplicate" in line for line in rejected) == 4


def test_a_failed_cohort_rejects_each_of_its_clients(caplog):
    caplog.set_level(logging.WARNING)
    server = _server(4)
    messages, uploads = _cohort_round(server)
    failed = Message(Error(code=0, reason="Traceback ...\nValueError: the worker died"),
                     reply_to=messages[0])
    partition = cohort_requests(messages[1])[0].task.partition_id
    single = TrainReply(partition, 10, 0.5, 1, 0.0, uploads[partition]).to_message(messages[1])
    _, row = aggregate(server, [failed, single, _reply(messages[2], uploads)])
    assert row["sampled"] == 10 and row["clients"] == 2
    assert row["rejected"] == 8 and row["missing"] == 0
    rejected = [r.message for r in caplog.records if "rejected" in r.message]
    assert sum("client failed: ValueError: the worker died" in r for r in rejected) == 4
    assert sum("not a cohort's reply" in r for r in rejected) == 4


def test_a_cohort_not_answered_is_missing():
    server = _server(4)
    messages, uploads = _cohort_round(server)
    _, row = aggregate(server, [_reply(messages[2], uploads)])
    assert row["sampled"] == 10 and row["clients"] == 2
    assert row["rejected"] == 0 and row["missing"] == 8



class _DiesInRound3(InProcessGrid):
    """Stops the server once round 3's cohorts have trained (their clients'
    states are saved, the round is never checkpointed)."""

    def push_messages(self, messages) -> list[str]:
        ids = super().push_messages(messages)
        if sum(is_cohort(m) for m in self.pushed) > 4:
            raise RuntimeError("server killed")
        return ids


@pytest.mark.e2e
def test_a_cohort_run_resumes_to_the_same_bytes(tmp_path, tiny_bert, topic_dataset,
                                                run_identity):
    whole, whole_rows, _ = _run(tmp_path, "whole", tiny_bert, topic_dataset, "fedsa", 4)
    config = resolve({"model": str(tiny_bert), "dataset": str(topic_dataset),
                      "strategy": "fedsa", "partition": "iid", "num-clients": len(NODES),
                      "clients-per-round": 6, "rounds": 3, "local-steps": 2,
                      "batch-size": 4, "max-seq-len": 32, "eval-examples": 16,
                      "lr": 0.01, "cohort-size": 4, "out-dir": str(tmp_path / "cut")})
    with pytest.raises(RuntimeError, match="server killed"):
        run_federation(_DiesInRound3(NODES), config, simulation=True)
    run_federation(InProcessGrid(NODES), resolve({"resume-from": str(tmp_path / "cut")}),
                   simulation=True)
    cut = tmp_path / "cut"
    assert (cut / "adapter" / "adapter_model.safetensors").read_bytes() == whole
    rows = [json.loads(line) for line in (cut / "metrics.jsonl").read_text().splitlines()]
    assert _comparable(rows, False) == _comparable(whole_rows, False)


@pytest.mark.e2e
def test_a_model_the_pass_cannot_batch_trains_its_cohort_one_after_another(
        tmp_path, tiny_bert, run_identity, topic_dataset, monkeypatch, caplog):
    from fedlora.learning.cohort_pass import NotBatchable
    from fedlora.node import client_loop

    def refuse(model, members, **kw):
        raise NotBatchable("a LoRA variant (DoRA) is not batched")

    monkeypatch.setattr(client_loop, "train_members", refuse)
    caplog.set_level(logging.INFO, logger="fedlora.node.client_loop")
    alone, alone_rows, _ = _run(tmp_path, "alone", tiny_bert, topic_dataset, "fedavg", 1)
    cohort, cohort_rows, _ = _run(tmp_path, "cohort", tiny_bert, topic_dataset, "fedavg", 4)
    assert cohort == alone
    assert _comparable(cohort_rows, False) == _comparable(alone_rows, False)
    assert sum("trains one after another: a LoRA variant" in r.message
               for r in caplog.records) == 6  # cohorts of 4 and 2, three rounds


@pytest.mark.e2e
def test_a_failed_batched_pass_rejects_its_cohorts_clients(tmp_path, tiny_bert, run_identity,
                                                           topic_dataset, monkeypatch, caplog):
    from fedlora.node import client_loop

    def fail(model, members, **kw):
        if len(members) == 2:
            raise RuntimeError("CUDA out of memory")
        return real(model, members, **kw)

    real = client_loop.train_members
    monkeypatch.setattr(client_loop, "train_members", fail)
    caplog.set_level(logging.WARNING)
    _, rows, _ = _run(tmp_path, "cohort", tiny_bert, topic_dataset, "fedavg", 4)
    assert [(row["clients"], row["rejected"]) for row in rows] == [(4, 2)] * 3
    assert sum("client failed: RuntimeError: CUDA out of memory" in r.message
               for r in caplog.records) == 6
