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

import torch
from torch import nn


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

    def layers(self, model: nn.Module) -> nn.ModuleList:
        obj = model
        for part in self.layers_path.split("."):
            obj = getattr(obj, part)
        return obj

    def ffn_module(self, layer: nn.Module) -> nn.Module:
        return getattr(layer, self.ffn)

    def ffn_norm_module(self, layer: nn.Module) -> nn.Module:
        return getattr(layer, self.ffn_norm)

    def ffn_weight_count(self, layer: nn.Module) -> int:
        """Matmul weights of one layer's FFN (biases and norms excluded)."""
        return sum(p.numel() for n, p in self.ffn_module(layer).named_parameters() if p.dim() == 2)
