"""deploy/bench_round_cost.py's bookkeeping: what a round's record says, and
its flags (the runs themselves are the deployment tests' processes)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # deploy/ is not an installed package
from deploy.bench_round_cost import _per_round, _record, median_overhead  # noqa: E402


def _row(server_round: int, seconds: float, **extra) -> dict:
    return {"round": server_round, "seconds": seconds, "compute_s": 9.0, "compute_max_s": 2.0,
            "evaluate_s": 0.5, "clients": 3, "rejected": 0, **extra}


def test_overhead_is_round_time_less_the_slowest_client_and_the_evaluation():
    record = _record("warm", 3, "compose", _row(2, 4.0, clientapp_s=3.2, trainer_s=2.1))
    assert record == {"mode": "warm", "nodes": 3, "polls": "compose", "round": 2,
                      "seconds": 4.0, "compute_s": 2.0, "evaluate_s": 0.5, "overhead_s": 1.5,
                      "clients": 3, "rejected": 0, "clientapp_s": 3.2, "trainer_s": 2.1}
    simulated = _record("simulation", 3, "-", _row(2, 4.0))
    assert "clientapp_s" not in simulated and simulated["overhead_s"] == 1.5


def test_the_median_leaves_round_1_out():
    records = [_record("cold", 1, "compose", _row(r, s))
               for r, s in ((1, 30.0), (2, 4.0), (3, 5.0), (4, 9.0))]
    assert median_overhead(records) == 2.5  # rounds 2..4: 1.5, 2.5, 6.5


def test_each_round_takes_its_slowest_process():
    assert _per_round([1.0, 3.0, 2.0, 5.0, 4.0], 2, 3) == [3.0, 5.0, 4.0]


@pytest.mark.e2e
def test_an_unknown_mode_is_refused_in_one_line():
    done = subprocess.run([sys.executable, str(REPO / "deploy" / "bench_round_cost.py"),
                           str(REPO), "--modes", "cold,lukewarm"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1] == (
        "bench_round_cost.py: error: --modes 'cold,lukewarm': choose from cold, warm, "
        "simulation")
