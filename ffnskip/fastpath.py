"""A lean decode step for the LLaMA-layout families (LLaMA/SmolLM2, Mistral, Qwen2, Qwen3).

The model's own forward pass spends most of a small model's decode step in Python: per-layer
keyword plumbing, cache bookkeeping, mask construction, output objects. For one token per row
this path does the same arithmetic with the model's own weights, in the same order and with the
same kernels, so its greedy output is token-identical to transformers (tested):

* the prompt (prefill) still runs through the model's own forward; its K/V are then copied into a
  pre-allocated cache [B, H_kv, max_len, head_dim] per layer, written in place afterwards;
* q/k/v and gate/up projections are each one matmul over concatenated weights (rows of a GEMV
  are independent dot products, so the split outputs are the same numbers);
* RoPE comes from the model's own rotary module, once per step for all layers;
* the skip decisions are the shared :class:`~ffnskip.engine.SkipController`'s.

Families or settings it does not cover (Gemma 3, GPT-2, sliding windows that bind, a non-SDPA
attention implementation) use the model's own forward instead (``FastDecoder.supports``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .adapters import get_adapter
from .engine import SkipController

log = logging.getLogger(__name__)

FAST_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LLaMA RMSNorm, the same operations as ``LlamaRMSNorm.forward``."""
    dtype = x.dtype
    x = x.to(torch.float32)
    variance = x.pow(2).mean(-1, keepdim=True)
    x = x * torch.rsqrt(variance + eps)
    return weight * x.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


@dataclass
class _Layer:
    in_norm: torch.Tensor
    post_norm: torch.Tensor
    qkv: torch.Tensor  # [(H + 2 H_kv) * hd, D]
    qkv_bias: torch.Tensor | None
    o: torch.Tensor  # [D, H * hd]
    gate_up: torch.Tensor  # [2 I, D]
    down: torch.Tensor  # [D, I]
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None


