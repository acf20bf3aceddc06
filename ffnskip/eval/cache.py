"""The dense cache: dense decodes keyed by model fingerprint, prompt token ids and decode
settings, in memory and optionally on disk, so a tuning run decodes each sample densely once."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

from .identity import _code_version

log = logging.getLogger(__name__)

__all__ = ["DenseCache", "ENV_DENSE_CACHE", "default_dense_cache", "default_dense_cache_dir"]

ENV_DENSE_CACHE = "FFNSKIP_DENSE_CACHE"
"""``off`` / ``memory`` keeps the default dense cache in memory only; a path puts it there."""


def default_dense_cache_dir() -> Path | None:
    env = os.environ.get(ENV_DENSE_CACHE, "").strip()
    if env.lower() in ("off", "0", "memory", "none", "false"):
        return None
    if env:
        return Path(env).expanduser()
    base = os.environ.get("FFNSKIP_CACHE_DIR")
    root = Path(base).expanduser() if base else Path.home() / ".cache" / "ffnskip"
    return root / "dense"


class DenseCache:
    """Dense decodes, keyed by model fingerprint, prompt token ids and decode settings.

    An LRU in memory (``max_entries``) in front of an optional directory of small JSON files
    (``disk_dir``), shared by every process that points at it; writes are atomic. Safe to share
    between threads.
    """

    def __init__(self, disk_dir: str | os.PathLike | None = None, max_entries: int = 20000):
        self.disk_dir = Path(disk_dir).expanduser() if disk_dir else None
        self.max_entries = max_entries
        self._lock = threading.Lock()
        self._mem: OrderedDict[str, dict] = OrderedDict()
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(*parts: Any) -> str:
        blob = json.dumps([_code_version(), *parts], sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(blob.encode()).hexdigest()

    def _path(self, key: str) -> Path | None:
        return self.disk_dir / key[:2] / f"{key}.json" if self.disk_dir else None

    def get(self, key: str) -> dict | None:
        with self._lock:
            if key in self._mem:
                self._mem.move_to_end(key)
                self.hits += 1
                return self._mem[key]
        path = self._path(key)
        if path is not None and path.is_file():
            try:
                value = json.loads(path.read_text())
            except (OSError, ValueError):
                value = None
            if isinstance(value, dict):
                self._remember(key, value)
                with self._lock:
                    self.hits += 1
                return value
        with self._lock:
            self.misses += 1
        return None

    def put(self, key: str, value: dict) -> None:
        self._remember(key, value)
        path = self._path(key)
        if path is None:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
            with os.fdopen(fd, "w") as f:
                json.dump(value, f)
            os.replace(tmp, path)
        except OSError as exc:  # a read-only cache only costs a recomputation
            log.warning("dense cache: cannot write %s: %s", path, exc)

    def _remember(self, key: str, value: dict) -> None:
        with self._lock:
            self._mem[key] = value
            self._mem.move_to_end(key)
            while len(self._mem) > self.max_entries:
                self._mem.popitem(last=False)

    def __len__(self) -> int:
        return len(self._mem)

    def __bool__(self) -> bool:  # an empty cache is still a cache
        return True


_DEFAULT_CACHE: DenseCache | None = None


def default_dense_cache() -> DenseCache:
    """The process-wide dense cache (memory + ``$FFNSKIP_CACHE_DIR/dense`` unless
    ``$FFNSKIP_DENSE_CACHE=off``)."""
    global _DEFAULT_CACHE
    if _DEFAULT_CACHE is None:
        _DEFAULT_CACHE = DenseCache(default_dense_cache_dir())
    return _DEFAULT_CACHE

