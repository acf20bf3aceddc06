"""A GGUF file's architecture, read from its header without reading any tensor (so that a model
name resolves, and an unsupported family is refused, before anything is converted)."""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import BinaryIO

__all__ = ["gguf_architecture"]

_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_GGUF_ARCH_TO_MODEL_TYPE = {
    "gemma3": "gemma3_text",
    "gemma4": "gemma4_text",
    "qwen2moe": "qwen2_moe",
    "qwen3moe": "qwen3_moe",
    "command-r": "cohere",
    "gpt-oss": "gpt_oss",
    "minimax-m2": "minimax_m2",
}


def _gguf_read(f: BinaryIO, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise ValueError("truncated GGUF header")
    return data


def _gguf_string(f: BinaryIO) -> str:
    (n,) = struct.unpack("<Q", _gguf_read(f, 8))
    return _gguf_read(f, n).decode("utf-8", "replace")


def _gguf_skip_value(f: BinaryIO, vtype: int) -> None:
    if vtype in _GGUF_SCALARS:
        _gguf_read(f, struct.calcsize(_GGUF_SCALARS[vtype]))
    elif vtype == 8:
        _gguf_string(f)
    elif vtype == 9:
        itype, count = struct.unpack("<IQ", _gguf_read(f, 12))
        if itype in _GGUF_SCALARS:
            f.seek(count * struct.calcsize(_GGUF_SCALARS[itype]), os.SEEK_CUR)
        else:
            for _ in range(count):
                _gguf_skip_value(f, itype)
    else:
        raise ValueError(f"unknown GGUF value type {vtype}")


def gguf_architecture(path: Path) -> str:
    """``general.architecture`` from a GGUF header, as a transformers ``model_type``."""
    with open(path, "rb") as f:
        if _gguf_read(f, 4) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file")
        _version, _tensors, kv_count = struct.unpack("<IQQ", _gguf_read(f, 20))
        for _ in range(kv_count):
            key = _gguf_string(f)
            (vtype,) = struct.unpack("<I", _gguf_read(f, 4))
            if key == "general.architecture" and vtype == 8:
                arch = _gguf_string(f)
                return _GGUF_ARCH_TO_MODEL_TYPE.get(arch, arch)
            _gguf_skip_value(f, vtype)
    raise ValueError(f"{path} has no general.architecture")

