"""Residual-stream saturation profile (the paper's Fig. 2), run densely over real text.

For every layer it measures ``cos(h, x)``: the residual right before the FFN against the residual
right after it, per token, and the ShortGPT block influence ``1 - cos(layer input, layer
output)``. From the profile it suggests a skip-eligible band and a threshold.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .adapters import get_adapter

log = logging.getLogger(__name__)


@dataclass
class LayerProfile:
    layer: int
    mean_cos: float
    p10_cos: float
    block_influence: float


@dataclass
class SaturationProfile:
    model: str
    tokens: int
    layers: list[LayerProfile]
    suggested_layer_start: int
    suggested_layer_end: int
    suggested_threshold: float

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "tokens": self.tokens,
            "layers": [asdict(lp) for lp in self.layers],
            "suggested": {
                "layer_start": self.suggested_layer_start,
                "layer_end": self.suggested_layer_end,
                "threshold": self.suggested_threshold,
            },
        }


@torch.inference_mode()
def layer_cosines(model: nn.Module, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One dense pass over input_ids [1, N].

    Returns ``ffn_cos`` [L, N] = cos(residual before FFN, after it) and ``block_cos`` [L, N] =
    cos(layer input, layer output), per layer and token.
    """
    adapter = get_adapter(model)
    layers = adapter.layers(model)
    ffn_cos: list[torch.Tensor] = [None] * len(layers)  # type: ignore[list-item]
    block_cos: list[torch.Tensor] = [None] * len(layers)  # type: ignore[list-item]
    captured: dict[int, torch.Tensor] = {}
    handles = []

    def pre_norm(i):
        def hook(module, args):
            captured[i] = args[0]  # [1, N, D] residual before the FFN

        return hook

    def layer_hook(i):
        def hook(module, args, kwargs, output):
            x = output[0] if isinstance(output, tuple) else output  # [1, N, D]
            x_in = args[0] if args else kwargs["hidden_states"]  # [1, N, D]
            ffn_cos[i] = F.cosine_similarity(captured.pop(i)[0].float(), x[0].float(), dim=-1)  # [N]
            block_cos[i] = F.cosine_similarity(x_in[0].float(), x[0].float(), dim=-1)  # [N]

        return hook

    try:
        for i, layer in enumerate(layers):
            handles.append(adapter.ffn_norm_module(layer).register_forward_pre_hook(pre_norm(i)))
            handles.append(layer.register_forward_hook(layer_hook(i), with_kwargs=True))
        device = next(model.parameters()).device
        model(input_ids=input_ids.to(device), use_cache=False, logits_to_keep=1)
    finally:
        for h in handles:
            h.remove()
    return torch.stack(ffn_cos), torch.stack(block_cos)


def profile(model: nn.Module, tokenizer, text: str, tokens: int = 512, model_name: str = "") -> SaturationProfile:
    if tokens <= 0:
        raise ValueError(f"--tokens must be positive; got {tokens}")
    ids = tokenizer(text, return_tensors="pt")["input_ids"][:, :tokens]  # [1, N]
    if ids.shape[1] < 2:
        raise ValueError("the profiling text is too short (fewer than 2 tokens)")
    ffn_cos, block_cos = layer_cosines(model, ids)  # [L, N] each
    L = ffn_cos.shape[0]
    mean = ffn_cos.mean(dim=1)  # [L]
    p10 = torch.quantile(ffn_cos, 0.10, dim=1)  # [L]
    influence = 1 - block_cos.mean(dim=1)  # [L]
    layers = [
        LayerProfile(i, round(mean[i].item(), 6), round(p10[i].item(), 6), round(influence[i].item(), 6))
        for i in range(L)
    ]
    start, end, tau = suggest(mean.tolist(), p10.tolist())
    return SaturationProfile(model_name, int(ids.shape[1]), layers, start, end, tau)


def suggest(mean: list[float], p10: list[float]) -> tuple[int, int, float]:
    """A skip-eligible band and a threshold from a profile.

    Band: the layers whose mean cosine is at least the median of all layers' means ("saturated"),
    from the first such layer (never layer 0) to one past the last such layer, keeping at least
    one dense layer at each end. Threshold: the median of the 10th percentiles of the layers
    whose test can start a run (``start-1 .. end-2``), so that a run usually starts early in the
    band but not on every token.
    """
    L = len(mean)
    if L < 3:
        return 0, L, 0.95
    median = sorted(mean)[L // 2]
    hot = [i for i, m in enumerate(mean) if m >= median and 1 <= i <= L - 2]
    if not hot:
        return 1, L - 1, 0.95
    start, end = hot[0], hot[-1] + 1
    tests = sorted(p10[max(0, start - 1) : max(start, end - 1)])
    tau = tests[len(tests) // 2] if tests else 0.95
    return start, end, round(float(tau), 4)


def plot(prof: SaturationProfile, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [lp.layer for lp in prof.layers]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(xs, [lp.mean_cos for lp in prof.layers], marker="o", label="mean cos(h, h + FFN)")
    ax.plot(xs, [lp.p10_cos for lp in prof.layers], marker=".", linestyle="--", label="10th percentile")
    ax.axvspan(prof.suggested_layer_start - 0.5, prof.suggested_layer_end - 0.5, alpha=0.12, label="suggested band")
    ax.axhline(prof.suggested_threshold, color="grey", linewidth=0.8, label=f"suggested tau={prof.suggested_threshold}")
    ax.set_xlabel("layer")
    ax.set_ylabel("cosine similarity")
    ax.set_title(f"Residual saturation: {prof.model} ({prof.tokens} tokens)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
