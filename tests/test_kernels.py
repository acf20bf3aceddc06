"""ffnskip.kernels: the AVX2 + FMA bf16 linear (built on first use) and how the fast path picks its
bf16 matmul (``ffnskip.fastpath.matmul_backend``, ``FFNSKIP_BF16_KERNEL``).

The kernel runs on every x86-64 CPU seen here (all have AVX2 + FMA), so its tests force it
(``FFNSKIP_BF16_KERNEL=avx2``) even where ``auto`` picks oneDNN (AVX512_BF16/AMX). Its outputs are
compared with fp32 math rounded once to bf16, within one bf16 rounding (the order of its fp32
additions is its own), never bit for bit against a CPU-dependent kernel; greedy tokens through it
must be transformers' bf16 ones.
"""

import re

import pytest
import torch
import torch.nn.functional as F
from tiny import TinyTokenizer, hf_greedy, tiny_model

from ffnskip import SamplingParams, SkipPolicy, generate, kernels
from ffnskip.fastpath import FastDecoder, _Mat, matmul_backend, numerics_key, onednn_low_precision

needs_avx2 = pytest.mark.skipif(not kernels.has_avx2_fma(), reason="the AVX2 kernel needs an x86-64 CPU with AVX2 + FMA")


def _ulp_bf16(v: torch.Tensor) -> torch.Tensor:
    """One bf16 unit in the last place of each |v| (8 significant bits), at least the smallest normal's."""
    e = torch.floor(torch.log2(v.abs().clamp_min(2.0**-126)))
    return torch.exp2(e - 7)


def _within_one_rounding(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> None:
    """y (bf16) is fp32 math x w^T + b rounded once to bf16, give or take one bf16 unit (the fp32
    sum's own order changes its last bits, which can flip a rounding)."""
    exact = x.double() @ w.double().t() + (0 if b is None else b.double())  # [M, N]
    scale = x.double().abs() @ w.double().abs().t()  # what cancellation can leave of fp32 rounding
    err = (y.double() - exact).abs()
    bound = _ulp_bf16(exact.float()).double() + 1e-6 * scale
    assert y.dtype == torch.bfloat16 and y.shape == exact.shape
    assert torch.all(err <= bound), f"max error {(err - bound).max().item():.3g} over one bf16 rounding"


@pytest.fixture()
def avx2(monkeypatch):
    monkeypatch.setenv(kernels.ENV, "avx2")
    assert kernels.load_avx2_bf16(), kernels.avx2_bf16_error()  # a CPU with AVX2 + FMA and a compiler: it must build


@needs_avx2
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 8, 9, 17])
@pytest.mark.parametrize("k", [1, 5, 64, 67])
def test_the_kernel_is_fp32_math_rounded_once(avx2, rows, k):
    g = torch.Generator().manual_seed(rows * 100 + k)
    x = torch.randn(rows, k, generator=g).bfloat16()
    w = torch.randn(48, k, generator=g).bfloat16()
    b = torch.randn(48, generator=g).bfloat16()
    packed = kernels.pack(w)
    assert packed.shape == (3, k, 16)
    _within_one_rounding(kernels.linear(x, packed, b), x, w, b)
    _within_one_rounding(kernels.linear(x, packed, None), x, w, None)
    # Against F.linear in bf16 (this CPU's own kernel): the same up to one rounding, and mostly the same bits.
    ref = F.linear(x, w, b)
    y = kernels.linear(x, packed, b)
    assert torch.all((y.float() - ref.float()).abs() <= 2 * _ulp_bf16(ref.float()))
    assert (y == ref).float().mean().item() > 0.9


