"""Same seed, same bytes.

Which clients a round asks is a function of (seed, round) over positions in
the sorted node ids; the server's sums do not depend on the order replies
arrive in; a client's reply does not depend on what its worker process ran
before. Then two real simulations with one config give byte-identical
adapters and identical metrics (timing aside), and another seed differs.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from fakes import WIDE_RANK as RANK
from fakes import Grid, request, start_round
from fakes import round_replies as _round_replies
from fakes import wide_state as _wide_state
from flwr.app import ConfigRecord, Context, Message, RecordDict
from processes import ours, stop, watch
from runs import FEDLORA, _env

from fedlora.core.exactsum import ExactSum
from fedlora.core.seeding import sample_positions
from fedlora.strategies import resolve, strategies
from fedlora.strategies.base import to_arrayrecord
from fedlora.wire import codec
from fedlora.wire.messages import METRICS, PAYLOAD, TASK, Task

pytestmark = pytest.mark.usefixtures("run_identity")

# -- selection --------------------------------------------------------------------
def _asked(strategy, node_ids, server_round=1) -> list[tuple[int, int]]:
    messages = strategy.configure_train(server_round, to_arrayrecord(strategy.state),
                                        ConfigRecord({}), Grid(node_ids))
    return [(int(m.content.config_records[TASK]["partition-id"]), m.metadata.dst_node_id)
            for m in messages]


def _fedavg(**keys):
    config = resolve({"num-clients": 10, "clients-per-round": 4, "lora-rank": RANK, **keys})
    return strategies()["fedavg"](config, _wide_state(np.random.default_rng(0)))


def test_selection_depends_on_seed_and_round_not_on_node_ids():
    rng = np.random.default_rng(7)
    ids_one, ids_two = (rng.choice(2**40, 10, replace=False).tolist() for _ in range(2))
    first = _asked(_fedavg(), ids_one)
    again = _asked(_fedavg(), ids_two)
    assert [p for p, _ in first] == [p for p, _ in again]  # the same partitions
    for asked, ids in ((first, ids_one), (again, ids_two)):
        assert [node for _, node in asked] == [sorted(ids)[p] for p, _ in asked]
    rounds = [[p for p, _ in _asked(_fedavg(), ids_one, r)] for r in range(1, 6)]
    assert len({tuple(r) for r in rounds}) > 1  # rounds differ
    seeds = {tuple(p for p, _ in _asked(_fedavg(seed=s), ids_one)) for s in range(5)}
    assert len(seeds) > 1  # seeds differ


def test_positions_are_distinct_and_in_range():
    for seed in range(20):
        chosen = sample_positions(seed, 3, 50, 10)
        assert len(set(chosen)) == 10 and all(0 <= p < 50 for p in chosen)
        assert chosen == sample_positions(seed, 3, 50, 10)


# -- aggregation ------------------------------------------------------------------
VARIANTS = {
    "fedavg": {"strategy": "fedavg"},
    "ffa": {"strategy": "ffa"},
    "lora-fair": {"strategy": "lora-fair"},
    "cellm-sgd": {"strategy": "cellm", "cellm-up-density": 0.3},
    "cellm-adam": {"strategy": "cellm", "cellm-server-optimizer": "adam",
                   "cellm-down-density": 0.5, "cellm-server-lr": 0.01},
    "fedavg-central-dp": {"strategy": "fedavg", "dp": "central", "dp-noise-multiplier": 0.5,
                          "dp-seeded-noise": True},
}


def _aggregate(keys: dict, replies_order) -> tuple[dict, dict]:
    config = resolve({"num-clients": 10, "clients-per-round": 7, "lora-rank": RANK, **keys})
    strategy = strategies()[config["strategy"]](config, _wide_state(np.random.default_rng(1)))
    start_round(strategy, range(100, 107))
    replies = _round_replies(strategy, np.random.default_rng(2))
    arrays, metrics = strategy.aggregate_train(1, [replies[i] for i in replies_order])
    assert arrays is not None and metrics["clients"] == len(replies)
    return ({n: a.numpy().tobytes() for n, a in arrays.items()},
            {k: v for k, v in metrics.items() if not k.endswith("_s")})


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_aggregation_does_not_depend_on_reply_order(variant):
    forward, forward_metrics = _aggregate(VARIANTS[variant], range(7))
    for order in ([6, 5, 4, 3, 2, 1, 0], [3, 0, 6, 1, 5, 2, 4]):
        other, other_metrics = _aggregate(VARIANTS[variant], order)
        assert other == forward
        assert other_metrics == forward_metrics


class PlainSum:
    """A running float32 sum (what the product sums were before): order-dependent."""

    def __init__(self, shape) -> None:
        self.value = np.zeros(shape, np.float32)

    def add(self, term) -> None:
        self.value += np.float32(term)

    def add_weighted(self, values, weight, peak=None) -> None:
        self.add(np.multiply(values, weight, dtype=np.float64))

    def total(self) -> np.ndarray:
        return self.value.astype(np.float64)


def test_with_plain_sums_the_order_would_show(monkeypatch):
    """The replies above are order-sensitive: with plain running sums the
    same round gives other bytes in another order, so the test above can fail."""
    from fedlora.strategies import sums

    monkeypatch.setattr(sums, "ExactSum", PlainSum)
    forward, _ = _aggregate(VARIANTS["lora-fair"], range(7))
    backward, _ = _aggregate(VARIANTS["lora-fair"], [6, 5, 4, 3, 2, 1, 0])
    assert forward != backward


def test_exact_sum_matches_fsum_and_refuses_what_it_cannot_add():
    import math

    rng = np.random.default_rng(4)
    terms = [rng.standard_normal(20) * 10.0 ** rng.integers(-12, 9, 20) for _ in range(50)]
    total = ExactSum((20,))
    for term in terms:
        total.add(term)
    reference = [math.fsum(t[j] for t in terms) for j in range(20)]
    np.testing.assert_allclose(total.total(), reference, rtol=1e-15, atol=1e-20)
    for bad in (np.full(20, np.inf), np.full(20, np.nan), np.full(20, 1e13)):
        with pytest.raises(OverflowError):
            total.add(bad)
    np.testing.assert_allclose(total.total(), reference, rtol=1e-15, atol=1e-20)



def test_exact_sum_cut_in_chunks_changes_no_bit(monkeypatch):
    """A term longer than a chunk (``exactsum.CHUNK``) is cut piece by piece
    in scratch arrays; the sum is bit for bit the one cut whole, and it is
    the correctly rounded sum of the weighted terms."""
    import math

    from fedlora.core import exactsum

    rng = np.random.default_rng(5)
    terms = [(rng.standard_normal((3, 37)) * 10.0 ** rng.integers(-9, 6, (3, 37)))
             .astype(np.float32) for _ in range(30)]
    weights = rng.integers(1, 500, 30).astype(float)

    def summed() -> np.ndarray:
        total = ExactSum((3, 37))
        for term, weight in zip(terms, weights):
            total.add_weighted(term, weight)
        return total.total()

    whole = summed()
    monkeypatch.setattr(exactsum, "CHUNK", 16)
    monkeypatch.setattr(exactsum, "_SCRATCH", __import__("threading").local())
    assert summed().tobytes() == whole.tobytes()
    reference = [[math.fsum(float(w) * float(t[i, j]) for t, w in zip(terms, weights))
                  for j in range(37)] for i in range(3)]
    np.testing.assert_array_equal(whole, reference)


def test_weighted_peak_is_the_peak_of_the_rounded_product():
    """The bound check reads |w| × max|x| instead of forming w × x: rounding
    is monotonic, so it is exactly the largest entry of the product; a NaN
    or an infinity anywhere is refused."""
    from fedlora.core.exactsum import weighted_peak

    rng = np.random.default_rng(6)
    for _ in range(200):
        values = (rng.standard_normal(50) * 10.0 ** rng.integers(-20, 7)).astype(np.float32)
        weight = float(rng.uniform(0.1, 1e4))
        product = np.multiply(values, weight, dtype=np.float64)
        assert weighted_peak(values, weight) == float(np.max(np.abs(product)))
    for bad in (np.nan, np.inf, -np.inf):
        values = np.ones(5, np.float32)
        values[3] = bad
        with pytest.raises(OverflowError):
            weighted_peak(values, 2.0)
    with pytest.raises(OverflowError):
        weighted_peak(np.ones(3, np.float32), float("nan"))

# -- the client -------------------------------------------------------------------
def _client_message(config, partition: int, server_round: int) -> Message:
    from fedlora.learning.features import model_for
    from fedlora.wire.messages import LABEL_NAMES

    model = model_for(config)
    strategy = strategies()[config["strategy"]](config, model.initial_state)
    _, blob = strategy.download(model.initial_state)
    sent = {**config.to_dict(), LABEL_NAMES: list(model.spec.label_names)}
    return request(2, sent, Task(server_round, partition, config["lora-rank"]), blob,
                   message_id=f"r{server_round}-{partition}")


def _train_bytes(config, partition: int, server_round: int) -> bytes:
    from fedlora.node.client_loop import handle_train as train

    context = Context(run_id=1, node_id=5, node_config={"partition-id": 0},
                      state=RecordDict(), run_config={})
    reply = train(_client_message(config, partition, server_round), context)
    assert int(reply.content.metric_records[METRICS]["partition-id"]) == partition
    return bytes(codec.from_record(reply.content.array_records[PAYLOAD]))


def _client_config(tiny_bert, topic_dataset, **keys):
    return resolve({"model": str(tiny_bert), "dataset": str(topic_dataset),
                    "num-clients": 4, "clients-per-round": 2, "partition": "iid",
                    "batch-size": 8, "local-steps": 3, "lora-dropout": 0.3, **keys})


def test_a_reply_does_not_depend_on_what_the_worker_ran_before(tiny_bert, topic_dataset):
    config = _client_config(tiny_bert, topic_dataset)
    first = _train_bytes(config, partition=1, server_round=2)
    _train_bytes(config, partition=0, server_round=1)  # another client in between
    assert _train_bytes(config, partition=1, server_round=2) == first
    assert _train_bytes(config, partition=1, server_round=3) != first  # rounds differ


def test_dp_noise_is_secret_unless_seeded(tiny_bert, topic_dataset):
    private = _client_config(tiny_bert, topic_dataset, dp="local",
                             **{"dp-noise-multiplier": 1.0})
    assert _train_bytes(private, 1, 2) != _train_bytes(private, 1, 2)
    seeded = _client_config(tiny_bert, topic_dataset, dp="local",
                            **{"dp-noise-multiplier": 1.0, "dp-seeded-noise": True})
    assert _train_bytes(seeded, 1, 2) == _train_bytes(seeded, 1, 2)


# -- real simulations ---------------------------------------------------------------
def _simulate(tmp_path, model_dir, dataset, **keys) -> tuple[bytes, list[dict]]:
    """One real ``fedlora simulate``: (adapter bytes, metrics rows)."""
    tmp_path.mkdir(parents=True)
    settings = {"model": str(model_dir), "dataset": str(dataset), "num-clients": 6,
                "clients-per-round": 3, "rounds": 2, "batch-size": 8, "local-steps": 3,
                "lr": 0.01, "lora-dropout": 0.2, "partition": "dirichlet",
                "dirichlet-alpha": 0.5, "strategy": "lora-fair", **keys}
    env, out = _env(tmp_path), tmp_path / "run"
    command = [*FEDLORA, "simulate", "--set", *[f"{k}={v}" for k, v in settings.items()],
               "--out", str(out)]
    try:
        code, _, _ = watch(command, env, env["FLWR_HOME"], tmp_path / "log", timeout=600)
        assert code == 0, (tmp_path / "log").read_text()[-3000:]
    finally:
        stop(ours(env["FLWR_HOME"]))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return (out / "adapter" / "adapter_model.safetensors").read_bytes(), rows


def _without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "seconds" and not k.endswith("_s")}
            for row in rows]


@pytest.mark.e2e
def test_two_simulations_with_one_config_give_the_same_bytes(tmp_path, tiny_bert,
                                                             topic_dataset):
    adapter, rows = _simulate(tmp_path / "a", tiny_bert, topic_dataset)
    again, rows_again = _simulate(tmp_path / "b", tiny_bert, topic_dataset)
    assert again == adapter
    assert _without_timing(rows_again) == _without_timing(rows)
    assert all(row["clients"] == 3 for row in rows)
    other, other_rows = _simulate(tmp_path / "c", tiny_bert, topic_dataset, seed=43)
    assert other != adapter
    assert _without_timing(other_rows) != _without_timing(rows)

