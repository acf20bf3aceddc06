"""A compiled decode layer for :class:`~ffnskip.fastpath.FastDecoder` (opt-in, measured).

The eager fast path runs ~30 small ATen ops per layer between its four matmuls (two RMSNorms,
RoPE, the cache writes, the residual adds, SiLU), each a dispatch of a few microseconds on CPU.
Here ``torch.compile`` (Inductor) fuses one whole layer, attention and, when the layer runs it,
its FFN, into one graph per configuration. The skip decision stays outside the graph: which rows
skip layer ``i``'s FFN is known before the layer runs (the controller's plan,
:meth:`~ffnskip.engine.SkipController.row_split`), so the step picks the graph with or without
the FFN for that layer; the adaptive test (:meth:`~ffnskip.engine.SkipController.observe`) reads
the layer's ``h`` and ``x`` after it, eagerly. A layer whose batch is split (some rows skip, some
do not) and the whole-layer baselines run the eager layer.

The matmuls stay the fast path's own (:class:`~ffnskip.fastpath._Mat`: panels in fp32,
oneDNN's packed weights in bf16/fp16): Inductor lowers oneDNN's packed linear only for frozen
constant weights, so they enter the graph as one opaque custom op, ``ffnskip::fast_linear``,
that looks its weight up by a handle. One graph serves every layer of a model (the weights are
inputs), and every :class:`FastDecoder` of that configuration (compiled graphs are cached here,
per process). Sizes are dynamic (batch, cache length, capacity); Dynamo still specialises a
batch of 1 and of more rows, so a model compiles up to four graphs (batch 1 / B, FFN or not),
each a few seconds on 2 CPU cores, on first use.

Numbers: the same operations in the same order as the eager layer, but Inductor's fused kernels
round differently (its RMSNorm reduction order, fused multiply-adds), so logits agree with the
eager path's to bf16 rounding, not bit for bit; greedy tokens are tested against the eager path.
Whether it is faster depends on the CPU and the model: ``benchmarks/speed.py --compiled``
measures it beside the eager path; it is off unless asked for (``FFNSKIP_COMPILE=1`` or
``FastDecoder(..., compiled=True)``).
"""

from __future__ import annotations

import logging
import os
import weakref
from typing import Callable

import torch
import torch.nn.functional as F

from .fastpath import _rms_norm, _rotate_half  # the eager layer's own ops, so the same arithmetic

log = logging.getLogger(__name__)

__all__ = ["compiled_requested", "handle", "layer_fn"]

#: handle -> the fast path's matmul object; weak, so a dropped model frees its weights.
_MATS: "weakref.WeakValueDictionary[int, object]" = weakref.WeakValueDictionary()
_NEXT = [0]
#: (dtype, H, Hkv, hd, scale, eps, ffn, masked, qk_norm) -> compiled layer function
_FNS: dict[tuple, Callable] = {}


def compiled_requested() -> bool:
    """``FFNSKIP_COMPILE`` is set to 1/true/yes/on."""
    return os.environ.get("FFNSKIP_COMPILE", "").strip().lower() in ("1", "true", "yes", "on")


@torch.library.custom_op("ffnskip::fast_linear", mutates_args=())
def fast_linear(x: torch.Tensor, handle: torch.Tensor, out_features: int) -> torch.Tensor:
    """x [R, in] @ the registered weight -> [R, out_features] (its bias added)."""
    mat = _MATS[int(handle)]  # a 0-d CPU tensor: no device synchronisation
    return mat(x.unsqueeze(1)).squeeze(1)


@fast_linear.register_fake
def _(x: torch.Tensor, handle: torch.Tensor, out_features: int) -> torch.Tensor:
    return x.new_empty((x.shape[0], out_features))


def handle(mat) -> torch.Tensor:
    """A 0-d int64 handle for ``mat`` (kept on it, so registering twice returns the same one)."""
    h = getattr(mat, "_handle", None)
    if h is None:
        _NEXT[0] += 1
        _MATS[_NEXT[0]] = mat
        h = torch.tensor(_NEXT[0], dtype=torch.long)
        mat._handle = h
    return h


def _make(H: int, Hkv: int, hd: int, scale: float, eps: float, ffn: bool, masked: bool, qk_normed: bool):
    n_rep = H // Hkv

    def layer(x, in_norm, post_norm, qk_norm, h_qkv, h_o, h_gu, h_down, q_out: int, d_out: int, gu_out: int,
              cos, sin, kc, vc, col: int, mask):
        # x [B, 1, D]; cos/sin [B, 1, hd]; kc/vc [B, Hkv, cap, hd]; mask [B, 1, 1, col + 1] or None
        B = x.shape[0]
        hn = _rms_norm(x, in_norm, eps)  # [B, 1, D]
        qkv = fast_linear(hn.reshape(B, -1), h_qkv, q_out).view(B, H + 2 * Hkv, hd)  # [B, H + 2Hkv, hd]
        qk = qkv[:, : H + Hkv]
        if qk_normed:
            qk = _rms_norm(qk, qk_norm, eps)
        qk = (qk * cos) + (_rotate_half(qk) * sin)  # RoPE, q and k heads together
        at = torch.full((1,), col, dtype=torch.long, device=x.device)
        kc.index_copy_(2, at, qk[:, H:].unsqueeze(2))  # [B, Hkv, 1, hd] written at column col
        vc.index_copy_(2, at, qkv[:, H + Hkv :].unsqueeze(2))
        q = qk[:, :H].reshape(B, Hkv, n_rep, hd)  # query heads packed per K/V head
        o = F.scaled_dot_product_attention(q, kc[:, :, : col + 1], vc[:, :, : col + 1],
                                           attn_mask=mask if masked else None, dropout_p=0.0, scale=scale)
        h = x + fast_linear(o.reshape(B, H * hd), h_o, d_out).view(B, 1, d_out)  # [B, 1, D]
        if not ffn:
            return h, h
        gu = fast_linear(_rms_norm(h, post_norm, eps).reshape(B, -1), h_gu, gu_out)  # [B, 2I]
        gate, up = gu.chunk(2, dim=-1)
        return h, h + fast_linear(F.silu(gate) * up, h_down, d_out).view(B, 1, d_out)

    return layer


def layer_fn(dtype: torch.dtype, H: int, Hkv: int, hd: int, scale: float, eps: float, ffn: bool, masked: bool,
             qk_normed: bool) -> Callable:
    """The compiled layer for one configuration (built once per process)."""
    key = (dtype, H, Hkv, hd, float(scale), float(eps), ffn, masked, qk_normed)
    fn = _FNS.get(key)
    if fn is None:
        log.info("compiling the decode layer (%s, ffn=%s, masked=%s): seconds on first use", dtype, ffn, masked)
        fn = torch.compile(_make(H, Hkv, hd, scale, eps, ffn, masked, qk_normed), dynamic=True,
                           options={"emulate_precision_casts": True})  # bf16: round where eager rounds
        _FNS[key] = fn
    return fn
