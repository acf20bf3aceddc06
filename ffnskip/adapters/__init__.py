"""Architecture adapters: one small module per model family (see ``base.Adapter``)."""

from __future__ import annotations

from torch import nn

from ..errors import FFNSkipError
from . import gemma3, gpt2, llama, mistral, qwen
from .base import LLAMA_LAYOUT, Adapter, FastLayout

ADAPTERS: tuple[Adapter, ...] = (llama.ADAPTER, mistral.ADAPTER, qwen.ADAPTER, gemma3.ADAPTER, gpt2.ADAPTER)
_BY_TYPE = {t: a for a in ADAPTERS for t in a.model_types}
SUPPORTED_MODEL_TYPES = tuple(sorted(_BY_TYPE))


class UnsupportedArchitecture(FFNSkipError, ValueError):
    pass


def get_adapter(model_or_config) -> Adapter:
    """The adapter for a model (or its config); raises listing the supported architectures."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    adapter = _BY_TYPE.get(model_type)
    if adapter is None:
        raise UnsupportedArchitecture(
            f"unsupported architecture '{model_type}'; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    if adapter.check is not None:
        try:
            adapter.check(config)
        except ValueError as exc:
            raise UnsupportedArchitecture(f"{adapter.family}: {exc}") from None
    if isinstance(model_or_config, nn.Module):
        adapter.layers(model_or_config)  # fails loudly if the layout moved
    return adapter


__all__ = ["Adapter", "FastLayout", "LLAMA_LAYOUT", "ADAPTERS", "SUPPORTED_MODEL_TYPES", "UnsupportedArchitecture", "get_adapter"]
