"""Integration: real Flower simulations on real Ray (local, 127.0.0.1), tiny models.

Each run goes through the ``fedlora`` command in a child process, as a user
would run it, and the outputs contract is checked file by file; ``fedlora
evaluate`` must then reproduce the final accuracy exactly. While a run goes,
every listening socket of its process tree is recorded: all must be loopback,
and the tree must be gone when the command returns.
"""

from __future__ import annotations

import numpy as np
import pytest
from opacus.accountants import RDPAccountant
from runs import FEDLORA, _env, check_run, run_fedlora  # noqa: F401

from fedlora.wire import codec

pytestmark = pytest.mark.e2e


def test_sequence_classification_simulation(tmp_path, tiny_bert, topic_dataset):
    _, rows, saved = check_run(tmp_path, tiny_bert, topic_dataset)
    for row in rows:  # FedAvg: the whole adapter, dense float32, both ways
        assert row["uplink_bytes"] == row["downlink_bytes"] == 4 * len(codec.encode(saved))
        assert row["agg_residual"] > 0


def test_causal_lm_simulation(tmp_path, tiny_llama, topic_dataset):
    _, rows, saved = check_run(tmp_path, tiny_llama, topic_dataset, **{"max-seq-len": 48})
    assert not any("classifier" in name or "score" in name for name in saved)
    assert rows[-1]["uplink_bytes"] == 4 * len(codec.encode(saved))


# The other strategies run with client-level DP on: each run checks the
# strategy's own contract and the DP accounting (8 IID clients of 40 examples,
# batch 8, noise 1.0: a client's ε after one round is known in advance).
DP = {"partition": "iid", "dp": "local", "dp-noise-multiplier": 1.0}


def _one_round_epsilon(examples: int, batch: int, noise: float) -> float:
    """ε of one epoch of Poisson-sampled DP-SGD, by Opacus's own accountant."""
    accountant = RDPAccountant()
    steps = -(-examples // batch)
    accountant.history = [(noise, 1.0 / steps, steps)]
    return accountant.get_epsilon(1e-5)


def _check_epsilon(rows: list[dict]) -> None:
    assert rows[0]["epsilon"] == pytest.approx(_one_round_epsilon(40, 8, 1.0), rel=1e-6)
    assert rows[1]["epsilon"] >= rows[0]["epsilon"]


def test_ffa_simulation_with_dp(tmp_path, tiny_bert, topic_dataset):
    _, rows, saved = check_run(tmp_path, tiny_bert, topic_dataset, strategy="ffa", **DP)
    sent = {n: v for n, v in saved.items() if ".lora_A." not in n}
    for row in rows:
        assert row["uplink_bytes"] == 4 * len(codec.encode(sent))
        assert row["agg_residual"] < 1e-6  # exact aggregation
    _check_epsilon(rows)


def test_lora_fair_simulation_with_dp(tmp_path, tiny_bert, topic_dataset):
    _, rows, _ = check_run(tmp_path, tiny_bert, topic_dataset, strategy="lora-fair",
                           **{"fair-steps": 50}, **DP)
    for row in rows:  # the correction never loses to plain averaging of the same factors
        assert row["agg_residual"] <= row["agg_residual_fedavg"] + 1e-9
    _check_epsilon(rows)


def test_cellm_simulation_with_dp(tmp_path, tiny_bert, topic_dataset):
    _, rows, saved = check_run(tmp_path, tiny_bert, topic_dataset, strategy="cellm",
                               **{"cellm-up-density": 0.05, "cellm-error-feedback": "true"},
                               **DP)
    dense = len(codec.encode(saved))
    for row in rows:
        assert row["downlink_bytes"] == 4 * dense
        assert row["uplink_bytes"] * 5 < row["downlink_bytes"]
    _check_epsilon(rows)


def test_dp_budget_stops_clients(tmp_path, tiny_bert, topic_dataset):
    """All 4 clients train in round 1; a second round would exceed the budget,
    so in round 2 they all decline and the global adapter stays as it was."""
    one = _one_round_epsilon(80, 8, 1.0)
    _, rows, _ = check_run(
        tmp_path, tiny_bert, topic_dataset, clients=(4, 0), partition="iid",
        **{"num-clients": 4, "clients-per-round": 4, "dp": "local",
           "dp-noise-multiplier": 1.0, "dp-target-epsilon": round(1.1 * one, 6)})
    assert rows[0]["epsilon"] == pytest.approx(one, rel=1e-6)
    assert rows[1]["declined"] == 4 and rows[1]["updated"] is False
    assert rows[1]["accuracy"] == rows[0]["accuracy"]


def test_central_dp_simulation(tmp_path, tiny_bert, topic_dataset):
    """The server clips and noises; ε is the subsampled Gaussian's after each
    round (q = 4 of 8 clients), and no raw-factor metric is published."""
    _, rows, _ = check_run(tmp_path, tiny_bert, topic_dataset, partition="iid",
                           **{"dp": "central", "dp-noise-multiplier": 1.0,
                              "dp-max-grad-norm": 0.5})
    reference = RDPAccountant()
    for row in rows:
        reference.step(noise_multiplier=1.0, sample_rate=0.5)
        assert row["epsilon"] == pytest.approx(reference.get_epsilon(1e-5), rel=1e-9)
        assert "agg_residual" not in row


def test_a_cohort_simulation_trains_the_updates_of_one_client_a_message(tmp_path, tiny_bert,
                                                                      topic_dataset):
    """cohort-size=4 through Ray: 2 messages a round instead of 8, each
    worker training its cohort's clients in one batched pass (the default
    ``cohort-pass``); the adapter of one client a message within float
    rounding (1e-5), and the same metrics up to it. The sequential pass's
    byte equality, for every strategy: ``tests/federation/test_cohorts.py``."""
    from safetensors.numpy import load_file

    adapters, rows = {}, {}
    for cohort in (1, 4):
        where = tmp_path / f"cohort-{cohort}"
        where.mkdir()
        _, rows[cohort], _ = check_run(where, tiny_bert, topic_dataset, clients=(8, 8),
                                       **{"clients-per-round": 8, "partition": "iid",
                                          "cohort-size": cohort})
        adapters[cohort] = load_file(where / "run" / "adapter" / "adapter_model.safetensors")
    assert adapters[4].keys() == adapters[1].keys()
    for name, value in adapters[1].items():
        np.testing.assert_allclose(adapters[4][name], value, atol=1e-5, rtol=0, err_msg=name)
    timings = {"seconds", "compute_s", "compute_max_s", "aggregate_s", "evaluate_s"}
    for mine, theirs in zip(rows[4], rows[1], strict=True):
        assert mine.keys() == theirs.keys()
        for key, value in theirs.items():
            if key in timings:
                continue
            if isinstance(value, float):
                assert mine[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
            else:
                assert mine[key] == value, key
