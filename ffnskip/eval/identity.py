"""Identities that key the dense cache: a model's weights and numerics, the decode code's version,
and the numerics settings of this process (threads, panels, CPU kernels)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import nn

__all__ = ["CACHE_FORMAT", "model_fingerprint"]

CACHE_FORMAT = 1

_DECODE_SOURCES = ("decode.py", "engine.py", "fastpath.py", "sync.py")
"""The decode path's source files, relative to the ``ffnskip`` package (one level up from here)."""


def model_fingerprint(model: nn.Module) -> str:
    """A cheap identity of a model's weights and numerics: config, dtype, device, and the shape,
    sum and first values of a few parameter tensors (first, middle, last)."""
    h = hashlib.sha256()
    cfg = model.config.to_dict()
    cfg.pop("_name_or_path", None)
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    params = [p for _, p in model.named_parameters()]
    if params:
        h.update(f"{params[0].dtype}|{params[0].device.type}|{len(params)}".encode())
        for i in sorted({0, len(params) // 2, len(params) - 1}):
            p = params[i].detach().reshape(-1)
            h.update(f"{tuple(params[i].shape)}|{float(p.float().sum()):.8e}".encode())
            h.update(p[:1024].float().cpu().numpy().tobytes())
    return h.hexdigest()[:32]


_CODE_VERSION: str | None = None


def _code_version() -> str:
    """Versions that change a dense decode: the decode path's source, torch and transformers."""
    global _CODE_VERSION
    if _CODE_VERSION is None:
        import transformers

        h = hashlib.sha256(f"{CACHE_FORMAT}|{torch.__version__}|{transformers.__version__}".encode())
        here = Path(__file__).resolve().parent.parent  # the ffnskip package, not ffnskip/eval
        for name in _DECODE_SOURCES:
            try:
                h.update((here / name).read_bytes())
            except OSError:
                pass
        _CODE_VERSION = h.hexdigest()[:16]
    return _CODE_VERSION


def _numerics(model) -> dict:
    """What besides the model and the code changes a dense decode's bits here (threads, panels,
    CPU kernels: :func:`ffnskip.fastpath.numerics_key`); part of every dense cache key, so that a
    decode cached under other settings is never compared with one made under these."""
    from ..fastpath import numerics_key

    param = next(model.parameters())
    return numerics_key(param.device, param.dtype)
