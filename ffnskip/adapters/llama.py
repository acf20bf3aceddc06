"""LLaMA family (LLaMA 1-3, SmolLM2): pre-norm, gated SiLU MLP.

    h = x + self_attn(input_layernorm(x))
    x = h + mlp(post_attention_layernorm(h))
"""

from .base import LLAMA_LAYOUT, Adapter

ADAPTER = Adapter(
    family="llama",
    model_types=("llama",),
    layers_path="model.layers",
    ffn_norm="post_attention_layernorm",
    fast=LLAMA_LAYOUT,
)
