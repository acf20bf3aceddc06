"""ffnskip.kernels: the AVX512_BF16 and AVX2 + FMA bf16 linears (built on first use) and how the fast
path picks its bf16 matmul (``ffnskip.fastpath.matmul_backend``, ``FFNSKIP_BF16_KERNEL``).

Each kernel's tests run on every x86-64 CPU with its instructions, forced
(``FFNSKIP_BF16_KERNEL=avx2`` / ``avx512bf16``) whatever ``auto`` picks: the AVX2 one on every
x86-64 CPU seen here, the AVX512_BF16 one where the CPU has it (AMD Zen 4, Intel Sapphire Rapids;
skipped on AVX2-only CPUs such as Zen 3, which cannot execute it). Outputs are compared with fp32
math rounded once to bf16, within one bf16 rounding (the order of the fp32 additions is each
kernel's own), never bit for bit against a CPU-dependent kernel; greedy tokens through a kernel
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
KERNELS = [
    pytest.param("avx2", marks=needs_avx2),
    pytest.param("avx512bf16", marks=pytest.mark.skipif(
        not kernels.has_avx512_bf16(), reason="this CPU cannot execute AVX512_BF16 instructions")),
]


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


@pytest.fixture(params=KERNELS)
def kernel(request, monkeypatch):
    """Each kernel this CPU can execute, forced; it must build."""
    monkeypatch.setenv(kernels.ENV, request.param)
    assert kernels.load(request.param), kernels.error(request.param)
    return request.param


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 8, 9, 16, 17, 33])
@pytest.mark.parametrize("k", [1, 5, 64, 67])
def test_the_kernel_is_fp32_math_rounded_once(kernel, rows, k):
    g = torch.Generator().manual_seed(rows * 100 + k)
    x = torch.randn(rows, k, generator=g).bfloat16()
    w = torch.randn(48, k, generator=g).bfloat16()
    b = torch.randn(48, generator=g).bfloat16()
    packed = kernels.pack_for(kernel, w)
    assert packed.shape == ((3, k, 16) if kernel == "avx2" else (3, (k + 1) // 2, 16, 2))
    _within_one_rounding(kernels.linear(x, packed, b), x, w, b)
    _within_one_rounding(kernels.linear(x, packed, None), x, w, None)
    # Against F.linear in bf16 (this CPU's own kernel): the same up to one rounding, and mostly the same bits.
    ref = F.linear(x, w, b)
    y = kernels.linear(x, packed, b)
    assert torch.all((y.float() - ref.float()).abs() <= 2 * _ulp_bf16(ref.float()))
    assert (y == ref).float().mean().item() > 0.9


def test_the_kernel_keeps_infinities_and_nans_and_rejects_bad_input(kernel):
    pack, run = (lambda w: kernels.pack_for(kernel, w)), kernels.op(kernel)
    x = torch.ones(2, 32).bfloat16()
    w = torch.ones(16, 32).bfloat16()
    x[0, 3] = float("inf")
    x[1, 5] = float("nan")
    y = run(x, pack(w), None)
    assert torch.isinf(y[0]).all() and (y[0] > 0).all() and torch.isnan(y[1]).all()
    assert run(torch.empty(0, 32).bfloat16(), pack(w), None).shape == (0, 16)
    with pytest.raises(RuntimeError, match="x must be"):
        run(x.float(), pack(w), None)
    with pytest.raises(RuntimeError, match="x has 29 inputs"):
        run(x[:, :29].contiguous(), pack(w), None)
    with pytest.raises(RuntimeError, match="packed"):
        run(x, w, None)  # the unpacked weight
    with pytest.raises(RuntimeError, match="packed"):
        run(x, kernels.pack_for("avx2" if kernel != "avx2" else "avx512bf16", w), None)  # the other kernel's layout
    with pytest.raises(RuntimeError, match="bias"):
        run(x, pack(w), torch.ones(8).bfloat16())
    with pytest.raises(ValueError, match="multiple of 16"):
        pack(torch.ones(20, 32).bfloat16())


@pytest.mark.parametrize("shape", [(3, 1, 576), (2, 12, 64), (1, 1, 13)])
def test_the_fused_rms_norm_is_transformers_rounding(kernel, shape):
    """kernels.DecodeOps.rms_norm: fp32 x / sqrt(mean(x^2) + eps), rounded to bf16, times the weight,
    rounded: within one bf16 unit of that math (and, in practice, fastpath._rms_norm's bits)."""
    from ffnskip.fastpath import _rms_norm

    ops = kernels.decode_ops(kernel)
    g = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(*shape, generator=g) * 4).bfloat16()
    for w in (torch.randn(shape[-1], generator=g).bfloat16(), torch.randn(shape[1], shape[-1], generator=g).bfloat16()):
        y = ops.rms_norm(x, w, 1e-6)
        xf = x.double()
        normed = (xf / torch.sqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).float().bfloat16()  # [A, G, D]
        exact = w.double() * normed.double()
        assert y.shape == x.shape and y.dtype == torch.bfloat16
        assert torch.all((y.double() - exact).abs() <= 2 * _ulp_bf16(exact.float()).double())  # two roundings
        ref = _rms_norm(x, w, 1e-6)
        assert (y == ref).float().mean().item() > 0.99
    strided = torch.randn(2, 5, 64, generator=g).bfloat16()[:, 1:4]  # a slice, as Qwen3's q/k heads of the qkv output
    assert torch.equal(ops.rms_norm(strided, torch.ones(64).bfloat16(), 1e-6),
                       ops.rms_norm(strided.contiguous(), torch.ones(64).bfloat16(), 1e-6))
    with pytest.raises(RuntimeError, match="weight must be"):
        ops.rms_norm(x, torch.ones(shape[-1] + 1).bfloat16(), 1e-6)
    with pytest.raises(RuntimeError, match="x must be"):
        ops.rms_norm(x.double(), torch.ones(shape[-1]).double(), 1e-6)
    with pytest.raises(RuntimeError, match="weight must be"):
        ops.rms_norm(x.float(), torch.ones(shape[-1]).bfloat16(), 1e-6)  # the dtypes differ


