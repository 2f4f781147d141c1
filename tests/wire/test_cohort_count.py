"""How many clients a message is for, as the progress line counts them."""

from __future__ import annotations

from fakes import message
from flwr.app import ConfigRecord, Message, RecordDict

from fedlora.wire.messages import COHORT, clients_in


def _message(records: dict) -> Message:
    return message(1, 2, RecordDict(records))


def test_a_cohort_counts_its_clients_and_anything_else_one():
    assert clients_in(_message({COHORT: ConfigRecord({"size": 4})})) == 4
    assert clients_in(_message({"config": ConfigRecord({"rounds": 3})})) == 1


def test_a_malformed_cohort_size_counts_one():
    for size in (0, -3, True, "4", 10**12):
        assert clients_in(_message({COHORT: ConfigRecord({"size": size})})) == 1
