"""What the engine needs to know about a model family: where things are, nothing more.

An adapter never re-implements a layer. The engine drives the model's own forward pass and
intervenes at three points of every decoder layer, which the adapter names:

* ``ffn_norm``: the module whose *input* is the residual stream right before the FFN branch
  (``h = x + Attn(norm1(x))``); a forward pre-hook reads ``h`` there;
* ``ffn``: the FFN (MLP) module; the engine runs it only on the rows that do not skip it and
  returns zeros for the others, so the residual add leaves ``h`` unchanged;
* the decoder layer's output ``x = h + FFN-branch(h)``, read by a forward hook.

For that zero trick to be exact, everything between the FFN's output and the residual add must
map zero to zero (true for a plain add, and for an RMSNorm as Gemma 3 applies after its FFN).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from torch import nn


def get_path(obj, dotted: str):
    """``obj.a.b.c`` for ``dotted = "a.b.c"``."""
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


@dataclass(frozen=True)
class FastLayout:
    """Where the lean decode step (:mod:`ffnskip.fastpath`) finds a LLaMA-layout model's parts:
    a pre-norm decoder, RoPE attention with q/k/v/o linears (optionally per-head q/k RMSNorms,
    Qwen3), a gated SiLU MLP. Names are dotted paths from the CausalLM model (``embed``,
    ``rotary``, ``final_norm``, ``lm_head``), from a decoder layer (``attn_norm``, ``attn``) or from
    the attention / FFN module (the projections). The FFN and its norm are the adapter's own."""

    embed: str = "model.embed_tokens"
    rotary: str = "model.rotary_emb"
    """The model's rotary module, called as ``rotary(x, position_ids=...)`` -> ``(cos, sin)``."""
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    attn_norm: str = "input_layernorm"
    attn: str = "self_attn"
    q: str = "q_proj"
    k: str = "k_proj"
    v: str = "v_proj"
    o: str = "o_proj"
    q_norm: str = "q_norm"
    """Per-head RMSNorm of q before RoPE, used where the attention module has it (Qwen3)."""
    k_norm: str = "k_norm"
    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"


#: The layout shared by LLaMA, SmolLM2, Mistral, Qwen2 and Qwen3 in transformers.
LLAMA_LAYOUT = FastLayout()


@dataclass(frozen=True)
class Adapter:
    family: str
    """Human-readable family name (shown in errors and reports)."""
    model_types: tuple[str, ...]
    """``config.model_type`` values this adapter handles."""
    layers_path: str
    """Dotted path from the CausalLM model to the ``ModuleList`` of decoder layers."""
    ffn_norm: str
    """Attribute of a decoder layer: the norm whose input is the residual before the FFN."""
    ffn: str = "mlp"
    """Attribute of a decoder layer: the FFN module."""
    ffn_post_norm: str | None = None
    """Attribute of a decoder layer: a norm applied to the FFN output before the add (Gemma 3)."""
    check: Callable[[object], None] | None = field(default=None, compare=False)
    """Optional config check: raises ``ValueError`` for variants the adapter cannot drive."""
    fast: FastLayout | None = None
    """The family's layout for the lean decode step, or None: decode on the model's own forward."""

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return get_path(model, self.layers_path)

    def ffn_module(self, layer: nn.Module) -> nn.Module:
        return getattr(layer, self.ffn)

    def ffn_norm_module(self, layer: nn.Module) -> nn.Module:
        return getattr(layer, self.ffn_norm)

    def ffn_weight_count(self, layer: nn.Module) -> int:
        """Matmul weights of one layer's FFN (biases and norms excluded)."""
        return sum(p.numel() for n, p in self.ffn_module(layer).named_parameters() if p.dim() == 2)
