"""``fedlora export RUN --merge OUT``: the run's model as one plain Hugging
Face model directory.

The base change of strategies that make one (FLoRA, FedEx-LoRA:
``base_delta.safetensors``) is added to the base weights, the LoRA factors
are merged in with PEFT's ``merge_and_unload`` (a trained head replaces the
base's), and the result is saved with ``save_pretrained`` beside the
tokenizer: ``AutoModelForCausalLM.from_pretrained(OUT)`` (or
``AutoModelForSequenceClassification`` for a classifier, its classes named
in ``id2label``) loads it with neither fedlora nor PEFT. Its logits are the
run's model's (PEFT + base change) to float rounding
(tests/commands/test_export.py).

A run trained on a quantised base (``quantization``) is merged into the
unquantised base at ``model-dtype``: a merge into 4-bit weights would round
the update away. ``--round t`` exports a snapshot (``save-every``).

OUT must not exist or be empty; the model is written under a temporary name
beside it and renamed, so OUT is whole or absent.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from fedlora.core.config import ConfigError


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--merge {out}: exists and is not empty")
    if not out.parent.is_dir():
        raise ConfigError(f"--merge {out}: no directory {out.parent}")


def export_merged(run_dir: str, out: str, round_: int | None = None) -> Path:
    """Write the merged model of ``run_dir`` (or of its round-``round_``
    snapshot) to ``out``; returns ``out``."""
    from fedlora.commands.runmodel import load_run_model

    target = Path(out).expanduser().resolve()
    _check_out(target)
    _, model = load_run_model(run_dir, round_, quantization="none")
    merged = model.peft.merge_and_unload()
    if model.spec.task == "seq-cls":
        names = model.spec.label_names
        merged.config.id2label = dict(enumerate(names))
        merged.config.label2id = {name: i for i, name in enumerate(names)}
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        merged.save_pretrained(str(tmp))
        model.tokenizer.save_pretrained(str(tmp))
        if target.exists():
            target.rmdir()  # empty (checked above)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
