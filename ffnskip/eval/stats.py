"""Uncertainty of the numbers a user decides on: paired bootstrap intervals.

Every comparison with dense is paired: the same samples (quality) or back-to-back runs of the
same items (speed). Resampling the pairs, not each side on its own, keeps the between-sample
spread (most of the variance) out of the difference.

* :func:`paired_difference`: mean(policy) - mean(dense) over per-sample scores, with a
  percentile bootstrap 95% interval;
* :func:`paired_speedup`: pooled tokens/s of the policy over dense's from alternating timed runs
  (each pair: the same item decoded densely and under the policy), with a bootstrap interval.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass
from typing import Sequence

#: Bootstrap resamples (the interval's ends move by ~0.1 percentile point between seeds at 2000).
N_BOOT = 2000


@dataclass(frozen=True)
class Interval:
    """A point estimate with its percentile-bootstrap interval over ``n`` pairs."""

    value: float | None
    low: float | None
    high: float | None
    n: int
    level: float = 0.95

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def ci(self) -> list[float | None]:
        return [self.low, self.high]


def _percentiles(values: list[float], level: float) -> tuple[float, float]:
    values = sorted(values)
    a = (1 - level) / 2
    lo = values[max(0, min(len(values) - 1, int(math.floor(a * len(values)))))]
    hi = values[max(0, min(len(values) - 1, int(math.ceil((1 - a) * len(values))) - 1))]
    return lo, hi


def paired_difference(policy: Sequence[float | None], dense: Sequence[float | None], *, level: float = 0.95,
                      n_boot: int = N_BOOT, seed: int = 0) -> Interval:
    """mean(policy - dense) over the samples where both are known, with a paired bootstrap
    interval (resampling samples). ``n = 0``: all None."""
    if len(policy) != len(dense):
        raise ValueError("paired_difference needs one policy and one dense value per sample")
    diffs = [float(p) - float(d) for p, d in zip(policy, dense) if p is not None and d is not None]
    n = len(diffs)
    if n == 0:
        return Interval(None, None, None, 0, level)
    point = sum(diffs) / n
    if n == 1 or all(d == diffs[0] for d in diffs):
        return Interval(point, point, point, n, level)
    rng = random.Random(seed)
    boots = [sum(rng.choices(diffs, k=n)) / n for _ in range(n_boot)]
    lo, hi = _percentiles(boots, level)
    return Interval(point, lo, hi, n, level)


def paired_speedup(dense: Sequence[tuple[int, float]], policy: Sequence[tuple[int, float]], *, level: float = 0.95,
                   n_boot: int = N_BOOT, seed: int = 0) -> Interval:
    """Pooled decode tokens/s of the policy over dense's: ``dense[i]`` and ``policy[i]`` are the
    ``(tokens, seconds)`` of one back-to-back pair of runs. The bootstrap resamples pairs."""
    if len(dense) != len(policy):
        raise ValueError("paired_speedup needs one dense and one policy run per pair")
    pairs = [(dt, ds, pt, ps) for (dt, ds), (pt, ps) in zip(dense, policy) if ds > 0 and ps > 0 and dt > 0 and pt > 0]
    n = len(pairs)
    if n == 0:
        return Interval(None, None, None, 0, level)

    def ratio(sel) -> float:
        dt = sum(p[0] for p in sel)
        ds = sum(p[1] for p in sel)
        pt = sum(p[2] for p in sel)
        ps = sum(p[3] for p in sel)
        return (pt / ps) / (dt / ds)

    point = ratio(pairs)
    if n == 1:
        return Interval(point, None, None, 1, level)
    rng = random.Random(seed)
    boots = [ratio(rng.choices(pairs, k=n)) for _ in range(n_boot)]
    lo, hi = _percentiles(boots, level)
    return Interval(point, lo, hi, n, level)


def vs_dense(samples: Sequence[dict], *, level: float = 0.95, n_boot: int = N_BOOT, seed: int = 0) -> dict[str, dict]:
    """Policy minus dense for every per-sample metric both sides carry (``scores`` and
    ``dense_scores`` of the report's samples; fidelity metrics score 1.0 for dense), each with
    its paired bootstrap interval: ``{metric: Interval.to_dict()}``."""
    names: list[str] = []
    for s in samples:
        for k, v in (s.get("scores") or {}).items():
            if k not in names and isinstance(v, (int, float)) and not isinstance(v, bool) and k in (s.get("dense_scores") or {}):
                names.append(k)
    out = {}
    for k in names:
        pol = [(s.get("scores") or {}).get(k) for s in samples]
        den = [(s.get("dense_scores") or {}).get(k) for s in samples]
        out[k] = paired_difference(pol, den, level=level, n_boot=n_boot, seed=seed).to_dict()
    return out
