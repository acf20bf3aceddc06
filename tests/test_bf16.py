"""The fast path in bf16 (and fp16): greedy parity with transformers in the same dtype (CPU, tiny models).

On a CPU with AVX512_BF16 the bf16 matmuls run on ffnskip's VDPBF16PS kernel (up to 8 rows) and
oneDNN's pre-packed weights (more rows); on other x86-64 CPUs with
AVX2 + FMA on ffnskip's AVX2 kernel (``ffnskip.kernels``, both tested on their own in
test_kernels.py); elsewhere, and in fp16 on a CPU without AVX512_FP16, through F.linear. Either way the dense greedy tokens must be
transformers'.
"""

import pytest
import torch
import torch.nn.functional as F
from tiny import TinyTokenizer, hf_greedy, tiny_model

from ffnskip import SamplingParams, SkipPolicy, generate
from ffnskip.fastpath import FastDecoder, _Mat, _rms_norm, matmul_backend, onednn_low_precision

TOK = TinyTokenizer()
PROMPTS = [[5, 17, 33, 2, 90, 41], [7, 7, 120], [200, 3, 64, 9, 11, 150, 31, 8, 77]]  # unequal: padded


def _low(family: str, dtype: torch.dtype):
    return tiny_model(family).to(dtype)


def run(model, prompts, policy, n=16, fast=None):
    results = []
    for _ in generate(model, TOK, prompts, policy, SamplingParams(max_new_tokens=n, ignore_eos=True), results=results, fast=fast):
        pass
    return results


@pytest.fixture(scope="module", params=[("llama", "bfloat16"), ("qwen3", "bfloat16"), ("llama", "float16")], ids=lambda p: f"{p[0]}-{p[1]}")
def model(request):
    family, dtype = request.param
    return _low(family, getattr(torch, dtype))


def test_dense_is_token_identical_to_transformers_in_the_same_dtype(model):
    assert FastDecoder.supports(model, 64) is None
    ref = hf_greedy(model, [PROMPTS[0]], 24)[0]
    assert run(model, [PROMPTS[0]], SkipPolicy.dense(), n=24, fast=True)[0].token_ids == ref
    assert len(set(ref)) > 3  # varied text: the comparison means something


def test_padded_batch_is_transformers_and_skipping_agrees_with_the_model_forward(model):
    assert [r.token_ids for r in run(model, PROMPTS, SkipPolicy.dense(), n=12, fast=True)] == hf_greedy(model, PROMPTS, 12)
    pol = SkipPolicy(threshold=0.9, layer_start=2, layer_end=7, warmup_tokens=2, skip_budget=3, dense_every=3)  # adaptive
    a, b = run(model, PROMPTS, pol, n=12, fast=False), run(model, PROMPTS, pol, n=12, fast=True)
    assert sum(r.stats.skipped_ffn for r in a) > 0
    assert len({tuple(r.stats.skipped_per_layer) for r in b}) > 1  # the rows split the batch
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert [r.stats.skipped_per_layer for r in a] == [r.stats.skipped_per_layer for r in b]


def test_the_kv_cache_and_the_layout_follow_the_dtype():
    model = _low("llama", torch.bfloat16)
    fd = FastDecoder(model, 1, 32, padded=False)
    assert fd.k[0].dtype == fd.v[0].dtype == torch.bfloat16
    packed = onednn_low_precision(torch.bfloat16)
    assert packed == bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    qkv = fd.layers[0].qkv
    assert qkv.panels is None  # bf16 never keeps panels
    backend = matmul_backend(torch.bfloat16)
    assert backend in ("avx512bf16", "onednn") if packed else backend in ("avx2", "aten")
    # One copy per kernel: oneDNN's packed weight, one of ffnskip's kernels', or the weight itself for F.linear.
    assert [qkv._packed is not None, qkv._kern is not None, qkv.weight is not None] == [
        backend == "onednn", backend in ("avx512bf16", "avx2"), backend == "aten"]
    model.float()  # the same Parameters in another dtype: the cached layout is rebuilt
    fd = FastDecoder(model, 1, 32, padded=False)
    assert fd.layers[0].qkv.panels is not None and fd.layers[0].qkv.panels.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 3, 8])
def test_a_matmul_gives_f_linear_bits(dtype, rows, monkeypatch):
    """The fast path's matmul in bf16/fp16 (with a bias) is F.linear's to the bit: oneDNN's packed
    weight where the CPU has the instructions, else F.linear itself; fp32 keeps the panels. (The
    AVX2 and AVX512_BF16 kernels sum in their own order: within one bf16 rounding, in test_kernels.py.)"""
    if matmul_backend(dtype) in ("avx2", "avx512bf16"):  # F.linear's or oneDNN's own kernel here
        monkeypatch.setenv("FFNSKIP_BF16_KERNEL", "onednn" if onednn_low_precision(dtype) else "aten")
    torch.manual_seed(0)
    w = (torch.randn(96, 64) * 0.2).to(dtype)
    b = torch.randn(96).to(dtype)
    x = torch.randn(rows, 1, 64).to(dtype)
    y = _Mat.of(w, 2, b)(x)  # [rows, 1, 96]
    ref = F.linear(x, w, b)
    assert y.shape == ref.shape and y.dtype == dtype
    assert torch.equal(y, ref)
    m = _Mat.of(w, 2, b)
    assert m.panels is None and (m.weight is None) == onednn_low_precision(dtype)
    assert m._kern is None
    assert _Mat.of(w.float(), 2).panels is not None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rms_norm_is_transformers_to_the_bit(dtype):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(0)
    norm = LlamaRMSNorm(64, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.3)
    norm = norm.to(dtype)
    x = (torch.randn(32, 5, 64) * 3).to(dtype)
    assert torch.equal(_rms_norm(x, norm.weight, 1e-6), norm(x))
    per_head = (torch.randn(5, 64) * 0.3 + 1).to(dtype)  # Qwen3's q/k norms: one weight per head
    ref = per_head * (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype)
    assert torch.equal(_rms_norm(x, per_head, 1e-6), ref)