@needs_avx2
def test_the_kernel_keeps_infinities_and_nans_and_rejects_bad_input(avx2):
    x = torch.ones(2, 32).bfloat16()
    w = torch.ones(16, 32).bfloat16()
    x[0, 3] = float("inf")
    x[1, 5] = float("nan")
    y = kernels.linear(x, kernels.pack(w), None)
    assert torch.isinf(y[0]).all() and (y[0] > 0).all() and torch.isnan(y[1]).all()
    assert kernels.linear(torch.empty(0, 32).bfloat16(), kernels.pack(w), None).shape == (0, 16)
    with pytest.raises(RuntimeError, match="x must be"):
        kernels.linear(x.float(), kernels.pack(w), None)
    with pytest.raises(RuntimeError, match="x has 31 inputs"):
        kernels.linear(x[:, :31].contiguous(), kernels.pack(w), None)
    with pytest.raises(RuntimeError, match="packed"):
        kernels.linear(x, w, None)  # the unpacked weight
    with pytest.raises(RuntimeError, match="bias"):
        kernels.linear(x, kernels.pack(w), torch.ones(8).bfloat16())
    with pytest.raises(ValueError, match="multiple of 16"):
        kernels.pack(torch.ones(20, 32).bfloat16())


TOK = TinyTokenizer()
PROMPTS = [[5, 17, 33, 2, 90, 41], [7, 7, 120], [200, 3, 64, 9, 11, 150, 31, 8, 77]]  # unequal: padded


def _ours(model, prompts, policy, n):
    results = []
    for _ in generate(model, TOK, prompts, policy, SamplingParams(max_new_tokens=n, ignore_eos=True), results=results, fast=True):
        pass
    return results


@needs_avx2
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_greedy_tokens_through_the_kernel_are_transformers_bf16(avx2, family):
    model = tiny_model(family).to(torch.bfloat16)
    fd = FastDecoder(model, len(PROMPTS), 64, padded=True)
    qkv, head = fd.layers[0].qkv, fd.head[0]
    assert qkv._avx2 is not None and qkv.weight is None and qkv.panels is None  # the kernel, not F.linear
    assert head._avx2 is not None
    ref = hf_greedy(model, PROMPTS, 16)
    assert [r.token_ids for r in _ours(model, PROMPTS, SkipPolicy.dense(), 16)] == ref
    assert len({t for row in ref for t in row}) > 5  # varied text: the comparison means something
    # Skipping through the kernel agrees with the model's own forward (F.linear) on every decision.
    pol = SkipPolicy(threshold=0.9, layer_start=2, layer_end=7, warmup_tokens=2, skip_budget=3, dense_every=3)
    fast = _ours(model, PROMPTS, pol, 12)
    slow = []
    for _ in generate(model, TOK, PROMPTS, pol, SamplingParams(max_new_tokens=12, ignore_eos=True), results=slow, fast=False):
        pass
    assert sum(r.stats.skipped_ffn for r in fast) > 0
    assert [r.token_ids for r in fast] == [r.token_ids for r in slow]


def test_the_backend_choice_follows_the_cpu_and_the_variable(monkeypatch):
    monkeypatch.delenv(kernels.ENV, raising=False)
    assert matmul_backend(torch.float32) == "panels"
    auto = matmul_backend(torch.bfloat16)
    if onednn_low_precision(torch.bfloat16):
        assert auto == "onednn"
    else:
        assert auto == ("avx2" if kernels.has_avx2_fma() else "aten")
    assert numerics_key("cpu", torch.bfloat16)["matmul"] == auto
    monkeypatch.setenv(kernels.ENV, "aten")
    assert matmul_backend(torch.bfloat16) == "aten"
    assert numerics_key("cpu", torch.bfloat16)["matmul"] == "aten"  # a cached dense decode keys on it
    w = torch.randn(32, 16).bfloat16()
    m = _Mat.of(w, 2)
    assert m.weight is not None and m._avx2 is None
    monkeypatch.setenv(kernels.ENV, "onednn")
    if onednn_low_precision(torch.bfloat16):
        assert matmul_backend(torch.bfloat16) == "onednn"
    else:
        with pytest.raises(RuntimeError, match="FFNSKIP_BF16_KERNEL=onednn"):
            matmul_backend(torch.bfloat16)
    monkeypatch.setenv(kernels.ENV, "fastest")
    with pytest.raises(ValueError, match="FFNSKIP_BF16_KERNEL='fastest'"):
        matmul_backend(torch.bfloat16)
    monkeypatch.setenv(kernels.ENV, "avx2")
    assert matmul_backend(torch.float16) in ("onednn", "aten")  # the variable is about bf16 only
    if kernels.has_avx2_fma():
        assert matmul_backend(torch.bfloat16) == "avx2"
        m = _Mat.of(torch.randn(20, 16).bfloat16(), 2)  # 20 columns: not whole blocks of 16
        assert m._avx2 is None and m.weight is not None  # F.linear for that one
    else:
        with pytest.raises(RuntimeError, match="FFNSKIP_BF16_KERNEL=avx2"):
            matmul_backend(torch.bfloat16)


