"""A finished run directory made in this process, without a simulation: the
files ``fedlora simulate`` leaves (config.json, adapter/, base_delta.safetensors
for a strategy that changes the base, summary.json), holding an adapter
whose factors and head are random and non-zero, so that what reads a run
(export, generate) has something to get wrong."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from conftest import LABEL_WORDS

from fedlora.core.adapters import load_adapter_state
from fedlora.core.config import RunConfig
from fedlora.federation.results import RunWriter
from fedlora.learning.models import ModelSpec, build_lora_model
from fedlora.strategies import resolve
from fedlora.wire.basedelta import BASE_DELTA_FILE, save_base_delta, shapes_of


def finished_run(out: Path, model_dir: Path, dataset: Path, base_change: bool = False,
                 **keys) -> Path:
    config = resolve({"model": str(model_dir), "dataset": str(dataset), "num-clients": 4,
                      "clients-per-round": 2, "max-seq-len": 32, "lora-rank": 4,
                      "strategy": "fedex" if base_change else "fedavg", **keys})
    config = RunConfig({**config.to_dict(), "out-dir": str(out)})
    model = build_lora_model(ModelSpec.from_config(config, LABEL_WORDS))
    rng = np.random.default_rng(0)
    load_adapter_state(model.peft, {n: (v + rng.normal(0, 0.3, v.shape)).astype(np.float32)
                                    for n, v in model.initial_state.items()})
    writer = RunWriter(out, config)
    writer.save_adapter(model.peft)
    if base_change:
        save_base_delta(out / BASE_DELTA_FILE, {
            n: rng.normal(0, 0.3, shape).astype(np.float32)
            for n, shape in shapes_of(model.peft).items()})
    writer.finish({"strategy": config["strategy"], "label_names": list(LABEL_WORDS)})
    return out
