"""Client state on disk (``fedlora.node.client_state``): restored before a
message and saved after training, never read from a round a crash cut short,
and kept per run and per node."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from fedlora.node.client_state import ClientStore, Lineage, client_key, store_for
from fedlora.wire.basedelta import VERSION_KEY
from fedlora.wire.codec import PayloadError


def _memory(value: float) -> RecordDict:
    return RecordDict({"residual": ArrayRecord({"x": Array(np.full(3, value, np.float32))}),
                       "dp-history": ConfigRecord({"steps": [1, 2]})})


def _value(memory: RecordDict) -> float | None:
    record = memory.array_records.get("residual")
    return None if record is None else float(record["x"].numpy()[0])


def _files(store: ClientStore) -> list[str]:
    return sorted(p.name for p in store.directory.iterdir())


def test_lineage_names_the_attempt_of_each_round():
    lineage = Lineage.parse("aa:1,bb:3")
    assert [lineage.owner(r) for r in (1, 2, 3, 9)] == ["aa", "aa", "bb", "bb"]
    assert lineage.owner(0) is None and lineage.current == "bb"
    again = lineage.resumed(after=4, token="cc")
    assert str(again) == "aa:1,bb:3,cc:5"
    assert str(lineage.resumed(after=2, token="cc")) == "aa:1,cc:3"  # bb ran nothing kept
    for bad in ("", "aa", "aa:x", "AA:1", "../x:1"):
        with pytest.raises(PayloadError):
            Lineage.parse(bad)


def test_training_starts_from_the_state_before_its_round(tmp_path):
    store = ClientStore(tmp_path, Lineage([("aa", 1)]))
    memory = RecordDict()
    store.restore(memory, 1, inclusive=False)
    assert len(memory) == 0  # a first round starts empty
    store.save(_memory(1.0), 1)
    store.save(_memory(2.0), 3)
    store.restore(memory, 3, inclusive=False)
    assert _value(memory) == 1.0  # round 3 retrained: from before it
    store.restore(memory, 3, inclusive=True)
    assert _value(memory) == 2.0  # evaluation after round 3's training
    store.restore(memory, 4, inclusive=False)
    assert _value(memory) == 2.0 and memory.config_records["dp-history"]["steps"] == [1, 2]


def test_a_client_that_keeps_nothing_writes_nothing(tmp_path):
    store = ClientStore(tmp_path / "c", Lineage([("aa", 1)]))
    store.save(RecordDict({VERSION_KEY: ConfigRecord({"version": 1})}), 1)
    assert not store.directory.exists()


def test_only_two_states_are_kept(tmp_path):
    store = ClientStore(tmp_path, Lineage([("aa", 1)]))
    for server_round in (1, 2, 4, 5):
        store.save(_memory(server_round), server_round)
    assert _files(store) == ["state-4-aa.pb", "state-5-aa.pb"]


def test_caches_are_neither_saved_nor_dropped(tmp_path):
    store = ClientStore(tmp_path, Lineage([("aa", 1)]))
    memory = _memory(1.0)
    memory[VERSION_KEY] = ConfigRecord({"version": 3})
    store.save(memory, 1)
    fresh = RecordDict({VERSION_KEY: ConfigRecord({"version": 5})})
    store.restore(fresh, 2, inclusive=False)
    assert fresh.config_records[VERSION_KEY]["version"] == 5 and _value(fresh) == 1.0
    restored = RecordDict()
    store.restore(restored, 2, inclusive=False)
    assert VERSION_KEY not in restored  # the server sends base changes again


def test_a_state_from_a_cut_short_round_is_never_read(tmp_path):
    """Attempt aa checkpointed rounds 1-2 and was killed in round 3, after two
    clients had saved their round-3 state. The resumed attempt bb re-runs
    round 3 without client 'late' (a node went away): 'late' must go on from
    round 2, not from the round 3 nobody kept."""
    first = Lineage([("aa", 1)])
    for client in ("early", "late"):
        store = ClientStore(tmp_path / client, first)
        store.save(_memory(2.0), 2)
        store.save(_memory(3.0), 3)  # round 3: cut short
    resumed = first.resumed(after=2, token="bb")
    early = ClientStore(tmp_path / "early", resumed)
    memory = RecordDict()
    early.restore(memory, 3, inclusive=False)
    assert _value(memory) == 2.0
    early.save(_memory(30.0), 3)
    assert _files(early) == ["state-2-aa.pb", "state-3-bb.pb"]  # aa's round 3 deleted
    late = ClientStore(tmp_path / "late", resumed)
    late.restore(memory, 4, inclusive=False)
    assert _value(memory) == 2.0
    # and after a second crash and resume (after round 3, run by bb) the same holds
    late = ClientStore(tmp_path / "late", resumed.resumed(after=3, token="cc"))
    late.restore(memory, 5, inclusive=False)
    assert _value(memory) == 2.0


def test_an_unreadable_state_is_named_and_not_loaded(tmp_path):
    store = ClientStore(tmp_path, Lineage([("aa", 1)]))
    store.save(_memory(1.0), 1)
    path = tmp_path / "state-1-aa.pb"
    path.write_bytes(b"\xff\xff\xff not a record")
    memory = _memory(9.0)
    with pytest.raises(PayloadError, match="state-1-aa.pb"):
        store.restore(memory, 2, inclusive=False)


def test_simulation_keeps_state_in_the_run_directory(tmp_path):
    lineage = Lineage([("aa", 1)])
    store = store_for({"partition-id": 0}, str(tmp_path), True, "ab", 7, lineage)
    assert store.directory == tmp_path / "partition-7"  # the partition the message names
    with pytest.raises(PayloadError, match="not visible on this worker"):
        store_for({}, str(tmp_path / "elsewhere"), True, "ab", 7, lineage)


def test_deployed_nodes_keep_state_on_their_disk_per_run_and_per_data(tmp_path, monkeypatch):
    lineage = Lineage([("aa", 1)])
    run_store = str(tmp_path / "server-run" / "clients")
    one = {"data-path": str(tmp_path / "one"), "state-dir": str(tmp_path / "state")}
    two = {"data-path": str(tmp_path / "two"), "state-dir": str(tmp_path / "state")}
    a = store_for(one, run_store, False, "ab", 11, lineage)
    assert a.directory.parent == tmp_path / "state" / "ab"  # state-dir before all else
    assert a.directory != store_for(two, run_store, False, "ab", 11, lineage).directory
    assert a.directory == store_for(one, run_store, False, "ab", 99, lineage).directory
    assert a.directory != store_for(one, run_store, False, "cd", 11, lineage).directory
    assert client_key({"partition-id": 5}, 3) == "partition-3"
    # no state-dir: the default, per run; a node with its own data never writes
    # where the server says, even where that directory exists
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "server-run" / "clients").mkdir(parents=True)
    default = store_for({"data-path": "/d"}, run_store, False, "ab", 11, lineage)
    assert default.directory.parent == tmp_path / "home" / ".fedlora" / "client-state" / "ab"
    shared = store_for({"partition-id": 1}, run_store, False, "ab", 11, lineage)
    assert shared.directory == tmp_path / "server-run" / "clients" / "partition-11"
    with pytest.raises(PayloadError, match="bad run id"):
        store_for(one, None, False, "../../etc", 11, lineage)