@pytest.mark.parametrize("shape", [(3, 1, 576), (2, 12, 64), (1, 1, 13)])
def test_the_fused_rms_norm_in_fp32_is_transformers_math(kernel, shape):
    """The same op in fp32 (the fp32 fast path's): x / sqrt(mean(x^2) + eps) times the weight, within a
    few fp32 units of float64 math, and close to ATen's F.rms_norm (its own order of additions)."""
    from ffnskip.fastpath import _rms_norm

    ops = kernels.decode_ops(kernel)
    g = torch.Generator().manual_seed(sum(shape) + 1)
    x = torch.randn(*shape, generator=g) * 4
    for w in (torch.randn(shape[-1], generator=g), torch.randn(shape[1], shape[-1], generator=g)):
        y = ops.rms_norm(x, w, 1e-6)
        xf = x.double()
        exact = w.double() * (xf / torch.sqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6))
        assert y.shape == x.shape and y.dtype == torch.float32
        assert torch.allclose(y.double(), exact, rtol=2e-6, atol=0)
        assert torch.allclose(y, _rms_norm(x, w, 1e-6), rtol=2e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rope_and_the_cache_writes_are_transformers_bits(kernel, dtype):
    """kernels.DecodeOps.rope_cache: (x * cos) + (rotate_half(x) * sin) with a rounding to the dtype
    after each op, as ATen's elementwise ops round (exact products, so bit for bit on any CPU; no
    fused multiply-add), k and v written into one cache column and nothing else."""
    from ffnskip.fastpath import _rotate_half

    ops = kernels.decode_ops(kernel)
    g = torch.Generator().manual_seed(5)
    B, H, Hkv, hd, cap, col = 3, 6, 2, 16, 9, 4
    qkv = (torch.randn(B, H + 2 * Hkv, hd, generator=g) * 3).to(dtype)
    cos, sin = torch.randn(B, 1, hd, generator=g).to(dtype), torch.randn(B, 1, hd, generator=g).to(dtype)
    kc, vc = torch.randn(B, Hkv, cap, hd, generator=g).to(dtype), torch.randn(B, Hkv, cap, hd, generator=g).to(dtype)
    k0, v0 = kc.clone(), vc.clone()
    qk = qkv[:, : H + Hkv]  # a strided slice, as in the step
    q = ops.rope_cache(qk, qkv[:, H + Hkv :], cos.view(B, hd), sin.view(B, hd), kc, vc, col, H)
    ref = (qk * cos) + (_rotate_half(qk) * sin)  # [B, H + Hkv, hd]
    assert torch.equal(q, ref[:, :H])
    assert torch.equal(kc[:, :, col], ref[:, H:]) and torch.equal(vc[:, :, col], qkv[:, H + Hkv :])
    others = [c for c in range(cap) if c != col]
    assert torch.equal(kc[:, :, others], k0[:, :, others]) and torch.equal(vc[:, :, others], v0[:, :, others])
    with pytest.raises(RuntimeError, match="column 9"):
        ops.rope_cache(qk, qkv[:, H + Hkv :], cos.view(B, hd), sin.view(B, hd), kc, vc, cap, H)
    with pytest.raises(RuntimeError, match="do not split"):
        ops.rope_cache(qk, qkv[:, H + Hkv :], cos.view(B, hd), sin.view(B, hd), kc, vc, col, H + Hkv)
    with pytest.raises(RuntimeError, match="in qk's dtype"):
        other = torch.float32 if dtype == torch.bfloat16 else torch.bfloat16
        ops.rope_cache(qk, qkv[:, H + Hkv :], cos.view(B, hd).to(other), sin.view(B, hd), kc, vc, col, H)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_argmax_is_torchs(kernel, dtype):
    ops = kernels.decode_ops(kernel)
    g = torch.Generator().manual_seed(7)
    for v in (1, 7, 49152, 50001):
        x = torch.randn(4, v, generator=g).to(dtype)
        if v > 8:
            x[0, v // 3] = x[0, v - 2] = 50.0  # a tie: the first index
            x[1, v // 2] = float("nan")  # a NaN wins, the first one
            x[1, v - 1] = float("nan")
        x[2] = float("-inf")  # nothing above -inf: index 0
        assert torch.equal(ops.argmax(x), x.argmax(dim=-1)), v
    with pytest.raises(RuntimeError, match="x must be"):
        ops.argmax(torch.ones(2, 0).bfloat16())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("B, H, Hkv, hd, cap, n", [(1, 9, 3, 64, 80, 70), (3, 8, 2, 16, 20, 13), (2, 4, 4, 64, 300, 257)])
def test_the_single_query_attention_is_sdpas_math(kernel, dtype, B, H, Hkv, hd, cap, n):
    """kernels.DecodeOps.attend: softmax(q k^T scale) v over the first n cache columns, query heads
    grouped per K/V head, masked keys left out: within 1e-6 of float64 math in fp32; in bf16 as close
    to it as SDPA in bf16 (never its bits: SDPA's kernel depends on the CPU); columns past n and
    masked keys never count."""
    ops = kernels.decode_ops(kernel)
    g = torch.Generator().manual_seed(B * 100 + n)
    q = torch.randn(B, H, hd, generator=g).to(dtype)
    kc, vc = torch.randn(B, Hkv, cap, hd, generator=g).to(dtype), torch.randn(B, Hkv, cap, hd, generator=g).to(dtype)
    mask = torch.ones(B, n, dtype=torch.bool)
    mask[0, :5] = False  # a left-padded row
    kc[:, :, n:] = vc[:, :, n:] = float("nan")  # beyond the filled columns: must not be read

    def sdpa(m, t):
        qp = q.to(t).view(B, Hkv, H // Hkv, hd)
        return F.scaled_dot_product_attention(qp, kc[:, :, :n].to(t), vc[:, :, :n].to(t), scale=0.125,
                                              attn_mask=None if m is None else m[:, None, None]).reshape(B, H, hd)

    for m in (None, mask):
        o, ref, theirs = ops.attend(q, kc, vc, n, m, 0.125), sdpa(m, torch.float64), sdpa(m, dtype)
        assert o.shape == (B, H, hd) and o.dtype == dtype and not torch.isnan(o).any()
        if dtype == torch.float32:
            assert torch.allclose(o.double(), ref, rtol=0, atol=1e-6)
        else:  # SDPA's bf16 roundings (its softmax weights too): as far from float64 as SDPA is on this CPU,
            # and within one output rounding plus the weights' rounding (2^-10 of the largest |v|) of it
            assert (o.double() - ref).abs().max() <= 1.5 * (theirs.double() - ref).abs().max() + 1e-6
            vmax = vc[:, :, :n].abs().max().double()
            assert torch.all((o.double() - ref).abs() <= _ulp_bf16(ref.float()).double() + 2.0**-10 * vmax)
    with pytest.raises(RuntimeError, match="keys of a"):
        ops.attend(q, kc, vc, cap + 1, None, 0.125)
    with pytest.raises(RuntimeError, match="mask must be"):
        ops.attend(q, kc, vc, n, mask[:, :-1].contiguous(), 0.125)
    with pytest.raises(RuntimeError, match="Hkv dividing H"):
        ops.attend(q, kc[:, :, :, :-1].contiguous(), vc[:, :, :, :-1].contiguous(), n, None, 0.125)


def test_greedy_uses_a_loaded_library_and_never_builds_one(monkeypatch):
    logits = torch.randn(3, 1000).bfloat16()
    monkeypatch.setattr(kernels, "_build", lambda kernel: pytest.fail("greedy must not build a kernel"))
    monkeypatch.setattr(kernels, "_state", {"flags": kernels.cpu_flags()})  # nothing loaded in this "process"
    assert torch.equal(kernels.greedy(logits), logits.argmax(dim=-1))
    assert torch.equal(kernels.greedy(logits.float()), logits.float().argmax(dim=-1))


TOK = TinyTokenizer()
PROMPTS = [[5, 17, 33, 2, 90, 41], [7, 7, 120], [200, 3, 64, 9, 11, 150, 31, 8, 77]]  # unequal: padded


def _ours(model, prompts, policy, n):
    results = []
    for _ in generate(model, TOK, prompts, policy, SamplingParams(max_new_tokens=n, ignore_eos=True), results=results, fast=True):
        pass
    return results


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_fp32_runs_the_librarys_small_ops_and_keeps_transformers_greedy_tokens(kernel, family, monkeypatch):
    """fp32 on an x86-64 CPU: the matmuls stay the panels, RMSNorm / RoPE / argmax are the library's
    (kernels.fp32_ops); greedy tokens are transformers' fp32 ones; FFNSKIP_BF16_KERNEL=aten keeps ATen's."""
    model = tiny_model(family)
    fd = FastDecoder(model, len(PROMPTS), 64, padded=True)
    assert fd.ops is not None and fd.ops.name == kernel and fd.layers[0].qkv.panels is not None
    assert numerics_key("cpu", torch.float32)["small_ops"] == kernel
    ref = hf_greedy(model, PROMPTS, 16)
    assert [r.token_ids for r in _ours(model, PROMPTS, SkipPolicy.dense(), 16)] == ref
    assert len({t for row in ref for t in row}) > 5
    monkeypatch.setenv(kernels.ENV, "aten")
    assert FastDecoder(model, 1, 8, padded=False).ops is None
    assert numerics_key("cpu", torch.float32)["small_ops"] == "aten"  # a cached dense decode keys on it
    assert [r.token_ids for r in _ours(model, PROMPTS, SkipPolicy.dense(), 16)] == ref


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_greedy_tokens_through_the_kernel_are_transformers_bf16(kernel, family):
    model = tiny_model(family).to(torch.bfloat16)
    fd = FastDecoder(model, len(PROMPTS), 64, padded=True)
    qkv, head = fd.layers[0].qkv, fd.head[0]
    assert qkv._kern is not None and qkv.weight is None and qkv.panels is None  # the kernel, not F.linear
    assert head._kern is not None and head._kop == kernels.op(kernel)
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
    if kernels.has_avx512_bf16():
        assert auto == "avx512bf16"
    elif onednn_low_precision(torch.bfloat16):
        assert auto == "onednn"
    else:
        assert auto == ("avx2" if kernels.has_avx2_fma() else "aten")
    assert numerics_key("cpu", torch.bfloat16)["matmul"] == auto
    monkeypatch.setenv(kernels.ENV, "aten")
    assert matmul_backend(torch.bfloat16) == "aten"
    assert numerics_key("cpu", torch.bfloat16)["matmul"] == "aten"  # a cached dense decode keys on it
    w = torch.randn(32, 16).bfloat16()
    m = _Mat.of(w, 2)
    assert m.weight is not None and m._kern is None
    monkeypatch.setenv(kernels.ENV, "onednn")
    if onednn_low_precision(torch.bfloat16):
        assert matmul_backend(torch.bfloat16) == "onednn"
        m = _Mat.of(w, 2)
        assert m._packed is not None and m._kern is None
    else:
        with pytest.raises(RuntimeError, match="FFNSKIP_BF16_KERNEL=onednn"):
            matmul_backend(torch.bfloat16)
    monkeypatch.setenv(kernels.ENV, "fastest")
    with pytest.raises(ValueError, match="FFNSKIP_BF16_KERNEL='fastest'"):
        matmul_backend(torch.bfloat16)
    for name in ("avx2", "avx512bf16"):
        monkeypatch.setenv(kernels.ENV, name)
        assert matmul_backend(torch.float16) in ("onednn", "aten")  # the variable is about bf16 only
        if kernels.cpu_supports(name):
            assert matmul_backend(torch.bfloat16) == name
            m = _Mat.of(torch.randn(20, 16).bfloat16(), 2)  # 20 columns: not whole blocks of 16
            assert m._kern is None and (m.weight is not None or m._packed is not None)  # F.linear or oneDNN for that one
        else:
            with pytest.raises(RuntimeError, match=f"FFNSKIP_BF16_KERNEL={name}: the .* cannot run here .this CPU has no"):
                matmul_backend(torch.bfloat16)


@pytest.mark.skipif(not (kernels.has_avx512_bf16() and onednn_low_precision(torch.bfloat16)),
                    reason="needs a CPU with AVX512_BF16")
def test_more_rows_than_the_kernel_takes_go_to_onednn_built_once(monkeypatch):
    """On AVX512_BF16 the kernel takes up to kernels.max_rows rows; a larger batch runs oneDNN's
    packed weight, made from the kernel's copy on first use and kept."""
    from torch.profiler import ProfilerActivity, profile

    monkeypatch.setenv(kernels.ENV, "avx512bf16")
    g = torch.Generator().manual_seed(3)
    w = torch.randn(64, 40, generator=g).bfloat16()
    b = torch.randn(64, generator=g).bfloat16()
    m = _Mat.of(w, 2, b)
    assert m._kern is not None and m._packed is None
    limit = kernels.max_rows("avx512bf16")
    small = torch.randn(limit, 1, 40, generator=g).bfloat16()
    big = torch.randn(limit + 1, 1, 40, generator=g).bfloat16()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        ys = m(small)
    assert m._packed is None and any(e.key == "ffnskip::bf16_linear_avx512" for e in prof.key_averages())
    yb = m(big)
    packed = m._packed
    assert packed is not None
    m(big)
    assert m._packed is packed  # built once
    for y, x in ((ys, small), (yb, big)):
        assert y.shape == (x.shape[0], 1, 64)
        _within_one_rounding(y.view(x.shape[0], 64), x.view(x.shape[0], 40), w, b)
    assert torch.equal(yb, F.linear(big, w, b))  # oneDNN's packed kernel: F.linear's bits


def test_a_failed_build_falls_back_and_says_why(monkeypatch, caplog):
    monkeypatch.delenv(kernels.ENV, raising=False)
    monkeypatch.setattr(kernels, "_state", {"flags": frozenset({"avx2", "fma", "avx512f", "avx512bw", "avx512_bf16"})})
    monkeypatch.setattr(kernels.platform, "machine", lambda: "x86_64")

    def broken(kernel):
        raise RuntimeError(f"Error building extension 'ffnskip_{kernel.source.stem}'\nc++: not found")

    monkeypatch.setattr(kernels, "_build", broken)
    with caplog.at_level("WARNING", logger="ffnskip.kernels"):
        assert not kernels.load("avx512bf16")
        assert not kernels.load_avx2_bf16()
    assert "AVX512_BF16 bf16 kernel could not be built (RuntimeError: c++: not found)" in caplog.text
    assert "AVX2 + FMA bf16 kernel could not be built (RuntimeError: c++: not found)" in caplog.text
    assert kernels.avx2_bf16_error() == kernels.error("avx512bf16") == "RuntimeError: c++: not found"
    # Neither kernel: oneDNN where it has native bf16, else F.linear; a forced kernel is an error naming why.
    assert matmul_backend(torch.bfloat16) == ("onednn" if onednn_low_precision(torch.bfloat16) else "aten")
    for name in ("avx2", "avx512bf16"):
        monkeypatch.setenv(kernels.ENV, name)
        with pytest.raises(RuntimeError, match=re.escape("cannot run here (RuntimeError: c++: not found)")):
            matmul_backend(torch.bfloat16)


def test_the_prompt_pass_runs_the_kernel_on_the_decode_steps_packed_weights(kernel, monkeypatch):
    from torch.profiler import ProfilerActivity, profile

    from ffnskip.decode import new_cache, prefill
    from ffnskip.fastpath import prefill_kernels

    monkeypatch.setattr(kernels, "has_amx_bf16", lambda: False)  # with AMX only short prompts: the next test
    model = tiny_model("qwen3").to(torch.bfloat16)  # q/k/v biases off, q/k norms: every linear of the family
    ids = torch.tensor([PROMPTS[2]])
    args = (ids, torch.ones_like(ids), torch.arange(ids.shape[1])[None])
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        logits = prefill(model, *args, new_cache(model))  # [1, V]
    calls = sum(e.count for e in prof.key_averages() if e.key == f"ffnskip::{kernels.KERNELS[kernel].op}")
    n_layers = model.config.num_hidden_layers
    assert calls == 7 * n_layers + 1  # q, k, v, o, gate, up, down per layer, and the LM head
    views = model._ffnskip_kernel_views[1]
    fd = FastDecoder(model, 1, 32, padded=False)  # the decode steps' packed weights: the same memory
    q = model.model.layers[0].self_attn.q_proj.weight
    assert views[id(q)][1].data_ptr() == fd.layers[0].qkv._kern.data_ptr()
    monkeypatch.setenv(kernels.ENV, "aten")  # F.linear: the same logits up to bf16 rounding
    assert isinstance(prefill_kernels(model), type(__import__("contextlib").nullcontext()))
    with torch.no_grad():
        ref = prefill(model, *args, new_cache(model))
    assert torch.allclose(logits.float(), ref.float(), rtol=0.02, atol=0.02 * ref.float().abs().max().item())
    assert logits.argmax().item() == ref.argmax().item()


def test_the_build_folder_is_named_after_the_sources_contents_not_their_path(tmp_path, monkeypatch):
    """Two checkouts of the same sources share one built library; a changed source gets its own."""
    one, two = tmp_path / "checkout1" / "csrc", tmp_path / "checkout2" / "csrc"
    for d in (one, two):
        d.mkdir(parents=True)
        for f in kernels._CSRC.iterdir():
            (d / f.name).write_bytes(f.read_bytes())
    monkeypatch.setenv("FFNSKIP_CACHE_DIR", str(tmp_path / "cache"))
    dirs = {}
    for name, d in (("one", one), ("two", two)):
        monkeypatch.setattr(kernels, "_CSRC", d)
        dirs[name] = {k: kernels.build_dir(kernel) for k, kernel in kernels.KERNELS.items()}
    assert dirs["one"] == dirs["two"]
    assert dirs["one"]["avx2"] != dirs["one"]["avx512bf16"]  # other flags
    assert all(p.parent == kernels.cache_dir() for p in dirs["one"].values())
    (two / "decode_ops.h").write_text((two / "decode_ops.h").read_text() + "\n// changed\n")
    assert kernels.build_dir(kernels.KERNELS["avx2"]) != dirs["one"]["avx2"]  # a header counts too
    # The sources are compiled from the build folder's own copy, made once (a copy keeps its time).
    src = kernels._sources(dirs["one"]["avx2"])
    assert sorted(p.name for p in src.iterdir()) == sorted(p.name for p in one.iterdir())
    stamp = (src / "decode_ops.h").stat().st_mtime_ns
    kernels._sources(dirs["one"]["avx2"])
    assert (src / "decode_ops.h").stat().st_mtime_ns == stamp


@needs_avx2
def test_a_second_checkout_loads_the_built_library_without_rebuilding_it(tmp_path):
    """What made a server's first request take 25 s: a checkout at another path rebuilt the library
    (its absolute source path was in build.ninja). Now another copy of the same sources loads it."""
    import subprocess
    import sys

    copy = tmp_path / "csrc"
    copy.mkdir()
    for f in kernels._CSRC.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    assert kernels.load("avx2"), kernels.error("avx2")  # built (or found) from this checkout
    lib = next(kernels.build_dir(kernels.KERNELS["avx2"]).glob("*.so"))
    stamp = lib.stat().st_mtime_ns
    script = ("import pathlib, sys; from ffnskip import kernels; kernels._CSRC = pathlib.Path(sys.argv[1]); "
              "assert kernels.load('avx2'), kernels.error('avx2'); print(kernels.build_dir(kernels.KERNELS['avx2']))")
    out = subprocess.run([sys.executable, "-c", script, str(copy)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(lib.parent)
    assert lib.stat().st_mtime_ns == stamp  # not rebuilt


def test_prepare_builds_the_kernel_and_packs_the_weights_before_the_first_step(monkeypatch):
    from ffnskip.fastpath import prepare

    monkeypatch.delenv(kernels.ENV, raising=False)
    model = tiny_model("llama").to(torch.bfloat16)
    backend = prepare(model)
    assert backend == matmul_backend(torch.bfloat16)
    for layer in model.model.layers:
        assert hasattr(layer, "_ffnskip_panels")  # what the first FastDecoder would have packed
    assert model._ffnskip_head[1][3] == backend
    if backend in kernels.KERNELS:
        assert hasattr(torch.ops.ffnskip, kernels.KERNELS[backend].op)
    packed = [layer._ffnskip_panels for layer in model.model.layers]
    out = list(generate(model, TOK, [PROMPTS[0]], SkipPolicy.dense(), SamplingParams(max_new_tokens=3, ignore_eos=True), fast=True))
    assert out and all(layer._ffnskip_panels is p for layer, p in zip(model.model.layers, packed))  # reused
    monkeypatch.setenv(kernels.ENV, "nonsense")
    with pytest.raises(ValueError, match=f"{kernels.ENV}='nonsense'"):
        prepare(model)  # at load, not in the first request


def test_the_kernel_takes_fewer_rows_where_onednn_has_amx_tiles(monkeypatch):
    """Measured on an Intel Xeon with AMX (benchmarks/bf16_kernel.py): oneDNN's AMX kernel is flat in
    the row count and faster than ffnskip's from 3 rows, so there the kernel takes up to 2."""
    monkeypatch.delenv(kernels.ROWS_ENV, raising=False)
    monkeypatch.setattr(kernels.platform, "machine", lambda: "x86_64")
    avx512 = {"avx2", "fma", "avx512f", "avx512bw", "avx512_bf16"}
    monkeypatch.setattr(kernels, "_state", {"flags": frozenset(avx512)})  # AMD Zen 4
    assert (kernels.max_rows("avx512bf16"), kernels.max_rows("avx2")) == (kernels.MAX_ROWS, kernels.MAX_ROWS) == (8, 8)
    monkeypatch.setattr(kernels, "_state", {"flags": frozenset(avx512 | {"amx_tile", "amx_bf16"})})  # Sapphire Rapids
    assert (kernels.max_rows("avx512bf16"), kernels.max_rows("avx2")) == (kernels.AMX_MAX_ROWS, 8) == (2, 8)
    monkeypatch.setenv(kernels.ROWS_ENV, "5")
    assert kernels.max_rows("avx512bf16") == 5
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv(kernels.ROWS_ENV, bad)
        with pytest.raises(ValueError, match=f"{kernels.ROWS_ENV}='{bad}': use a whole number"):
            kernels.max_rows("avx512bf16")


@pytest.mark.skipif(not (kernels.has_avx512_bf16() and onednn_low_precision(torch.bfloat16)),
                    reason="needs a CPU with AVX512_BF16")
def test_on_amx_a_prompt_longer_than_the_kernels_rows_runs_onednn(monkeypatch):
    from torch.profiler import ProfilerActivity, profile

    from ffnskip.decode import new_cache, prefill

    monkeypatch.setenv(kernels.ENV, "avx512bf16")
    monkeypatch.setenv(kernels.ROWS_ENV, "2")
    monkeypatch.setattr(kernels, "has_amx_bf16", lambda: True)
    model = tiny_model("llama").to(torch.bfloat16)

    def kernel_calls(prompt):
        ids = torch.tensor([prompt])
        with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
            prefill(model, ids, torch.ones_like(ids), torch.arange(ids.shape[1])[None], new_cache(model))
        return sum(e.count for e in prof.key_averages() if e.key == "ffnskip::bf16_linear_avx512")

    two, three = kernel_calls([5, 17]), kernel_calls([5, 17, 33])
    assert two >= 7 * model.config.num_hidden_layers  # every linear
    assert three == 1  # only the LM head, on the last position's one row
    monkeypatch.setattr(kernels, "has_amx_bf16", lambda: False)  # Zen 4: every prompt through the kernel
    assert kernel_calls([5, 17, 33]) == two
