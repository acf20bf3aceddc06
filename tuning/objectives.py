"""Objectives, the Pareto front and the recommendation rule (plain Python, no Ray).

* :func:`baseline_values` / :func:`trial_values`: a study's numbers from an evaluation report
  (:meth:`ffnskip.eval.EvalReport.to_dict`) and the stored dense baseline, with the 95% intervals
  of the quality drop (``vs_dense``) and of the speed-up (``speedup_ci95``) when the report has them.
* :func:`pareto_front`: indices of the non-dominated points for given directions.
* :func:`recommend`: the policy a user can deploy. Among completed trials whose quality drop's
  95% upper end is at most ``D``, and whose speed-up's 95% lower end is above 1, the one with the
  highest measured speed-up; when there is none, dense, with the reason and the best candidate.
  Trials without intervals (stored before they were measured) are judged on their point values
  and flagged.
* :func:`asha_score`: the scalar the successive-halving scheduler ranks a rung's trials by
  (within the drop: the skip ratio; outside: minus the excess drop).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from ffnskip.errors import FFNSkipError

#: Fidelity metrics: the dense model's own output scores 1.0 against itself. ``answer_agreement``
#: is the former name of ``output_identity`` (reports keep it as an alias with the same value).
FIDELITY_METRICS = ("output_identity", "answer_agreement_short", "answer_agreement", "rouge_l_vs_dense")
#: Metric names that mean the same thing (old name -> new name and back), for reading reports
#: and stored studies of either age.
METRIC_ALIASES = {"answer_agreement": "output_identity", "output_identity": "answer_agreement"}
#: What :func:`recommend` can maximise among the trials that qualify (default: speedup).
BEST_OBJECTIVES = ("speedup", "skip_ratio", "tokens_per_s")
#: Tolerance of the constraint test (metrics are averages of a few dozen 0/1 scores).
_EPS = 1e-9


class NoFeasibleTrial(FFNSkipError, ValueError):
    """No completed trial satisfies the quality constraint."""


@dataclass(frozen=True)
class QualitySpec:
    """Which metric is the study's quality, and which way is better."""

    metric: str
    higher_is_better: bool = True

    @property
    def direction(self) -> str:
        return "max" if self.higher_is_better else "min"

    def to_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "higher_is_better": self.higher_is_better}


def quality_spec(report: dict[str, Any], quality_metric: str) -> QualitySpec:
    """The study's quality metric: the task's primary metric or a fidelity metric."""
    if quality_metric == "primary":
        primary = report.get("primary") or {}
        return QualitySpec(str(primary["name"]), bool(primary.get("higher_is_better", True)))
    return QualitySpec(quality_metric, True)


def baseline_values(report: dict[str, Any], spec: QualitySpec) -> dict[str, float | None]:
    """Quality and tokens/s of the dense model, from a report's ``dense`` section."""
    dense = report.get("dense") or {}
    if spec.metric in FIDELITY_METRICS:
        quality = float(dense.get(spec.metric, 1.0))
    else:
        quality = _num(dense.get(spec.metric))
    return {"quality": quality, "tokens_per_s": _num(dense.get("tokens_per_s"))}


def _lookup(section: dict[str, Any], metric: str) -> Any:
    value = section.get(metric)
    if value is None and metric in METRIC_ALIASES:
        value = section.get(METRIC_ALIASES[metric])
    return value


def quality_drop_interval(report: dict[str, Any], spec: QualitySpec) -> tuple[float | None, float | None, int | None]:
    """``(low, high, n)`` of the quality drop's 95% interval from the report's ``vs_dense``
    (policy - dense per sample, paired bootstrap). Higher-is-better metrics drop by dense -
    policy, so the interval of the drop is ``[-high, -low]``; lower-is-better ones by policy -
    dense, ``[low, high]``. ``(None, None, n)`` when the report has no interval."""
    entry = _lookup(report.get("vs_dense") or {}, spec.metric)
    if not isinstance(entry, dict):
        return None, None, None
    n = entry.get("n")
    n = int(n) if isinstance(n, (int, float)) and not isinstance(n, bool) else None
    low, high = _num(entry.get("low")), _num(entry.get("high"))
    if low is None or high is None:
        return None, None, n
    if spec.higher_is_better:
        low, high = -high, -low
    return round(low, 12) + 0.0, round(high, 12) + 0.0, n


