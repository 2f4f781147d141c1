"""The contract-v2 strategies end to end in real ``fedlora simulate`` runs:
heterogeneous ranks, base-weight changes (exact aggregation, export that
``fedlora evaluate`` reproduces) and federated evaluation of personal models.
``check_run`` (tests/runs.py) checks the outputs contract, the
processes and sockets, and that ``fedlora evaluate`` reproduces the final
accuracy."""

from __future__ import annotations

import pytest
from runs import check_run
from safetensors.numpy import load_file

pytestmark = pytest.mark.e2e

EXACT = 1e-5  # agg_residual of an exact strategy: float32 rounding only
RANKS = {"client-ranks": "2,4,8"}  # the 4 sampled partitions of 8 get several ranks


@pytest.mark.parametrize("strategy", ["hetlora", "flexlora"])
def test_heterogeneous_ranks_simulation(tmp_path, tiny_bert, topic_dataset, strategy):
    """Clients of ranks 2, 4 and 8 train, reply at their rank, and every reply
    is accepted (a reply validated against the global rank would be rejected)."""
    summary, rows, saved = check_run(tmp_path, tiny_bert, topic_dataset, strategy=strategy,
                                     **RANKS)
    assert summary["rejected_updates"] == 0
    assert {v.shape[0] for k, v in saved.items() if ".lora_A." in k} == {8}  # global rank
    # a rank-2 client's upload is smaller than a rank-8 one's: less than 4 full uploads
    full = sum(v.nbytes for v in saved.values())
    assert all(row["uplink_bytes"] < 4 * full for row in rows)


@pytest.mark.parametrize("strategy,settings", [("fedex", {}), ("flora", RANKS)])
def test_base_changing_strategies_are_exact_and_export(tmp_path, tiny_bert, topic_dataset,
                                                       strategy, settings):
    summary, rows, _ = check_run(tmp_path, tiny_bert, topic_dataset, strategy=strategy,
                                 trained_b=strategy != "flora", **settings)
    assert all(row["agg_residual"] < EXACT for row in rows)
    assert all(row["agg_residual_fedavg"] > 100 * EXACT for row in rows)
    assert [row["base_version"] for row in rows] == [1, 2]
    # the base change is saved beside adapter/ (check_run's `fedlora evaluate`
    # reproduced the final accuracy with it added)
    change = load_file(str(tmp_path / "run" / "base_delta.safetensors"))
    assert change and all(name.endswith(".weight") and ".lora_" not in name
                          for name in change)
    assert any(abs(v).sum() > 0 for v in change.values())
    # round 2 sends round 1's change to every node: more down than round 1
    assert rows[1]["downlink_bytes"] > rows[0]["downlink_bytes"]


def test_fedsa_reports_personal_accuracy(tmp_path, tiny_bert, topic_dataset):
    """Each round's clients evaluate their own model (global A, own B and
    head) on their held-out slice; B never reaches the server."""
    _, rows, saved = check_run(tmp_path, tiny_bert, topic_dataset, strategy="fedsa",
                               trained_b=False)
    for row in rows:
        assert row["personal_clients"] == row["clients"] == 4
        assert 0 <= row["personal_accuracy"] <= 1 and row["personal_loss"] > 0
        assert row["personal_accuracy_sd"] >= 0
    assert all(not v.any() for k, v in saved.items() if ".lora_B." in k)  # server's B: 0
