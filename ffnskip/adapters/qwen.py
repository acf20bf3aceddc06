"""Qwen2 and Qwen3 (dense): LLaMA layout; Qwen3 adds q/k norms inside attention only.

    h = x + self_attn(input_layernorm(x))
    x = h + mlp(post_attention_layernorm(h))
"""

from .base import LLAMA_LAYOUT, Adapter

ADAPTER = Adapter(
    family="qwen",
    model_types=("qwen2", "qwen3"),
    layers_path="model.layers",
    ffn_norm="post_attention_layernorm",
    fast=LLAMA_LAYOUT,
)