def speedup_interval(report: dict[str, Any]) -> tuple[float | None, float | None]:
    ci = report.get("speedup_ci95")
    if isinstance(ci, (list, tuple)) and len(ci) == 2:
        low, high = _num(ci[0]), _num(ci[1])
        if low is not None and high is not None:
            return low, high
    return None, None


def trial_values(report: dict[str, Any], spec: QualitySpec, baseline_quality: float | None,
                 baseline_tokens_per_s: float | None) -> dict[str, float | int | None]:
    """The metric columns of a trial: quality, its drop against dense (with its 95% interval),
    skip ratios, speed, the speed-up (with its 95% interval) and ``n``, the samples compared.

    The drop compares with dense on the report's own samples (its ``dense`` section: the
    baseline's decodes, from the cache), so a rung on a subset of the study's samples is judged
    against dense on that subset; the stored baseline is the fallback."""
    skip = report.get("skip") or {}
    quality = _num(_lookup(skip, spec.metric))
    if quality is None:
        known = ", ".join(sorted(k for k, v in skip.items() if isinstance(v, (int, float))))
        raise KeyError(f"the evaluation report has no metric '{spec.metric}' (it has: {known})")
    dense_quality = baseline_values(report, spec)["quality"] if report.get("dense") else None
    if dense_quality is None:
        dense_quality = baseline_quality
    drop = None
    if dense_quality is not None:
        drop = dense_quality - quality if spec.higher_is_better else quality - dense_quality
        drop = round(drop, 12)  # 1.0 - 0.8 is 0.19999999999999996: keep SQL filters like "<= 0.2" exact
    tps = _num(skip.get("tokens_per_s"))
    # The report's speedup compares dense and the policy measured alternately in the same process
    # (same load on the machine); the stored baseline's tokens/s is the fallback.
    speedup = _num(report.get("speedup"))
    if speedup is None and tps is not None and baseline_tokens_per_s:
        speedup = tps / baseline_tokens_per_s
    drop_low, drop_high, n = quality_drop_interval(report, spec)
    speed_low, speed_high = speedup_interval(report)
    if n is None and isinstance(report.get("n"), int):
        n = report["n"]
    return {
        "quality": quality,
        "quality_drop": drop,
        "quality_drop_low": drop_low,
        "quality_drop_high": drop_high,
        "skip_ratio": _num(skip.get("skip_ratio")),
        "skip_ratio_post_warmup": _num(skip.get("skip_ratio_post_warmup")),
        "tokens_per_s": tps,
        "speedup": speedup,
        "speedup_low": speed_low,
        "speedup_high": speed_high,
        "n": n,
    }


def directions(objectives: Sequence[str], spec_or_higher: QualitySpec | bool = True) -> list[str]:
    """``max`` / ``min`` per objective (only quality can be ``min``, for lower-is-better metrics)."""
    higher = spec_or_higher.higher_is_better if isinstance(spec_or_higher, QualitySpec) else spec_or_higher
    return [("max" if higher else "min") if o == "quality" else "max" for o in objectives]


def constraint_value(quality_drop: float | None, max_quality_drop: float | None) -> float:
    """Optuna's convention: <= 0 is feasible."""
    if max_quality_drop is None:
        return 0.0
    if quality_drop is None:
        return math.inf
    return quality_drop - max_quality_drop


def feasible(quality_drop: float | None, max_quality_drop: float | None) -> bool:
    return constraint_value(quality_drop, max_quality_drop) <= _EPS


