"""GPT-2: pre-LayerNorm, plain (non-gated) GELU MLP, learned positions.

    h = x + attn(ln_1(x))
    x = h + mlp(ln_2(h))
"""

from .base import Adapter


def _check(config) -> None:
    if getattr(config, "add_cross_attention", False):
        raise ValueError("GPT-2 with cross-attention is not supported")


ADAPTER = Adapter(
    family="gpt2",
    model_types=("gpt2",),
    layers_path="transformer.h",
    ffn_norm="ln_2",
    check=_check,
)
