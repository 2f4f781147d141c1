"""``save-every``: snapshots of the global adapter (and base change) in
RUN/snapshots/round-<t>/, whole or absent."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import LABEL_WORDS
from safetensors.numpy import load_file

from fedlora.core.adapters import adapter_state
from fedlora.core.config import ConfigError
from fedlora.federation import snapshots
from fedlora.learning.models import ModelSpec, lora_model
from fedlora.strategies import resolve
from fedlora.wire.basedelta import BASE_DELTA_FILE


@pytest.fixture
def model(tiny_bert, topic_dataset):
    config = resolve({"model": str(tiny_bert), "dataset": str(topic_dataset)})
    return lora_model(ModelSpec.from_config(config, LABEL_WORDS))


def _state(model, value: float):
    return {n: np.full_like(v, value) for n, v in model.initial_state.items()}


def test_due_every_n_rounds_and_never_for_zero():
    assert [t for t in range(1, 10) if snapshots.due(3, t)] == [3, 6, 9]
    assert not any(snapshots.due(0, t) for t in range(1, 10))
    with pytest.raises(ConfigError, match="config key 'save-every': must be >= 0"):
        resolve({"save-every": -1})


def test_a_snapshot_is_the_adapter_the_peft_way_and_the_base_change(model, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    delta = {"bert.encoder.layer.0.attention.self.query.weight":
             np.ones((32, 32), np.float32)}
    path = snapshots.save(tmp_path, 2, model.peft, _state(model, 0.25), delta)
    assert path == tmp_path / "snapshots" / "round-2"
    assert sorted(p.name for p in path.iterdir()) == ["adapter", BASE_DELTA_FILE]
    np.testing.assert_array_equal(load_file(str(path / BASE_DELTA_FILE))[next(iter(delta))],
                                  delta[next(iter(delta))])
    base = AutoModelForSequenceClassification.from_pretrained(model.spec.model_path,
                                                              num_labels=4)
    loaded = PeftModel.from_pretrained(base, path / "adapter")
    assert all(np.all(v == 0.25) for v in adapter_state(loaded).values())
    without = snapshots.save(tmp_path, 3, model.peft, _state(model, 0.5), None)
    assert not (without / BASE_DELTA_FILE).exists()


def test_a_round_saved_again_is_replaced_whole_and_a_failed_save_leaves_the_old(
        model, tmp_path, monkeypatch):
    snapshots.save(tmp_path, 1, model.peft, _state(model, 0.1), {"x": np.zeros(2)})
    snapshots.save(tmp_path, 1, model.peft, _state(model, 0.2), None)  # after a resume
    path = snapshots.snapshot_dir(tmp_path, 1)
    assert not (path / BASE_DELTA_FILE).exists()  # nothing of the first left
    saved = load_file(str(path / "adapter" / "adapter_model.safetensors"))
    assert all(np.all(v == np.float32(0.2)) for v in saved.values())

    def crash(directory, *args, **kwargs):
        (tmp_path / "snapshots" / ".round-1.tmp" / "adapter").mkdir(parents=True)
        raise OSError("disk full")

    monkeypatch.setattr(model.peft, "save_pretrained", crash)
    with pytest.raises(OSError):
        snapshots.save(tmp_path, 1, model.peft, _state(model, 0.3), None)
    saved = load_file(str(path / "adapter" / "adapter_model.safetensors"))
    assert all(np.all(v == np.float32(0.2)) for v in saved.values())
    assert sorted(p.name for p in (tmp_path / "snapshots").iterdir()) == ["round-1"]
