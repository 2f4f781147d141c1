"""The attack harness and a robust mode in a real ``fedlora simulate`` run:
the seed's attackers take part, say so in the metrics, and Krum leaves out
exactly them (``check_run``, tests/runs.py, checks the outputs
contract, the processes and sockets, and that ``evaluate`` reproduces it)."""

from __future__ import annotations

import re

import pytest
from runs import check_run

from fedlora.core.seeding import attacker_partitions

pytestmark = pytest.mark.e2e


def test_krum_rejects_the_seeds_sign_flipping_attackers(tmp_path, tiny_bert, topic_dataset):
    settings = {"num-clients": 8, "clients-per-round": 8, "seed": 5, "attack": "sign-flip",
                "attack-fraction": 0.25, "robust": "krum", "robust-fraction": 0.25}
    summary, rows, _ = check_run(tmp_path, tiny_bert, topic_dataset, clients=(6, 6),
                                 **settings)
    attackers = attacker_partitions(5, 8, 0.25)
    assert len(attackers) == 2
    for row in rows:
        assert row["attackers"] == 2 and row["rejected"] == 2 and row["clipped"] >= 0
    log = (tmp_path / "simulate.log").read_text()
    excluded = re.findall(r"round (\d): reply from node \d+ rejected: excluded by krum "
                          r"\(f=2; partition (\d+)\)", log)
    assert set(excluded) == {(str(r), str(p)) for r in (1, 2) for p in attackers}
    assert summary["rejected_updates"] == 4
