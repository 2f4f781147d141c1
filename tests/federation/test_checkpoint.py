"""The server's checkpoint: a whole round trip, an atomic write, and a
corrupt or partial file refused by name (never loaded)."""

from __future__ import annotations

import numpy as np
import pytest

from fedlora.commands.cli import main
from fedlora.core.config import ConfigError
from fedlora.federation import checkpoint
from fedlora.federation.checkpoint import CHECKPOINT_FILE, Checkpoint


def _checkpoint(round_: int = 2) -> Checkpoint:
    rng = np.random.default_rng(round_)
    return Checkpoint(
        round=round_, run_id="ab12", lineage="aa:1,bb:3",
        adapter={"m.lora_A.weight": rng.normal(size=(4, 6)).astype(np.float32),
                 "m.classifier.weight": rng.normal(size=(3, 6)).astype(np.float32)},
        strategy={"step": np.array(7), "m/m.lora_A.weight": rng.normal(size=(4, 6))},
        base_log=[{"m.weight": (rng.normal(size=(6, 2)).astype(np.float32),
                                rng.normal(size=(2, 6)).astype(np.float32))},
                  {"m.weight": (rng.normal(size=(6, 1)).astype(np.float32),
                                rng.normal(size=(1, 6)).astype(np.float32)),
                   "n.weight": (rng.normal(size=(6, 1)).astype(np.float32),
                                rng.normal(size=(1, 6)).astype(np.float32))}],
        epsilons={0: 1.25, 17: 0.5}, central_history=[(1.1, 0.25, 3)], wall_seconds=12.5)


def _same_arrays(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert a[name].tobytes() == b[name].tobytes(), name


def test_a_checkpoint_comes_back_bit_for_bit(tmp_path):
    saved = _checkpoint()
    checkpoint.save(tmp_path, saved)
    loaded = checkpoint.load(tmp_path)
    assert (loaded.round, loaded.run_id, loaded.lineage) == (2, "ab12", "aa:1,bb:3")
    _same_arrays(loaded.adapter, saved.adapter)
    _same_arrays(loaded.strategy, saved.strategy)
    assert loaded.strategy["step"].shape == ()  # a step count stays a scalar
    assert len(loaded.base_log) == 2
    for got, want in zip(loaded.base_log, saved.base_log, strict=True):
        assert set(got) == set(want)
        for module in want:
            _same_arrays(dict(enumerate(got[module])), dict(enumerate(want[module])))
    assert loaded.epsilons == {0: 1.25, 17: 0.5}
    assert loaded.central_history == [(1.1, 0.25, 3)] and loaded.wall_seconds == 12.5


def test_a_run_without_a_checkpoint_has_none(tmp_path):
    assert checkpoint.load(tmp_path) is None


def test_a_failed_write_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    checkpoint.save(tmp_path, _checkpoint(2))

    def crash(*args):
        raise OSError("disk gone")

    monkeypatch.setattr(checkpoint.os, "replace", crash)
    with pytest.raises(OSError):
        checkpoint.save(tmp_path, _checkpoint(3))
    assert checkpoint.load(tmp_path).round == 2


@pytest.mark.parametrize("damage, reason", [
    (lambda blob: blob[:-10], "checksum mismatch"),  # cut short
    (lambda blob: blob[:-5] + bytes([blob[-5] ^ 1]) + blob[-4:], "checksum mismatch"),
    (lambda blob: b"PK\x03\x04" + blob[4:], "not a fedlora checkpoint"),
    (lambda blob: b"", "not a fedlora checkpoint"),
])
def test_a_corrupt_or_partial_checkpoint_is_named_and_not_loaded(tmp_path, damage, reason):
    path = checkpoint.save(tmp_path, _checkpoint())
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(ConfigError, match=reason) as caught:
        checkpoint.load(tmp_path)
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)


def test_resume_refuses_a_corrupt_checkpoint_in_one_line(tmp_path, capsys, tiny_bert,
                                                         topic_dataset):
    """Before any model, data or Ray is touched: exit 2, the file named."""
    from fedlora.federation.results import RunWriter
    from fedlora.strategies import resolve

    config = resolve({"model": str(tiny_bert), "dataset": str(topic_dataset),
                      "out-dir": str(tmp_path)})
    RunWriter(tmp_path, config)
    (tmp_path / CHECKPOINT_FILE).write_bytes(b"fedlora-checkpoint 1\n" + b"0" * 64 + b"\nxx")
    assert main(["simulate", "--resume", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and CHECKPOINT_FILE in err[0] and "checksum" in err[0]
