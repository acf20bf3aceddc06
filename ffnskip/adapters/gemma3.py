"""Gemma 3 (text): "sandwich" norms around both attention and the FFN.

    h = x + post_attention_layernorm(self_attn(input_layernorm(x)))
    x = h + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(h)))

The residual before the FFN is the input of ``pre_feedforward_layernorm``. A skipped row's MLP
output is zero, and Gemma's RMSNorm maps zero to zero (``0 * rsqrt(eps) * (1 + w) = 0``), so the
row's residual passes through unchanged.
"""

from .base import Adapter

ADAPTER = Adapter(
    family="gemma3",
    model_types=("gemma3_text",),
    layers_path="model.layers",
    ffn_norm="pre_feedforward_layernorm",
    ffn_post_norm="post_feedforward_layernorm",
)
