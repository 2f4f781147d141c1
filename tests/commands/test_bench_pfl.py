"""simulations/bench_pfl.py's side-by-side summary (pfl itself is an
optional extra, not installed for the tests): per K and fedlora cohort size,
each side's median over the alternations and fedlora's clients/s over pfl's
at the same K."""

from __future__ import annotations

import pytest
from scripts import simulation_script


@pytest.fixture(scope="module")
def bench():
    return simulation_script("bench_pfl")


def _row(peer: str, clients: int, clients_per_s: float, wall_s: float,
         cohort: int | None = None) -> dict:
    row = {"peer": peer, "clients": clients, "clients_per_s": clients_per_s, "wall_s": wall_s}
    return row if cohort is None else {**row, "cohort_size": cohort}


def test_medians_per_k_and_cohort_and_the_ratio_to_pfl_at_the_same_k(bench):
    rows = [_row("pfl", 100, 20.0, 17.0), _row("fedlora", 100, 10.0, 30.0, 1),
            _row("fedlora", 100, 30.0, 22.0, 50), _row("pfl", 500, 25.0, 50.0),
            _row("fedlora", 500, 40.0, 45.0, 50),
            _row("pfl", 100, 24.0, 19.0), _row("fedlora", 100, 12.0, 28.0, 1),
            _row("fedlora", 100, 36.0, 20.0, 50), _row("pfl", 500, 35.0, 40.0),
            _row("fedlora", 500, 50.0, 43.0, 50)]
    lines = {(line["side_by_side"], line["cohort_size"]): line
             for line in bench.side_by_side(rows)}
    assert set(lines) == {(100, 1), (100, 50), (500, 50)}
    assert lines[(100, 50)] == {"side_by_side": 100, "cohort_size": 50, "reps": 2,
                                "pfl_clients_per_s": 22.0, "fedlora_clients_per_s": 33.0,
                                "fedlora_over_pfl": 1.5, "pfl_wall_s": 18.0,
                                "fedlora_wall_s": 21.0}
    assert lines[(100, 1)]["fedlora_over_pfl"] == 0.5
    assert lines[(500, 50)]["fedlora_over_pfl"] == 1.5  # 45 over pfl's 30 at K = 500