# ------------------------------------------------------------------------------ Pareto
def _key(value: float | None, direction: str) -> float:
    """Larger is better; missing / NaN values are worst."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return -math.inf
    return float(value) if direction == "max" else -float(value)


def dominates(a: Sequence[float | None], b: Sequence[float | None], dirs: Sequence[str]) -> bool:
    """``a`` is at least as good as ``b`` everywhere and strictly better somewhere."""
    ka = [_key(v, d) for v, d in zip(a, dirs)]
    kb = [_key(v, d) for v, d in zip(b, dirs)]
    return all(x >= y for x, y in zip(ka, kb)) and any(x > y for x, y in zip(ka, kb))


def pareto_front(points: Sequence[Sequence[float | None]], dirs: Sequence[str]) -> list[int]:
    """Indices (in input order) of the points no other point dominates. Duplicates all stay."""
    if any(len(p) != len(dirs) for p in points):
        raise ValueError("every point needs one value per direction")
    if any(d not in ("max", "min") for d in dirs):
        raise ValueError(f"directions must be 'max' or 'min'; got {list(dirs)}")
    return [i for i, p in enumerate(points) if not any(dominates(q, p, dirs) for j, q in enumerate(points) if j != i)]


def asha_score(values: dict[str, Any], max_quality_drop: float | None) -> float:
    """What successive halving ranks the trials of a rung by (higher is better): the skip ratio
    when the quality drop (point value: a few samples give wide intervals) is within
    ``max_quality_drop``, else minus the excess drop. Every policy within the drop ranks above
    every policy outside it; among those outside, the closer the better; among those inside, the
    one that skips more (the speed-up is measured on the last rung only, where it is judged)."""
    drop = values.get("quality_drop")
    if max_quality_drop is not None and (drop is None or drop > max_quality_drop + _EPS):
        return -(math.inf if drop is None else drop - max_quality_drop) - 1e-6
    skip = values.get("skip_ratio")
    return max(0.0, float(skip)) if isinstance(skip, (int, float)) and math.isfinite(skip) else 0.0


# ------------------------------------------------------------------------------ recommendation
@dataclass(frozen=True)
class Judged:
    """One trial as the rule sees it: the values it gates on and whether they are intervals."""

    trial: Any
    drop: float | None
    drop_high: float | None
    """Upper end of the drop's 95% interval (the point value when there is no interval)."""
    speedup: float | None
    speedup_low: float | None
    """Lower end of the speed-up's 95% interval (the point value when there is no interval)."""
    intervals: bool
    """Both gates were read from intervals (False: judged on point values)."""
    within_drop: bool
    faster: bool

    @property
    def qualifies(self) -> bool:
        return self.within_drop and self.faster


def judge(trial: Any, max_quality_drop: float | None) -> Judged:
    drop = getattr(trial, "quality_drop", None)
    d_high = getattr(trial, "quality_drop_high", None)
    speedup = getattr(trial, "speedup", None)
    s_low = getattr(trial, "speedup_low", None)
    intervals = d_high is not None and s_low is not None
    gate_drop = d_high if d_high is not None else drop
    gate_speed = s_low if s_low is not None else speedup
    within = max_quality_drop is None or (gate_drop is not None and gate_drop <= max_quality_drop + _EPS)
    faster = gate_speed is not None and gate_speed > 1.0 + _EPS
    return Judged(trial, drop, gate_drop, speedup, gate_speed, intervals, within, faster)


@dataclass(frozen=True)
class Verdict:
    """What :func:`recommend` decided. ``trial`` is ``None`` for dense; ``candidate`` is the trial
    that came closest (the recommended one, or the one the reason names)."""

    trial: Any | None
    candidate: Judged | None
    reason: str
    max_quality_drop: float | None
    objective: str = "speedup"
    considered: int = 0

    @property
    def dense(self) -> bool:
        return self.trial is None

    @property
    def approximate(self) -> bool:
        """The chosen trial was judged on point values (it has no intervals)."""
        return self.candidate is not None and not self.candidate.intervals