class FastDecoder:
    """Decode steps of one generation (batch B, up to ``max_len`` positions)."""

    @staticmethod
    def supports(model: nn.Module, max_len: int) -> str | None:
        """None if the fast path applies, else the reason it does not."""
        cfg = model.config
        if cfg.model_type not in FAST_MODEL_TYPES:
            return f"model type {cfg.model_type}"
        if getattr(cfg, "_attn_implementation", "sdpa") != "sdpa":
            return f"attention implementation {cfg._attn_implementation}"
        window = getattr(cfg, "sliding_window", None)
        if window is not None and getattr(cfg, "use_sliding_window", True) and window < max_len:
            return "a sliding window shorter than the sequence"
        if getattr(cfg, "hidden_act", "silu") != "silu":
            return f"activation {cfg.hidden_act}"
        layer = get_adapter(model).layers(model)[0]
        if getattr(layer.mlp, "gate_proj", None) is None or getattr(layer.self_attn, "o_proj", None) is None:
            return "an unexpected layer layout"
        return None

    def __init__(self, model: nn.Module, batch_size: int, max_len: int, padded: bool) -> None:
        self.model = model
        self.padded = padded  # some prompt is left-padded: attention needs a mask
        cfg = model.config
        layers = get_adapter(model).layers(model)
        attn0 = layers[0].self_attn
        self.head_dim = attn0.head_dim
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.n_rep = self.n_heads // self.n_kv
        self.scaling = attn0.scaling
        self.eps = cfg.rms_norm_eps
        self.layers = [self._pack(layer) for layer in layers]
        p = next(model.parameters())
        shape = (batch_size, self.n_kv, max_len, self.head_dim)
        self.k = [torch.zeros(shape, dtype=p.dtype, device=p.device) for _ in layers]  # per layer [B, Hkv, N, hd]
        self.v = [torch.zeros(shape, dtype=p.dtype, device=p.device) for _ in layers]
        self.length = 0  # filled columns of the cache

    @staticmethod
    def _fused(model: nn.Module, layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Concatenated q/k/v and gate/up weights, built once per model and kept on it."""
        cached = getattr(layer, "_ffnskip_fused", None)
        a, m = layer.self_attn, layer.mlp
        if cached is None or cached[0] is not a.q_proj.weight:
            qkv = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]).contiguous()
            bias = None
            if a.q_proj.bias is not None:
                bias = torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]).contiguous()
            gate_up = torch.cat([m.gate_proj.weight, m.up_proj.weight]).contiguous()
            cached = (a.q_proj.weight, qkv, gate_up, bias)
            layer._ffnskip_fused = cached
        return cached[1], cached[2], cached[3]

    def _pack(self, layer: nn.Module) -> _Layer:
        qkv, gate_up, bias = self._fused(self.model, layer)
        a = layer.self_attn
        return _Layer(
            in_norm=layer.input_layernorm.weight,
            post_norm=layer.post_attention_layernorm.weight,
            qkv=qkv,
            qkv_bias=bias,
            o=a.o_proj.weight,
            gate_up=gate_up,
            down=layer.mlp.down_proj.weight,
            q_norm=a.q_norm.weight if hasattr(a, "q_norm") else None,
            k_norm=a.k_norm.weight if hasattr(a, "k_norm") else None,
        )

    def load_prefill(self, cache) -> None:
        """Copy the prompt's K/V from a transformers cache into the pre-allocated one."""
        for i, layer in enumerate(cache.layers):
            n = layer.keys.shape[-2]
            self.k[i][:, :, :n] = layer.keys
            self.v[i][:, :, :n] = layer.values
        self.length = cache.layers[0].keys.shape[-2]

    def _mlp(self, lw: _Layer, h: torch.Tensor) -> torch.Tensor:
        """FFN branch on h [R, 1, D] -> [R, 1, D]."""
        gu = F.linear(_rms_norm(h, lw.post_norm, self.eps), lw.gate_up)  # [R, 1, 2I]
        gate, up = gu.chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, lw.down)

    @torch.inference_mode()
    def step(
        self,
        tokens: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        ctl: SkipController,
    ) -> torch.Tensor:
        """tokens [B, 1], position_ids [B, 1], attention_mask [B, N] (1 = real) -> logits [B, V]."""
        model = self.model
        B = tokens.shape[0]
        hd, H, Hkv = self.head_dim, self.n_heads, self.n_kv
        col = self.length
        self.length += 1
        x = model.model.embed_tokens(tokens)  # [B, 1, D]
        cos, sin = model.model.rotary_emb(x, position_ids=position_ids)  # [B, 1, hd] each
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [B, 1, 1, hd]
        # No padding: no mask, GQA inside SDPA. Padding: a boolean mask [B, 1, 1, N] and the
        # query heads packed per K/V head, as transformers' SDPA integration does.
        mask = attention_mask[:, None, None, : col + 1].bool() if self.padded else None  # [B, 1, 1, n]
        whole = ctl._whole
        for i, lw in enumerate(self.layers):
            x_in = x
            hn = _rms_norm(x, lw.in_norm, self.eps)  # [B, 1, D]
            qkv = F.linear(hn, lw.qkv, lw.qkv_bias)  # [B, 1, (H + 2Hkv) hd]
            q, k, v = qkv.split((H * hd, Hkv * hd, Hkv * hd), dim=-1)
            q = q.view(B, 1, H, hd)
            k = k.view(B, 1, Hkv, hd)
            if lw.q_norm is not None:  # Qwen3: per-head RMSNorm before RoPE
                q = _rms_norm(q, lw.q_norm, self.eps)
                k = _rms_norm(k, lw.k_norm, self.eps)
            q = q.transpose(1, 2)  # [B, H, 1, hd]
            k = k.transpose(1, 2)  # [B, Hkv, 1, hd]
            v = v.view(B, 1, Hkv, hd).transpose(1, 2)  # [B, Hkv, 1, hd]
            q = (q * cos) + (_rotate_half(q) * sin)
            k = (k * cos) + (_rotate_half(k) * sin)
            self.k[i][:, :, col : col + 1] = k  # K/V written for every layer and token
            self.v[i][:, :, col : col + 1] = v
            keys = self.k[i][:, :, : col + 1]  # [B, Hkv, n, hd]
            values = self.v[i][:, :, : col + 1]
            if mask is None:
                o = F.scaled_dot_product_attention(q, keys, values, attn_mask=None, dropout_p=0.0, scale=self.scaling, is_causal=False, enable_gqa=self.n_rep > 1)
            else:
                qp = q.reshape(B, Hkv, self.n_rep, hd) if self.n_rep > 1 else q
                o = F.scaled_dot_product_attention(qp, keys, values, attn_mask=mask, dropout_p=0.0, scale=self.scaling, is_causal=False)
                o = o.reshape(B, -1, 1, hd)
            o = o.transpose(1, 2).reshape(B, 1, H * hd)  # [B, 1, H hd]
            h = x + F.linear(o, lw.o)  # [B, 1, D] residual before the FFN
            skipping = ctl.rows_skipping(i)
            if not skipping:
                x = h + self._mlp(lw, h)
            elif len(skipping) == B:
                x = h
            else:
                keep = torch.tensor([r for r in range(B) if r not in skipping], device=h.device)
                x = h.clone()
                x[keep] = h.index_select(0, keep) + self._mlp(lw, h.index_select(0, keep))  # [K, 1, D]
            if whole and skipping:
                idx = torch.tensor(skipping, device=x.device)
                x = x.clone()
                x[idx] = x_in.index_select(0, idx)  # whole-layer baselines: the layer is skipped
            if ctl.testing:
                ctl.observe(i, h, x)
        x = model.model.norm(x)
        return model.lm_head(x)[:, -1, :]  # [B, V]
