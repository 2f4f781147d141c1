"""A deployed node (its own ``data-path``) is one client: it refuses a
cohort message (``cohort-size`` > 1) in one line, before reading anything
else; cohorts are for simulated clients of the run's shared dataset."""

from __future__ import annotations

import pytest
from fakes import SERVER, message, server_identity
from flwr.app import ConfigRecord, Context, RecordDict

from fedlora.core.config import ConfigError
from fedlora.node.client_loop import handle_train
from fedlora.strategies import resolve
from fedlora.wire import codec
from fedlora.wire.messages import Request, Task, cohort_message

NODE = 5


def cohort(run_id: str = "ab12") -> RecordDict:
    """A cohort of two clients' requests, as the server sends it."""
    config = ConfigRecord({**resolve({"cohort-size": 2}).to_dict(), "fedlora-run-id": run_id})
    requests = [Request({}, Task(1, partition, 8), codec.encode({})) for partition in (0, 1)]
    with server_identity():
        return cohort_message(requests, NODE, config).content


def _context(node_config: dict) -> Context:
    return Context(run_id=1, node_id=NODE, node_config=node_config, state=RecordDict(),
                   run_config={})


def test_a_deployed_node_refuses_a_cohort_in_one_line(tmp_path):
    with pytest.raises(ConfigError) as raised:
        handle_train(message(SERVER, NODE, cohort(), message_id="q"),
                     _context({"data-path": str(tmp_path)}))
    reason = str(raised.value)
    assert len(reason.splitlines()) == 1
    assert "a cohort of 2 clients sent to a deployed node" in reason
    assert "cohort-size=1" in reason


def test_a_cohort_without_its_run_id_is_refused(tmp_path):
    with pytest.raises(codec.PayloadError, match="without the run's id"):
        handle_train(message(SERVER, NODE, cohort(run_id=""), message_id="q"), _context({}))