def _f(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def describe(t: Any, *, metric: str = "quality") -> str:
    """``speed-up 1.12 [1.05, 1.20], output_identity drop 0.033 [0.000, 0.100] on 30 samples``."""
    def ci(point, low, high, fmt):
        if low is None or high is None:
            return f"{_f(point, fmt)} (no interval)"
        return f"{_f(point, fmt)} [{_f(low, fmt)}, {_f(high, fmt)}]"

    n = getattr(t, "n", None)
    return (f"speed-up {ci(getattr(t, 'speedup', None), getattr(t, 'speedup_low', None), getattr(t, 'speedup_high', None), '.2f')}, "
            f"{metric} drop {ci(getattr(t, 'quality_drop', None), getattr(t, 'quality_drop_low', None), getattr(t, 'quality_drop_high', None), '.3f')}"
            + (f" on {n} samples" if n else ""))


def recommend(trials: Iterable[Any], *, max_quality_drop: float | None, objective: str = "speedup",
              metric: str = "quality") -> Verdict:
    """The policy to deploy, or dense.

    ``trials``: objects with ``id``, ``status`` (only ``completed`` ones count; stopped-early,
    failed and running trials never qualify), ``quality_drop`` (+ ``_low`` / ``_high``),
    ``speedup`` (+ ``_low`` / ``_high``), ``skip_ratio``, ``tokens_per_s``, ``n``.

    A trial qualifies when the upper end of its quality drop's 95% interval is at most
    ``max_quality_drop`` (any drop when it is ``None``) and the lower end of its speed-up's 95%
    interval is above 1; a trial without intervals is judged on its point values (and the verdict
    says so). Among the qualifying trials the one with the highest ``objective`` (default: the
    measured speed-up) wins; ties: the smaller drop bound, then the older trial. No qualifying
    trial: dense, and the reason names the best candidate and its numbers.
    """
    if objective not in BEST_OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(BEST_OBJECTIVES)}; got {objective!r}")
    pool = [judge(t, max_quality_drop) for t in trials if getattr(t, "status", "completed") == "completed"]
    limit = "any quality drop" if max_quality_drop is None else f"a {max_quality_drop:g} {metric} drop"
    if not pool:
        return Verdict(None, None, "the study has no completed trial yet: dense (no skipping) is recommended",
                       max_quality_drop, objective, 0)

    def value(j: Judged, name: str) -> float:
        v = getattr(j.trial, name, None) if name != "speedup" else j.speedup
        return -math.inf if v is None else float(v)

    def rank(j: Judged):
        return (-value(j, objective), math.inf if j.drop_high is None else j.drop_high, j.trial.id)

    qualified = [j for j in pool if j.qualifies]
    if qualified:
        best = min(qualified, key=rank)
        t = best.trial
        how = "" if best.intervals else " (judged on point values: this trial was stored without 95% intervals)"
        what = "the fastest" if objective == "speedup" else f"the highest-{objective}"
        reason = (f"trial {t.id} is {what} policy that is faster than dense within {limit} (95% intervals): "
                  f"{describe(t, metric=metric)}{how}")
        return Verdict(t, best, reason, max_quality_drop, objective, len(pool))

    within = [j for j in pool if j.within_drop]
    if within:
        best = min(within, key=lambda j: (-value(j, "speedup"), math.inf if j.drop_high is None else j.drop_high, j.trial.id))
        t = best.trial
        why = ("its speed-up's 95% lower end is not above 1" if best.intervals and best.speedup_low is not None
               else "its speed-up is not above 1" if best.speedup is not None else "it has no speed measurement")
        reason = (f"no policy faster than dense within {limit}: the fastest candidate, trial {t.id}, has "
                  f"{describe(t, metric=metric)}, and {why}; dense (no skipping) is recommended")
        return Verdict(None, best, reason, max_quality_drop, objective, len(pool))

    best = min(pool, key=lambda j: (math.inf if j.drop_high is None else j.drop_high, -value(j, "speedup"), j.trial.id))
    t = best.trial
    bound = "upper end of the quality drop's 95% interval" if best.intervals else "quality drop"
    reason = (f"no policy keeps the {bound} within {max_quality_drop:g}: the closest, trial {t.id}, has "
              f"{describe(t, metric=metric)}; dense (no skipping) is recommended")
    return Verdict(None, best, reason, max_quality_drop, objective, len(pool))


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v)
