"""Mistral: the LLaMA layout (sliding-window attention is the model's own business).

    h = x + self_attn(input_layernorm(x))
    x = h + mlp(post_attention_layernorm(h))
"""

from .base import LLAMA_LAYOUT, Adapter

ADAPTER = Adapter(
    family="mistral",
    model_types=("mistral",),
    layers_path="model.layers",
    ffn_norm="post_attention_layernorm",
    fast=LLAMA_LAYOUT,
)
