"""What an evaluation measured: the runners' typed results (:class:`RunResult`) and the report
(:class:`EvalReport`), whose ``to_dict()`` is the ``ffnskip evaluate --json`` object."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

__all__ = ["EvalReport", "RunResult"]


@dataclass
class RunResult:
    """What a task runner (:func:`~ffnskip.eval.generation.run_generation`,
    :func:`~ffnskip.eval.perplexity.run_perplexity`) measured, for the report."""

    dense: dict[str, Any]
    """The dense side's aggregate metrics (the report's ``dense``; speed and judge add theirs)."""
    skip: dict[str, Any]
    """The policy's aggregate metrics (the report's ``skip``)."""
    samples: list[dict]
    """Per-sample records (the report's ``samples``)."""
    dense_pass_tps: float | None
    """Tokens/s of the dense evaluation pass (possibly from the cache)."""
    skip_pass_tps: float | None
    """Tokens/s of the policy's evaluation pass."""
    speed_items: list
    """What the speed runs decode, one per sample: the prompt's token ids (generation; conversations
    their first turn) or ``(prompt_ids, target_ids)`` windows (perplexity)."""


@dataclass
class EvalReport:
    """What :func:`evaluate` measured. ``to_dict()`` is the ``ffnskip evaluate --json`` object."""

    task: str
    model: str
    n: int
    policy: dict
    primary: dict
    """``{"name": metric, "higher_is_better": bool}``; the metric is in ``dense`` and ``skip``."""
    dense: dict
    skip: dict
    speedup: float | None
    data_fingerprint: str
    settings: dict = field(default_factory=dict)
    speed: dict = field(default_factory=dict)
    judge: dict | None = None
    vs_dense: dict = field(default_factory=dict)
    """Policy minus dense per metric over the samples, with paired bootstrap 95% intervals:
    ``{metric: {"value", "low", "high", "n", "level"}}`` (:func:`~ffnskip.eval.stats.vs_dense`)."""
    speedup_ci95: list | None = None
    """Paired bootstrap 95% interval of ``speedup`` over the alternating runs (None: no interval)."""
    samples: list[dict] = field(default_factory=list)
    """Per sample: index, id, prompt, reference, dense_output, output, scores, dense_scores,
    generated_tokens, skipped_ffn, skip_ratio."""

    def primary_value(self, side: str = "skip") -> float | None:
        return (self.dense if side == "dense" else self.skip).get(self.primary["name"])

    def to_dict(self, samples: bool = False) -> dict:
        out = {
            "task": self.task,
            "model": self.model,
            "n": self.n,
            "policy": self.policy,
            "primary": self.primary,
            "dense": self.dense,
            "skip": self.skip,
            "speedup": self.speedup,
            "speedup_ci95": self.speedup_ci95,
            "vs_dense": self.vs_dense,
            "data_fingerprint": self.data_fingerprint,
            "settings": self.settings,
            "speed": self.speed,
            "judge": self.judge,
        }
        if samples:
            out["samples"] = self.samples
        return _json_safe(out)

    def to_json(self, samples: bool = False, **kwargs) -> str:
        return json.dumps(self.to_dict(samples=samples), **kwargs)


def _json_safe(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj

