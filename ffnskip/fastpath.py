"""A lean decode step for the LLaMA-layout families (LLaMA/SmolLM2, Mistral, Qwen2, Qwen3).

The model's own forward pass spends most of a small model's decode step in Python: per-layer
keyword plumbing, cache bookkeeping, mask construction, output objects. For one token per row
this path does the same arithmetic with the model's own weights in the same order; only the
matmuls read their weights in a faster layout (below), so logits agree with transformers' to
float rounding and greedy output is token-identical to transformers in the tests:

* the prompt (prefill) still runs through the model's own forward; its K/V are then copied into a
  pre-allocated cache [B, H_kv, max_len, head_dim] per layer, written in place afterwards;
* every projection (and the LM head) reads a copy of its weight stored input-major, ``[in, out]``,
  cut into one column panel per core (``_panels``): on CPU, MKL runs a lone GEMV on one core and
  streams the ``[out, in]`` layout that ``F.linear`` reads more slowly, while one ``bmm`` over
  the panels runs the non-transposed GEMV on every core (measured on the 2-core CI machine:
  the matmuls of a SmolLM2-135M step take about 35 ms instead of 65 ms). q/k/v and gate/up are
  each one matmul over concatenated weights, and every bias the model's linears carry (q/k/v,
  o_proj, gate/up/down) is added after its matmul. The summation order inside a dot product
  differs from ``F.linear``'s, so logits differ from transformers' in the last bits (about 1e-6
  relative); greedy tokens stay identical to transformers in the tests. The panels cost one more
  copy of the matmul weights (about 0.5 GB for SmolLM2-135M in fp32);
* in bf16 on an x86-64 CPU with AVX512_BF16 (AMD Zen 4, Intel Sapphire Rapids) the matmuls of up
  to 8 rows run ffnskip's own VDPBF16PS kernel (:mod:`ffnskip.kernels`: F.linear's rounding
  points, its own order of fp32 additions), larger batches oneDNN's pre-packed weight; in bf16 on
  an x86-64 CPU with AVX2 + FMA but no AVX512_BF16 (AMD Zen 3), ffnskip's AVX2 kernel; fp16 on a
  CPU with AVX512_FP16 / AMX-FP16 (and bf16 with ``FFNSKIP_BF16_KERNEL=onednn``) reads oneDNN's
  pre-packed weight, which gives ``F.linear``'s bits; elsewhere, and on CUDA, bf16/fp16 call
  ``F.linear`` on the model's weight (see ``_Mat`` and :func:`matmul_backend`). Greedy tokens are
  transformers' in the same dtype in the tests, whichever kernel runs;
* attention packs the query heads per K/V head ([B, Hkv, n_rep, hd] against [B, Hkv, n, hd]):
  the same result per query as SDPA's GQA, and in bf16 on CPU about 10x faster per layer;
* on an x86-64 CPU the small ops run fused in ffnskip's kernel library (:func:`small_ops`,
  :class:`~ffnskip.kernels.DecodeOps`): RMSNorm, RoPE with the cache writes and the greedy argmax
  in bf16 and fp32, and in fp32 the single-query attention too (bf16 keeps SDPA, whose roundings
  transformers' bf16 tokens depend on);

What is guaranteed about the numbers (and tested): for a fixed panel count, thread count and
CPU, a decode step is deterministic (the same inputs give bit-identical logits). Across panel
counts (= thread counts), or across CPUs whose BLAS picks another kernel (AVX2, AVX-512, AMX),
results agree only to float rounding: a BLAS may block the inner dimension differently for a
narrower panel. :func:`numerics_key` names everything that can change the numbers; a cache of
dense decodes must key on it.
* RoPE comes from the model's own rotary module, once per step for all layers, and is applied
  to q and k in one elementwise pass (the same operations per element as transformers');
* the skip decisions are the shared :class:`~ffnskip.engine.SkipController`'s.

Which families it covers, and where their parts are, is the adapters' business: a family whose
adapter carries a :class:`~ffnskip.adapters.FastLayout` runs here. Families without one (Gemma 3,
GPT-2) and settings it does not cover (sliding windows that bind, a non-SDPA attention, another
activation) use the model's own forward instead (``FastDecoder.supports`` says why).

The cache is one pre-allocated [B, H_kv, capacity, hd] tensor per layer whose columns all rows
share: a row that joins a running batch (:meth:`FastDecoder.join`) is right-aligned to the
current column, the columns before its prompt are padding (masked), and rows that leave are
dropped (:meth:`FastDecoder.keep`), with the leading columns no row uses any more.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from . import kernels
from .adapters import FastLayout, UnsupportedArchitecture, get_adapter
from .adapters.base import get_path
from .engine import SkipController, skip_whole_layer

log = logging.getLogger(__name__)

def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LLaMA RMSNorm (``LlamaRMSNorm.forward``) with ATen's fused kernel.

    fp32: one op (``F.rms_norm`` with the weight), the same numbers in the tests. bf16/fp16:
    transformers normalises in fp32, rounds to the model's dtype, then multiplies by the weight in
    that dtype; ``F.rms_norm`` of the fp32 copy without a weight, the rounding and the weight's
    multiply are those same operations in three ops instead of seven (bit-identical, tested). A
    2-D weight (Qwen3's per-head q/k norms) is multiplied after the same normalisation."""
    if x.dtype == torch.float32 and weight.dtype == torch.float32 and weight.dim() == 1:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    dtype = x.dtype
    return weight * F.rms_norm(x.to(torch.float32), (x.shape[-1],), None, eps).to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def numerics_key(device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> dict:
    """Everything besides the model, the inputs and the code that can change the bits of a decode:
    panel and thread counts, torch's CPU capability, the CPU itself (its BLAS/oneDNN kernel choice
    depends on the ISA: AVX2, AVX-512, AMX), the accelerator's name and, given the model's
    ``dtype``, which kernel its matmuls run (:func:`matmul_backend`)."""
    device = torch.device(device)
    key = {
        "device": device.type,
        "panels": panel_count(device),
        "threads": torch.get_num_threads(),
        "cpu_capability": _cpu_capability(),
        "cpu": _cpu_identity(),
        "mkldnn": bool(torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled),
    }
    if device.type == "cuda":
        key["accelerator"] = torch.cuda.get_device_name(device)
    if dtype is not None:
        key["matmul"] = matmul_backend(dtype, device)
        if key["matmul"] in kernels.KERNELS:
            key["kernel_rows"] = kernels.max_rows(key["matmul"])  # which row counts it takes, oneDNN the rest
        key["small_ops"] = small_ops(dtype, device) or "aten"  # RMSNorm's order of additions
    return key


def _cpu_capability() -> str:
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except (AttributeError, RuntimeError):
        return "unknown"


_CPU_ID: str | None = None


def _cpu_identity() -> str:
    """The CPU's model name and a hash of its feature flags (Linux ``/proc/cpuinfo``), else the
    platform's processor string."""
    global _CPU_ID
    if _CPU_ID is None:
        import hashlib
        import platform

        from .kernels import cpu_flags

        name, flags = "", " ".join(sorted(cpu_flags()))
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    k, _, v = line.partition(":")
                    if k.strip() == "model name":
                        name = v.strip()
                        break
        except OSError:
            pass
        name = name or platform.processor() or platform.machine()
        _CPU_ID = f"{name}|{hashlib.sha256(flags.encode()).hexdigest()[:12]}"
    return _CPU_ID


def panel_count(device: torch.device) -> int:
    """Column panels per weight: one per intra-op thread on CPU, where MKL runs a lone GEMV on one
    core but ``bmm`` runs one panel per core; 1 on accelerators (one kernel uses the device)."""
    return max(1, torch.get_num_threads()) if device.type == "cpu" else 1


def _panels(w: torch.Tensor, p: int) -> torch.Tensor:
    """A weight ``[out, in]`` as ``p`` input-major column panels ``[p, in, out / p]`` (contiguous).

    Panel j holds output columns ``[j out/p, (j+1) out/p)``; ``p`` falls back to 1 when it does not
    divide ``out``."""
    out, k = w.shape
    if out % p:
        p = 1
    return w.t().reshape(k, p, out // p).permute(1, 0, 2).contiguous()  # [p, in, out/p]


def _matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [B, 1, in] @ panels w [p, in, out/p] -> [B, 1, out].

    Every panel is one GEMV (GEMM for B > 1) over contiguous input-major memory; the p panels run
    on p cores inside one ``bmm``. Deterministic for a given p; across panel counts the outputs
    agree to float rounding only (a BLAS may block a narrower panel's dot products differently;
    seen on a Xeon with AVX-512 and AMX), tested as such."""
    B = x.shape[0]
    p, k, n = w.shape
    x2 = x.reshape(B, k)  # [B, in]
    if p == 1:
        return (x2 @ w[0]).view(B, 1, n)
    y = torch.bmm(x2.unsqueeze(0).expand(p, B, k), w)  # [p, B, out/p]
    return y.view(1, 1, p * n) if B == 1 else y.transpose(0, 1).reshape(B, 1, p * n)


def _onednn_packing() -> bool:
    """Whether this torch build has oneDNN's pre-packed linear (the one inductor uses on CPU)."""
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    except (AttributeError, RuntimeError):
        return False


_ONEDNN = _onednn_packing()


def onednn_low_precision(dtype: torch.dtype, device: torch.device | str = "cpu") -> bool:
    """Whether matmuls in ``dtype`` on ``device`` run on oneDNN's pre-packed weights for every row
    count: bf16 where the CPU has AVX512_BF16 or AMX-BF16 (``_is_mkldnn_bf16_supported``), fp16
    where it has AVX512_FP16 or AMX-FP16. Elsewhere (fp32, CUDA, a CPU without the instructions)
    the matmuls read the column panels."""
    if not _ONEDNN or torch.device(device).type != "cpu":
        return False
    try:
        if dtype == torch.bfloat16:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        if dtype == torch.float16:
            return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):
        return False
    return False


def small_ops(dtype: torch.dtype, device: torch.device | str = "cpu") -> str | None:
    """Which kernel library's fused small ops (RMSNorm, RoPE with the cache writes, argmax, in fp32
    the attention: :class:`kernels.DecodeOps`) the fast path runs instead of ATen's: in bf16 the library whose
    kernel runs the matmuls (:func:`matmul_backend`); in fp32 on an x86-64 CPU the one
    :func:`kernels.fp32_ops` picks (the matmuls stay the panels); None elsewhere (ATen's ops)."""
    device = torch.device(device)
    if device.type != "cpu":
        return None
    if dtype == torch.float32:
        return kernels.fp32_ops()
    backend = matmul_backend(dtype, device)
    return backend if backend in kernels.KERNELS else None


def matmul_backend(dtype: torch.dtype, device: torch.device | str = "cpu") -> str:
    """Which kernel the fast path's matmuls in ``dtype`` run on ``device``:

    * ``"panels"``: fp32 (and fp32 on accelerators): column panels, oneDNN's packed fp32 weight
      for several rows on CPU (``_Mat``);
    * ``"avx512bf16"``: bf16 on an x86-64 CPU with AVX512_BF16: :mod:`ffnskip.kernels`' VDPBF16PS
      kernel up to ``kernels.max_rows`` rows (8; 2 with AMX), oneDNN's packed bf16 weight for more (built on first
      use; if the build fails, logged, ``"onednn"``);
    * ``"onednn"``: bf16/fp16 on a CPU with the instructions (:func:`onednn_low_precision`);
    * ``"avx2"``: bf16 on an x86-64 CPU with AVX2 + FMA but neither AVX512_BF16 nor AMX:
      :mod:`ffnskip.kernels`' AVX2 kernel (if its build fails, logged, ``"aten"``);
    * ``"aten"``: ``F.linear`` on the model's weight (CUDA, fp16 without AVX512_FP16, other CPUs).

    ``FFNSKIP_BF16_KERNEL`` (``auto``, ``onednn``, ``avx512bf16``, ``avx2``, ``aten``) forces the
    bf16 choice on CPU; a forced kernel the CPU cannot run is an error that names the variable."""
    device = torch.device(device)
    if dtype == torch.float32:
        return "panels"
    if device.type != "cpu" or dtype != torch.bfloat16:
        return "onednn" if onednn_low_precision(dtype, device) else "aten"
    want = kernels.requested()
    if want == "aten":
        return "aten"
    if want == "onednn":
        if not onednn_low_precision(dtype, device):
            raise RuntimeError(f"{kernels.ENV}=onednn: oneDNN has no native bf16 kernel on this CPU (no AVX512_BF16 or AMX)")
        return "onednn"
    if want in kernels.KERNELS:
        if kernels.load(want):
            return want
        raise RuntimeError(f"{kernels.ENV}={want}: the {kernels.KERNELS[want].what} bf16 kernel cannot run here "
                           f"({kernels.error(want)})")
    # auto: ffnskip's VDPBF16PS kernel (measured faster than oneDNN's at 1-8 rows on Zen 4), else
    # oneDNN where it has native bf16, else the AVX2 kernel, else F.linear.
    if kernels.has_avx512_bf16() and kernels.load("avx512bf16"):
        return "avx512bf16"
    if onednn_low_precision(dtype, device):
        return "onednn"
    if kernels.load("avx2"):
        return "avx2"
    return "aten"


class _Mat:
    """One matmul weight of the fast path.

    fp32 (and accelerators), one row (batch 1, the latency case): column panels, one GEMV per
    core (``_matmul``). Several rows on CPU in fp32: oneDNN's pre-packed layout, built on first use
    and kept, because MKL's small-M GEMM re-packs the weight on every call (measured here: 64 ms
    instead of 90 ms for the matmuls of a SmolLM2-135M step at batch 8). The packed copy costs one
    more copy of the weight, only once a batch has run.

    bf16 on a CPU with AVX512_BF16: :mod:`ffnskip.kernels`' packed ``[out/16, in/2, 16, 2]`` copy
    for up to ``kernels.max_rows`` rows (8; 2 on a CPU with AMX), and for more rows oneDNN's pre-packed weight, built from
    it on first use (another copy, only once a larger batch ran: oneDNN is faster there). bf16/fp16
    on a CPU with the instructions where ffnskip's kernel is not used (:func:`onednn_low_precision`;
    fp16, ``FFNSKIP_BF16_KERNEL=onednn``, a failed kernel build): only oneDNN's pre-packed weight,
    for every row count (no panels are kept); bf16 without them on an AVX2 CPU: the AVX2 kernel's
    packed ``[out/16, in, 16]`` copy;
    otherwise (and on CUDA) the weight itself through ``F.linear`` (:func:`matmul_backend` says
    which). oneDNN's bf16 kernels (AVX512_BF16 ``vdpbf16ps``, AMX tiles) accumulate in fp32 and
    give the same bits as ``F.linear``, which transformers calls (tested); ffnskip's kernels round
    where F.linear rounds, with their own order of fp32 additions; ``bmm`` over bf16 panels runs
    ~2x slower on the AMD EPYC (Zen 4) here, and the LM head ~3x."""

    __slots__ = ("panels", "bias", "weight", "_kern", "_kop", "_rows", "_packable", "_packed", "_handle", "__weakref__")

    def __init__(self, panels: torch.Tensor | None, bias: torch.Tensor | None = None, packed=None, weight=None,
                 kern: torch.Tensor | None = None, kernel: str | None = None) -> None:
        self.panels = panels  # [p, in, out/p], or None when only a packed or the plain weight is kept
        self.bias = bias  # [out] or None, added after the matmul
        self.weight = weight  # [out, in] for F.linear (bf16/fp16 without oneDNN's kernels), else None
        self._kern = kern  # ffnskip.kernels' packed bf16 weight (kernel ``kernel``), else None
        self._kop = None if kernel is None else kernels.op(kernel)
        big = kernel == "avx512bf16" and onednn_low_precision(torch.bfloat16)  # more rows than the kernel takes: oneDNN
        self._rows = kernels.max_rows(kernel) if big else None  # up to this many rows per call: the kernel
        self._packable = _ONEDNN and panels is not None and panels.device.type == "cpu" and panels.dtype == torch.float32
        self._packed = packed  # oneDNN's packed [out, in] weight (opaque layout)
        self._handle = None  # ffnskip.compiled's handle, once a compiled layer used it

    @staticmethod
    def of(w: torch.Tensor, p: int, bias: torch.Tensor | None = None) -> "_Mat":
        """The fast path's copy of a linear weight ``w`` [out, in] for ``p`` panels: fp32 as panels;
        bf16 as ffnskip's kernels' packed weight on an AVX512_BF16 or AVX2 CPU, bf16/fp16 as oneDNN's
        packed weight on another CPU with the instructions, else the weight itself for ``F.linear``
        (transformers' kernel, so its rounding: bf16/fp16 accumulate differently per kernel, and
        panels lost greedy parity in fp16 in the tests). :func:`matmul_backend` chooses."""
        backend = matmul_backend(w.dtype, w.device)
        if backend == "panels":
            return _Mat(_panels(w, p), bias)
        if backend == "onednn":  # the bias goes into oneDNN's epilogue, as in F.linear
            return _Mat(None, bias, packed=torch.ops.mkldnn._reorder_linear_weight(w.contiguous()))
        if backend in ("avx512bf16", "avx2") and w.shape[0] % 16 == 0:  # the bias is added in fp32 before the one rounding
            return _Mat(None, None if bias is None else bias.contiguous(), kern=kernels.pack_for(backend, w), kernel=backend)
        if backend == "avx512bf16":  # not whole blocks of 16 columns: oneDNN's kernel
            return _Mat(None, bias, packed=torch.ops.mkldnn._reorder_linear_weight(w.contiguous()))
        return _Mat(None, bias, weight=w.contiguous())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [R, 1, in] -> [R, 1, out]."""
        if self.panels is None:  # bf16/fp16: x W^T + b in one call, F.linear's rounding
            if self.weight is not None:
                return F.linear(x, self.weight, self.bias)  # [R, 1, out]
            R, _, k = x.shape
            if self._kern is not None:
                if self._rows is None or R <= self._rows:
                    y = self._kop(x.reshape(R, k), self._kern, self.bias)  # [R, out]
                    return y.view(R, 1, y.shape[-1])
                if self._packed is None:  # a larger batch where oneDNN has bf16: its packed copy, once
                    n, pairs = self._kern.shape[0] * 16, self._kern.shape[1]
                    dense = self._kern.transpose(1, 2).reshape(n, 2 * pairs)[:, :k].contiguous()  # [out, in]
                    self._packed = torch.ops.mkldnn._reorder_linear_weight(dense)
            y = torch.ops.mkldnn._linear_pointwise(x.reshape(R, k), self._packed, self.bias, "none", [], "")  # [R, out]
            return y.view(R, 1, y.shape[-1])
        y = self._matmul(x)
        return y if self.bias is None else y + self.bias

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        R = x.shape[0]
        w = self.panels
        if R == 1 or not self._packable:
            return _matmul(x, w)
        p, k, n = w.shape
        if self._packed is None:
            dense = w.permute(1, 0, 2).reshape(k, p * n).t().contiguous()  # [out, in]
            self._packed = torch.ops.mkldnn._reorder_linear_weight(dense, 8)
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(R, k), self._packed, None, "none", [], "")  # [R, out]
        return y.view(R, 1, p * n)


@dataclass
class _Layer:
    """One layer's weights; matmul weights as column panels ``[p, in, out/p]`` (see ``_panels``)."""

    in_norm: torch.Tensor  # [D]
    post_norm: torch.Tensor  # [D]
    qkv: _Mat  # [p, D, (H + 2 H_kv) hd / p], bias [(H + 2 H_kv) hd] if any of q/k/v has one
    o: _Mat  # [p, H hd, D / p]
    gate_up: _Mat  # [p, D, 2 I / p]
    down: _Mat  # [p, I, D / p]
    qk_norm: torch.Tensor | None  # Qwen3: [H + H_kv, hd], q_norm's weight per q head, k_norm's per k head


def _bias(*linears: nn.Module) -> torch.Tensor | None:
    """The concatenated biases of linears whose outputs are concatenated ([sum out]), zeros for a
    linear without one; None when none has a bias."""
    if all(getattr(m, "bias", None) is None for m in linears):
        return None
    parts = [m.bias if m.bias is not None else m.weight.new_zeros(m.weight.shape[0]) for m in linears]
    return torch.cat(parts).contiguous()


def _layer_panels(layer: nn.Module, lay: FastLayout, ffn: nn.Module, p: int) -> tuple:
    """A layer's matmul weights (and biases) as panels, built once per model and panel count and
    kept on the layer (rebuilt if its weights are replaced, e.g. by a new checkpoint)."""
    a = get_path(layer, lay.attn)
    q, k, v, o = (get_path(a, n) for n in (lay.q, lay.k, lay.v, lay.o))
    gate, up, down = (get_path(ffn, n) for n in (lay.gate, lay.up, lay.down))
    kind = (p, q.weight.dtype, q.weight.device, matmul_backend(q.weight.dtype, q.weight.device))
    key = (kind, q.weight, o.weight, gate.weight, down.weight)  # .to() keeps the Parameters
    cached = getattr(layer, "_ffnskip_panels", None)
    if cached is None or cached[0][0] != key[0] or any(x is not y for x, y in zip(cached[0][1:], key[1:])):
        with torch.no_grad():
            qkv = _Mat.of(torch.cat([q.weight, k.weight, v.weight]), p, _bias(q, k, v))
            gate_up = _Mat.of(torch.cat([gate.weight, up.weight]), p, _bias(gate, up))
            o_mat = _Mat.of(o.weight, p, _bias(o))
            down_mat = _Mat.of(down.weight, p, _bias(down))
        cached = (key, qkv, o_mat, gate_up, down_mat)
        layer._ffnskip_panels = cached
    return cached[1:]


def _head_panels(model: nn.Module, lay: FastLayout, p: int) -> tuple[_Mat, torch.Tensor | None]:
    """The LM head as panels [p, D, V/p] (and its bias), cached on the model like the layers'."""
    head = get_path(model, lay.lm_head)
    cached = getattr(model, "_ffnskip_head", None)
    kind = (p, head.weight.dtype, head.weight.device, matmul_backend(head.weight.dtype, head.weight.device))
    if cached is None or cached[0] is not head.weight or cached[1] != kind:
        with torch.no_grad():
            cached = (head.weight, kind, _Mat.of(head.weight, p), getattr(head, "bias", None))
        model._ffnskip_head = cached
    return cached[2], cached[3]


class _KernelLinears(TorchFunctionMode):
    """While active, ``F.linear`` on a weight in ``views`` (id -> (weight, its packed rows)) runs
    ffnskip's bf16 kernel instead: the prompt pass of a bf16 model on an AVX2 or AVX512_BF16 CPU.
    Measured, SmolLM2-135M: on Zen 3 (AVX2), where ``F.linear`` in bf16 is slow, a 112-token prompt
    1.76 s -> 0.49 s, a 14-token one 0.24 s -> 0.13 s; on Zen 4 (AVX512_BF16) against oneDNN's
    ``F.linear``, 14 tokens 66 -> 38 ms, 112 tokens 138 -> 120 ms, on par at 256 and 1024 tokens.
    On a CPU with AMX-BF16 a prompt of more than :func:`kernels.max_rows` tokens per row is left to
    ``F.linear`` (oneDNN on AMX tiles, faster there from 3 rows, ``benchmarks/bf16_kernel.py``).
    Every other call passes through unchanged."""

    def __init__(self, views: dict, rows: int | None = None) -> None:
        super().__init__()
        self.views = views
        self.rows = rows  # at most this many rows through the kernel (None: any)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and len(args) >= 2:
            x, w = args[0], args[1]
            hit = self.views.get(id(w))
            if (hit is not None and hit[0] is w and x.dtype == torch.bfloat16 and x.device.type == "cpu"
                    and (self.rows is None or x.numel() // x.shape[-1] <= self.rows)):
                b = args[2] if len(args) > 2 else kwargs.get("bias")
                y = kernels.linear(x.reshape(-1, x.shape[-1]), hit[1], b)  # [rows, N]
                return y.view(*x.shape[:-1], y.shape[-1])
        return func(*args, **kwargs)


def _kernel_views(model: nn.Module) -> dict:
    """id(module weight) -> (weight, its rows of the fast path's packed kernel weights), for every
    q/k/v/o, gate/up/down and LM-head weight whose rows are whole blocks of 16: slices of the
    packed copies the decode steps read (no second copy). Built once per layout, kept on the model."""
    adapter = get_adapter(model)
    lay = adapter.fast
    param = next(model.parameters())
    p = panel_count(param.device)
    layers = adapter.layers(model)
    key = (p, matmul_backend(param.dtype, param.device), tuple(id(get_path(get_path(layer, lay.attn), lay.q).weight) for layer in layers))
    cached = getattr(model, "_ffnskip_kernel_views", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    views: dict = {}

    def add(mat: _Mat, weights: list[torch.Tensor]) -> None:
        if mat._kern is None:
            return
        start = 0
        for w in weights:
            n = w.shape[0]
            if n % 16 or start % 16:
                return
            views[id(w)] = (w, mat._kern[start // 16 : (start + n) // 16])  # contiguous: whole blocks
            start += n

    for layer in layers:
        ffn = adapter.ffn_module(layer)
        a = get_path(layer, lay.attn)
        q, k, v, o = (get_path(a, n) for n in (lay.q, lay.k, lay.v, lay.o))
        gate, up, down = (get_path(ffn, n) for n in (lay.gate, lay.up, lay.down))
        qkv, o_mat, gate_up, down_mat = _layer_panels(layer, lay, ffn, p)
        add(qkv, [q.weight, k.weight, v.weight])
        add(o_mat, [o.weight])
        add(gate_up, [gate.weight, up.weight])
        add(down_mat, [down.weight])
    head, _ = _head_panels(model, lay, p)
    add(head, [get_path(model, lay.lm_head).weight])
    model._ffnskip_kernel_views = (key, views)
    return views


def prefill_kernels(model: nn.Module):
    """A context for the prompt pass: ffnskip's bf16 kernel for the model's linears where
    :func:`matmul_backend` picks one (bf16 on an AVX2 or AVX512_BF16 CPU) and the family has a
    fast-path layout; elsewhere nothing changes. The numbers are the kernel's (F.linear's rounding
    points, its own order of fp32 additions), as in the decode steps."""
    import contextlib

    param = next(model.parameters(), None)
    if param is None or param.device.type != "cpu" or param.dtype != torch.bfloat16:
        return contextlib.nullcontext()
    try:
        adapter = get_adapter(model)
    except UnsupportedArchitecture:
        return contextlib.nullcontext()
    backend = matmul_backend(param.dtype, param.device)
    if adapter.fast is None or backend not in kernels.KERNELS:
        return contextlib.nullcontext()
    try:
        views = _kernel_views(model)
    except AttributeError:  # an unexpected layout: FastDecoder.supports says which
        return contextlib.nullcontext()
    amx = backend == "avx512bf16" and kernels.has_amx_bf16() and onednn_low_precision(param.dtype)
    rows = kernels.max_rows(backend) if amx else None
    return _KernelLinears(views, rows) if views else contextlib.nullcontext()


def prepare(model: nn.Module) -> str:
    """Do before the first request what the first decode step would do: build or load the kernel
    library :func:`matmul_backend` and :func:`small_ops` pick (a fresh machine compiles it, ~25 s; a server
    paid that inside its first request) and pack the fast path's weights, kept on the model.
    Returns the matmul backend; an impossible ``FFNSKIP_BF16_KERNEL`` is an error here, at load."""
    param = next(model.parameters(), None)
    if param is None:
        return "aten"
    backend = matmul_backend(param.dtype, param.device)
    if FastDecoder.supports(model, 1) is None:
        with torch.no_grad():
            FastDecoder(model, 1, 1, padded=False)  # packs every layer and the LM head onto the model
    return backend


class FastDecoder:
    """Decode steps of one generation (batch B, up to ``max_len`` positions)."""

    @staticmethod
    def supports(model: nn.Module, max_len: int) -> str | None:
        """None if the fast path applies, else the reason it does not."""
        cfg = model.config
        try:
            adapter = get_adapter(model)
        except UnsupportedArchitecture as exc:
            return str(exc)
        lay = adapter.fast
        if lay is None:
            return f"the {adapter.family} family has no fast-path layout"
        if getattr(cfg, "_attn_implementation", "sdpa") != "sdpa":
            return f"attention implementation {cfg._attn_implementation}"
        window = getattr(cfg, "sliding_window", None)
        if window is not None and getattr(cfg, "use_sliding_window", True) and window < max_len:
            return "a sliding window shorter than the sequence"
        if getattr(cfg, "hidden_act", "silu") != "silu":
            return f"activation {cfg.hidden_act}"
        if getattr(cfg, "pretraining_tp", 1) not in (None, 1):
            return f"pretraining_tp={cfg.pretraining_tp}"
        layer = adapter.layers(model)[0]
        try:
            a, ffn = get_path(layer, lay.attn), adapter.ffn_module(layer)
            for owner, names in ((a, (lay.q, lay.k, lay.v, lay.o)), (ffn, (lay.gate, lay.up, lay.down))):
                for name in names:
                    if not isinstance(get_path(owner, name), nn.Linear):
                        return f"an unexpected layer layout (no linear {name})"
            for name in (lay.embed, lay.rotary, lay.final_norm, lay.lm_head):
                get_path(model, name)
        except AttributeError as exc:
            return f"an unexpected layer layout ({exc})"
        return None

    def __init__(self, model: nn.Module, batch_size: int, max_len: int, padded: bool, compiled: bool | None = None) -> None:
        self.model = model
        self.padded = padded  # some row is left-padded: attention needs the mask
        if compiled is None:
            from .compiled import compiled_requested

            compiled = compiled_requested()
        self.compiled = compiled  # layers through ffnskip.compiled (opt-in: FFNSKIP_COMPILE=1)
        self._compiled = None  # (sizes, per-layer weight handles, graph per (ffn, masked)), on first use
        cfg = model.config
        adapter = get_adapter(model)
        self.lay = lay = adapter.fast
        layers = adapter.layers(model)
        attn0 = get_path(layers[0], lay.attn)
        self.head_dim = attn0.head_dim
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.n_rep = self.n_heads // self.n_kv
        self.scaling = attn0.scaling
        self.eps = cfg.rms_norm_eps
        self.embed = get_path(model, lay.embed)
        self.rotary = get_path(model, lay.rotary)
        self.final_norm = get_path(model, lay.final_norm)
        p = next(model.parameters())
        # the kernel library's fused RMSNorm, RoPE + cache writes, argmax, fp32 attention (kernels.DecodeOps:
        # transformers' rounding points, one call instead of several), where small_ops names one
        lib = small_ops(p.dtype, p.device)
        self.ops = kernels.decode_ops(lib) if lib is not None else None
        self.panels = panel_count(p.device)
        self.layers = [self._pack(adapter, layer) for layer in layers]
        self.head = _head_panels(model, lay, self.panels)  # ([p, D, V/p], bias)
        shape = (batch_size, self.n_kv, max_len, self.head_dim)
        self.k = [torch.zeros(shape, dtype=p.dtype, device=p.device) for _ in layers]  # per layer [B, Hkv, N, hd]
        self.v = [torch.zeros(shape, dtype=p.dtype, device=p.device) for _ in layers]
        self.length = 0  # filled columns of the cache (shared by every row)

    def _pack(self, adapter, layer: nn.Module) -> _Layer:
        lay = self.lay
        qkv, o, gate_up, down = _layer_panels(layer, lay, adapter.ffn_module(layer), self.panels)
        a = get_path(layer, lay.attn)
        qk_norm = None
        if hasattr(a, lay.q_norm):  # one [H + Hkv, hd] weight: q and k heads normalised in one pass
            qn, kn = get_path(a, lay.q_norm), get_path(a, lay.k_norm)
            qk_norm = torch.cat([qn.weight.expand(self.n_heads, -1), kn.weight.expand(self.n_kv, -1)])
        return _Layer(
            in_norm=get_path(layer, lay.attn_norm).weight,
            post_norm=adapter.ffn_norm_module(layer).weight,
            qkv=qkv,
            o=o,
            gate_up=gate_up,
            down=down,
            qk_norm=qk_norm,
        )

    @property
    def rows(self) -> int:
        return self.k[0].shape[0]

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2]

    def load_prefill(self, cache) -> None:
        """Copy the prompt's K/V from a transformers cache into the pre-allocated one."""
        for i, layer in enumerate(cache.layers):
            n = layer.keys.shape[-2]
            self.k[i][:, :, :n] = layer.keys
            self.v[i][:, :, :n] = layer.values
        self.length = cache.layers[0].keys.shape[-2]

    def reserve(self, columns: int) -> None:
        """Make room for ``columns`` cache columns (grown by at least half, copied once)."""
        if columns <= self.capacity:
            return
        cap = max(columns, self.capacity + self.capacity // 2)
        for kv in (self.k, self.v):
            for i, t in enumerate(kv):
                grown = t.new_zeros((t.shape[0], t.shape[1], cap, t.shape[3]))  # [B, Hkv, cap, hd]
                grown[:, :, : self.length] = t[:, :, : self.length]
                kv[i] = grown

    def join(self, cache, n: int, extra: int) -> int:
        """Rows prefilled on their own join the batch: ``cache`` holds their K/V ([R, Hkv, n, hd]
        per layer), right-aligned to the current column; ``extra`` columns are reserved for what
        the batch will still decode. Returns how many columns the existing rows moved right (a
        prompt longer than the batch so far), so that the caller shifts their mask alike."""
        shift = max(0, n - self.length)
        length = self.length + shift
        R = cache.layers[0].keys.shape[0]
        cap = max(self.capacity, length + extra)
        for kv, name in ((self.k, "keys"), (self.v, "values")):
            for i, t in enumerate(kv):
                out = t.new_zeros((t.shape[0] + R, t.shape[1], cap, t.shape[3]))  # [B + R, Hkv, cap, hd]
                out[: t.shape[0], :, shift:length] = t[:, :, : self.length]
                out[t.shape[0] :, :, length - n : length] = getattr(cache.layers[i], name)
                kv[i] = out
        self.length = length
        return shift

    def keep(self, rows: torch.Tensor, drop_columns: int = 0) -> None:
        """Keep only ``rows`` ([K] device indices) of the batch, and drop the first
        ``drop_columns`` columns (padding for every kept row)."""
        n = self.length - drop_columns
        for kv in (self.k, self.v):
            for i, t in enumerate(kv):
                kept = t.index_select(0, rows)  # [K, Hkv, cap, hd]
                if drop_columns:
                    moved = torch.zeros_like(kept)
                    moved[:, :, :n] = kept[:, :, drop_columns : self.length]
                    kept = moved
                kv[i] = kept
        self.length = n

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """RMSNorm over the last dim of x [A, G, D] (weight [D] or [G, D]): the kernel library's fused op
        where one is loaded (:func:`small_ops`), else :func:`_rms_norm`."""
        return self.ops.rms_norm(x, weight, self.eps) if self.ops is not None else _rms_norm(x, weight, self.eps)

    def _mlp(self, lw: _Layer, h: torch.Tensor) -> torch.Tensor:
        """FFN branch on h [R, 1, D] -> [R, 1, D]."""
        gu = lw.gate_up(self._norm(h, lw.post_norm))  # [R, 1, 2I]
        gate, up = gu.chunk(2, dim=-1)
        return lw.down(F.silu(gate) * up)  # [R, 1, D]

    @torch.inference_mode()
    def step(
        self,
        tokens: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        ctl: SkipController,
    ) -> torch.Tensor:
        """tokens [B, 1], position_ids [B, 1], attention_mask [B, N] (1 = real) -> logits [B, V].

        No host synchronisation of its own: the skip decisions and the device row indices come
        from the controller (:meth:`~ffnskip.engine.SkipController.row_split`, one asynchronous
        upload per plan); eager ``adaptive`` tests read their cosines through the controller
        (counted, see :mod:`ffnskip.engine`)."""
        B = tokens.shape[0]
        hd, H, Hkv = self.head_dim, self.n_heads, self.n_kv
        col = self.length
        self.length += 1
        x = self.embed(tokens)  # [B, 1, D]
        cos, sin = self.rotary(x, position_ids=position_ids)  # [B, 1, hd] each
        # q and k heads side by side: [B, H + Hkv, hd]; cos/sin broadcast over heads
        # Padding: a boolean mask [B, 1, 1, N] (broadcast over the packed query heads); none without.
        mask = attention_mask[:, None, None, : col + 1].bool() if self.padded else None  # [B, 1, 1, n]
        ops = self.ops
        if ops is not None:
            cos2, sin2 = cos.reshape(B, hd).contiguous(), sin.reshape(B, hd).contiguous()  # [B, hd] for ops.rope_cache
        # fp32: the library's single-query attention (measured +3-5% tok/s at batch 1 on the AMX Xeon);
        # bf16 keeps SDPA, whose bf16 roundings transformers' greedy tokens depend on (a tiny Qwen3's
        # tokens changed through ops.attend in the tests)
        attend = ops is not None and x.dtype == torch.float32
        amask = mask.reshape(B, col + 1).contiguous() if attend and mask is not None else None  # [B, n] for ops.attend
        whole = ctl.whole_layer
        compiled = self.compiled and not whole
        for i, lw in enumerate(self.layers):
            if compiled:
                split = ctl.row_split(i)  # host only: the plan the earlier layers' tests left
                if split.none or split.all:  # the whole batch runs (or skips) this FFN: one graph
                    h, x = self._compiled_layer(lw, x, cos, sin, i, col, mask, ffn=split.none)
                    if ctl.testing:
                        ctl.observe(i, h, x)
                    continue
            x_in = x
            hn = self._norm(x, lw.in_norm)  # [B, 1, D]
            qkv = lw.qkv(hn).view(B, H + 2 * Hkv, hd)  # [B, H + 2Hkv, hd]
            qk = qkv[:, : H + Hkv]  # [B, H + Hkv, hd]
            if lw.qk_norm is not None:  # Qwen3: per-head RMSNorm before RoPE
                qk = self._norm(qk, lw.qk_norm)
            if ops is not None:  # RoPE and both cache writes in one call (the same bits): q [B, H, hd]
                q = ops.rope_cache(qk, qkv[:, H + Hkv :], cos2, sin2, self.k[i], self.v[i], col, H)
            else:
                qk = (qk * cos) + (_rotate_half(qk) * sin)  # RoPE, q and k together
                self.k[i][:, :, col] = qk[:, H:]  # K/V written for every layer and token: [B, Hkv, hd]
                self.v[i][:, :, col] = qkv[:, H + Hkv :]
                q = qk[:, :H]  # [B, H, hd]
            if attend:  # over the cache's first col + 1 columns, in one call
                o = ops.attend(q, self.k[i], self.v[i], col + 1, amask, self.scaling).view(B, 1, H * hd)  # [B, 1, H hd]
            else:
                q = q.unsqueeze(2)  # [B, H, 1, hd]
                keys = self.k[i][:, :, : col + 1]  # [B, Hkv, n, hd]
                values = self.v[i][:, :, : col + 1]
                # the query heads packed per K/V head ([B, Hkv, n_rep, hd]: n_rep queries against one
                # K/V head), as transformers' SDPA integration does with a mask: the same result per
                # query as GQA, and in bf16 ~10x faster than SDPA's one-query-per-head GQA on CPU
                qp = q.reshape(B, Hkv, self.n_rep, hd) if self.n_rep > 1 else q
                o = F.scaled_dot_product_attention(qp, keys, values, attn_mask=mask, dropout_p=0.0, scale=self.scaling, is_causal=False)
                o = o.reshape(B, 1, H * hd)  # [B, 1, H hd] (one query: heads are already contiguous)
            h = x + lw.o(o)  # [B, 1, D] residual before the FFN
            split = ctl.row_split(i)
            if split.none:
                x = h + self._mlp(lw, h)  # [B, 1, D]
            elif split.all:
                x = h
            else:  # some rows skip: the others' FFN outputs added into a copy of h (skipped rows keep h)
                x = h.index_add(0, split.keep, self._mlp(lw, h.index_select(0, split.keep)))  # [B, 1, D]
            if whole:  # whole-layer baselines: the rows that skip it get the layer's input back
                x = skip_whole_layer(split, x_in, x)
            if ctl.testing:
                ctl.observe(i, h, x)
        x = self._norm(x, self.final_norm.weight) if ops is not None else self.final_norm(x)  # [B, 1, D]
        head, bias = self.head
        logits = head(x)[:, -1, :]  # [B, V]
        return logits if bias is None else logits + bias

    def _compiled_layer(self, lw: _Layer, x, cos, sin, i: int, col: int, mask, ffn: bool):
        """Layer ``i`` through :mod:`ffnskip.compiled` -> (h, x): the residual before / after the FFN."""
        from . import compiled as cm

        if self._compiled is None:  # once per decoder: the weights' handles and the static sizes
            sizes = ((self.n_heads + 2 * self.n_kv) * self.head_dim, x.shape[-1], 2 * self.model.config.intermediate_size)
            handles = [tuple(cm.handle(m) for m in (w.qkv, w.o, w.gate_up, w.down)) for w in self.layers]
            self._compiled = (sizes, handles, {})
        sizes, handles, fns = self._compiled
        key = (ffn, mask is not None)  # a joining row can make the batch padded mid-way
        fn = fns.get(key)
        if fn is None:
            fn = fns[key] = cm.layer_fn(x.dtype, self.n_heads, self.n_kv, self.head_dim, self.scaling, self.eps, ffn,
                                        mask is not None, lw.qk_norm is not None)
        return fn(x, lw.in_norm, lw.post_norm, lw.qk_norm, *handles[i], *sizes, cos, sin, self.k[i], self.v[i], col, mask)
