"""Objectives, the Pareto front and the constrained best-policy rule (plain Python, no Ray).

* :func:`baseline_values` / :func:`trial_values`: a study's numbers from an evaluation report
  (:meth:`ffnskip.eval.EvalReport.to_dict`) and the stored dense baseline.
* :func:`pareto_front`: indices of the non-dominated points for given directions.
* :func:`choose_best`: among trials whose quality drop against dense is at most ``D``, the one
  with the highest skip ratio (or tokens/s); ties go to the smaller drop, then the older trial.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from ffnskip.errors import FFNSkipError

#: Fidelity metrics: the dense model's own output scores 1.0 against itself.
FIDELITY_METRICS = ("answer_agreement", "rouge_l_vs_dense")
BEST_OBJECTIVES = ("skip_ratio", "tokens_per_s")
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


def trial_values(report: dict[str, Any], spec: QualitySpec, baseline_quality: float | None,
                 baseline_tokens_per_s: float | None) -> dict[str, float | None]:
    """The metric columns of a trial: quality, its drop against dense, skip ratios, speed."""
    skip = report.get("skip") or {}
    quality = _num(skip.get(spec.metric))
    if quality is None:
        known = ", ".join(sorted(k for k, v in skip.items() if isinstance(v, (int, float))))
        raise KeyError(f"the evaluation report has no metric '{spec.metric}' (it has: {known})")
    drop = None
    if baseline_quality is not None:
        drop = baseline_quality - quality if spec.higher_is_better else quality - baseline_quality
        drop = round(drop, 12)  # 1.0 - 0.8 is 0.19999999999999996: keep SQL filters like "<= 0.2" exact
    tps = _num(skip.get("tokens_per_s"))
    # The report's speedup compares dense and the policy measured alternately in the same process
    # (same load on the machine); the stored baseline's tokens/s is the fallback.
    speedup = _num(report.get("speedup"))
    if speedup is None and tps is not None and baseline_tokens_per_s:
        speedup = tps / baseline_tokens_per_s
    return {
        "quality": quality,
        "quality_drop": drop,
        "skip_ratio": _num(skip.get("skip_ratio")),
        "skip_ratio_post_warmup": _num(skip.get("skip_ratio_post_warmup")),
        "tokens_per_s": tps,
        "speedup": speedup,
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


def choose_best(trials: Iterable[Any], *, max_quality_drop: float | None, objective: str = "skip_ratio"):
    """The best trial within the quality constraint.

    ``trials``: objects with ``id``, ``quality_drop``, ``skip_ratio``, ``tokens_per_s`` (completed
    trials). Maximises ``objective`` among those with ``quality_drop <= max_quality_drop`` (all,
    when it is ``None``); ties: smaller drop, then smaller id. Raises :class:`NoFeasibleTrial`.
    """
    if objective not in BEST_OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(BEST_OBJECTIVES)}; got {objective!r}")
    pool = [t for t in trials if getattr(t, objective) is not None]
    if not pool:
        raise NoFeasibleTrial("the study has no completed trial yet")
    ok = [t for t in pool if feasible(t.quality_drop, max_quality_drop)]
    if not ok:
        closest = min(pool, key=lambda t: math.inf if t.quality_drop is None else t.quality_drop)
        raise NoFeasibleTrial(
            f"no completed trial keeps the quality drop within {max_quality_drop:g} "
            f"(smallest drop: {closest.quality_drop:.4g}, trial {closest.id}); "
            "raise --max-quality-drop or run more trials"
        )

    def rank(t):
        drop = math.inf if t.quality_drop is None else t.quality_drop
        return (-getattr(t, objective), drop, t.id)

    return min(ok, key=rank)


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v)