def test_a_failed_build_falls_back_to_f_linear_and_says_why(monkeypatch, caplog):
    monkeypatch.delenv(kernels.ENV, raising=False)
    monkeypatch.setattr(kernels, "_state", {"flags": frozenset({"avx2", "fma"})})
    monkeypatch.setattr(kernels.platform, "machine", lambda: "x86_64")

    def broken():
        raise RuntimeError("Error building extension 'ffnskip_bf16_linear_avx2'\nc++: not found")

    monkeypatch.setattr(kernels, "_build", broken)
    with caplog.at_level("WARNING", logger="ffnskip.kernels"):
        assert not kernels.load_avx2_bf16()
    assert "could not be built (RuntimeError: c++: not found)" in caplog.text
    assert kernels.avx2_bf16_error() == "RuntimeError: c++: not found"
    if not onednn_low_precision(torch.bfloat16):
        assert matmul_backend(torch.bfloat16) == "aten"
        monkeypatch.setenv(kernels.ENV, "avx2")
        with pytest.raises(RuntimeError, match=re.escape("cannot run here (RuntimeError: c++: not found)")):
            matmul_backend(torch.bfloat16)


@needs_avx2
def test_the_prompt_pass_runs_the_kernel_on_the_decode_steps_packed_weights(avx2, monkeypatch):
    from torch.profiler import ProfilerActivity, profile

    from ffnskip.decode import new_cache, prefill
    from ffnskip.fastpath import prefill_kernels

    model = tiny_model("qwen3").to(torch.bfloat16)  # q/k/v biases off, q/k norms: every linear of the family
    ids = torch.tensor([PROMPTS[2]])
    args = (ids, torch.ones_like(ids), torch.arange(ids.shape[1])[None])
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        logits = prefill(model, *args, new_cache(model))  # [1, V]
    calls = sum(e.count for e in prof.key_averages() if e.key == "ffnskip::bf16_linear_avx2")
    n_layers = model.config.num_hidden_layers
    assert calls == 7 * n_layers + 1  # q, k, v, o, gate, up, down per layer, and the LM head
    views = model._ffnskip_kernel_views[1]
    fd = FastDecoder(model, 1, 32, padded=False)  # the decode steps' packed weights: the same memory
    q = model.model.layers[0].self_attn.q_proj.weight
    assert views[id(q)][1].data_ptr() == fd.layers[0].qkv._avx2.data_ptr()
    monkeypatch.setenv(kernels.ENV, "aten")  # F.linear: the same logits up to bf16 rounding
    assert isinstance(prefill_kernels(model), type(__import__("contextlib").nullcontext()))
    with torch.no_grad():
        ref = prefill(model, *args, new_cache(model))
    assert torch.allclose(logits.float(), ref.float(), rtol=0.02, atol=0.02 * ref.float().abs().max().item())
    assert logits.argmax().item() == ref.argmax().item()
