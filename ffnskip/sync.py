"""Host <-> device traffic of the decode hot path, in one place.

* :func:`to_host` is the only way the hot path reads device data. Each call is one host-device
  synchronisation; its callers count it in :class:`~ffnskip.engine.SeqStats` ``host_syncs``.
  Under ``torch.cuda.set_sync_debug_mode("error")`` (the CUDA test of this contract) it lifts
  the mode for the read itself, so that any *other* synchronisation in a decode step raises.
* :func:`upload` is the only way it sends host data (the skip plan's row indices) to the device:
  from pinned memory with ``non_blocking=True`` on CUDA, so the host does not wait for it.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch


def to_host(t: torch.Tensor) -> Any:
    """``t.tolist()``: one host-device synchronisation on an accelerator (the caller counts it)."""
    if t.device.type != "cuda":
        return t.tolist()
    mode = torch.cuda.get_sync_debug_mode()
    if mode:
        torch.cuda.set_sync_debug_mode(0)
    try:
        return t.tolist()  # HOST SYNC (counted by the caller)
    finally:
        if mode:
            torch.cuda.set_sync_debug_mode(mode)


def upload(values: Sequence[int], device: torch.device) -> torch.Tensor:
    """A host list of ints as an int64 tensor [N] on ``device``, without a synchronisation.

    On CUDA the host copy is pinned and the copy is asynchronous (the caching host allocator
    keeps the pinned block alive until the copy has run)."""
    t = torch.tensor(values, dtype=torch.long)  # [N] on the host
    if device.type == "cpu":
        return t
    if device.type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)
