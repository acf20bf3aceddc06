"""Reading studies back: trial tables, the Pareto front, the recommendation, export and plot.

Plain Python over :class:`~tuning.store.Store` (no Ray); the ``ffnskip results`` commands, the
end-of-study summary and serving (:func:`recommendation`, :func:`best_policy`) use it. The rule
itself is :func:`tuning.objectives.recommend`.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from typing import Any, Sequence

from ffnskip.policy import SkipPolicy

from .config import DEFAULT_OBJECTIVES
from .objectives import Verdict, directions as objective_directions, judge, pareto_front, recommend
from .store import BaselineRecord, Store, StudyRecord, TrialRecord

POLICY_COLUMNS = ("threshold", "warmup_tokens", "layer_start", "layer_end", "skip_budget", "dense_every")
METRIC_COLUMNS = ("quality", "quality_drop", "quality_drop_low", "quality_drop_high", "skip_ratio",
                  "skip_ratio_post_warmup", "tokens_per_s", "speedup", "speedup_low", "speedup_high", "n")
#: Sortable columns where smaller is better.
SMALLER_IS_BETTER = {"quality_drop", "quality_drop_low", "quality_drop_high", "duration_s", "id"}
ROW_COLUMNS = ("id", "status", *POLICY_COLUMNS, *METRIC_COLUMNS, "feasible", "faster", "duration_s", "node",
               "optuna_number", "error", "stop_reason")


@dataclass
class StudyView:
    """A study with its baseline and trials, and how to read its objectives."""

    study: StudyRecord
    baseline: BaselineRecord | None
    trials: list[TrialRecord]

    @property
    def config(self) -> dict[str, Any]:
        return self.study.config

    @property
    def objectives(self) -> list[str]:
        return list(self.config.get("objectives") or DEFAULT_OBJECTIVES)

    @property
    def quality(self) -> dict[str, Any]:
        q = (self.baseline.metrics.get("quality") if self.baseline else None) or {}
        return {"metric": q.get("metric", "quality"), "higher_is_better": q.get("higher_is_better", True)}

    @property
    def directions(self) -> list[str]:
        return objective_directions(self.objectives, bool(self.quality["higher_is_better"]))

    @property
    def max_quality_drop(self) -> float | None:
        return self.config.get("max_quality_drop")

    @property
    def completed(self) -> list[TrialRecord]:
        return [t for t in self.trials if t.status == "completed"]

    def counts(self) -> dict[str, int]:
        out = {"running": 0, "completed": 0, "failed": 0, "pruned": 0}
        for t in self.trials:
            out[t.status] = out.get(t.status, 0) + 1
        return out

    def pareto(self) -> list[TrialRecord]:
        """Completed trials no other completed trial dominates on the study's objectives."""
        done = self.completed
        points = [[getattr(t, o) for o in self.objectives] for t in done]
        return [done[i] for i in pareto_front(points, self.directions)]

    def recommend(self, max_quality_drop: float | None = None, objective: str = "speedup") -> Verdict:
        """The recommendation rule (:func:`tuning.objectives.recommend`) over the study's trials,
        within ``max_quality_drop`` (default: the study's)."""
        limit = self.max_quality_drop if max_quality_drop is None else max_quality_drop
        return recommend(self.trials, max_quality_drop=limit, objective=objective, metric=self.quality["metric"])


def verdict_policy(verdict: Verdict) -> SkipPolicy:
    """The policy file of a verdict: the chosen trial's, or dense."""
    return SkipPolicy.from_dict(verdict.trial.policy) if verdict.trial is not None else SkipPolicy.dense()


def load_view(store: Store, name: str) -> StudyView:
    study = store.require_study(name)
    return StudyView(study, store.get_baseline(study.id), store.trials(study.id))


def recommendation(url: str | None, study: str, *, max_quality_drop: float | None = None,
                   objective: str = "speedup") -> tuple[StudyView, Verdict]:
    """The study and its verdict (serving calls this)."""
    with Store(url, must_exist=True) as store:
        view = load_view(store, study)
    return view, view.recommend(max_quality_drop, objective)


def best_policy(url: str | None, study: str, *, max_quality_drop: float | None = None,
                objective: str = "speedup") -> SkipPolicy:
    """The policy the rule recommends for ``study`` (dense when no trial qualifies)."""
    return verdict_policy(recommendation(url, study, max_quality_drop=max_quality_drop, objective=objective)[1])


def _ci(low: float | None, high: float | None) -> list[float] | None:
    return None if low is None or high is None else [low, high]


def explain(view: StudyView, verdict: Verdict) -> dict[str, Any]:
    """The verdict as data (``results best --explain --json``). ``quality_drop`` .. ``n`` describe
    the recommended policy (dense: drop 0, speed-up 1 by definition, on the baseline's samples);
    ``candidate`` is the trial that came closest (the chosen one, or the one the reason names)."""
    counts = view.counts()
    out: dict[str, Any] = {
        "study": view.study.name,
        "verdict": "dense" if verdict.dense else "policy",
        "policy": verdict_policy(verdict).to_dict(),
        "trial_id": None if verdict.dense else verdict.trial.id,
        "reason": verdict.reason,
        "quality_metric": view.quality["metric"],
        "max_quality_drop": verdict.max_quality_drop,
        "objective": verdict.objective,
    }
    if verdict.dense:
        n = view.baseline.n if view.baseline else None
        out.update(quality_drop=0.0, quality_drop_ci95=[0.0, 0.0], speedup=1.0, speedup_ci95=[1.0, 1.0], n=n,
                   intervals=True)
    else:
        t = verdict.trial
        out.update(quality_drop=t.quality_drop, quality_drop_ci95=_ci(t.quality_drop_low, t.quality_drop_high),
                   speedup=t.speedup, speedup_ci95=_ci(t.speedup_low, t.speedup_high), n=t.n,
                   intervals=not verdict.approximate)
    c = verdict.candidate
    out["candidate"] = None if c is None else {
        "trial_id": c.trial.id, "quality_drop": c.trial.quality_drop,
        "quality_drop_ci95": _ci(c.trial.quality_drop_low, c.trial.quality_drop_high),
        "speedup": c.trial.speedup, "speedup_ci95": _ci(c.trial.speedup_low, c.trial.speedup_high), "n": c.trial.n,
        "skip_ratio": c.trial.skip_ratio, "intervals": c.intervals, "within_drop": c.within_drop, "faster": c.faster,
        "policy": c.trial.policy,
    }
    out["trials"] = {"completed": counts["completed"], "pruned": counts["pruned"], "failed": counts["failed"],
                     "running": counts["running"]}
    return out


def explain_text(view: StudyView, verdict: Verdict) -> str:
    """The verdict for a person (``results best --explain``)."""
    d = explain(view, verdict)
    limit = "unconstrained" if d["max_quality_drop"] is None else f"max {d['quality_metric']} drop {d['max_quality_drop']:g}"
    head = ("verdict: dense (no skipping)" if verdict.dense else f"verdict: trial {d['trial_id']}")
    lines = [f"{head}  [{limit}; 95% intervals; {d['trials']['completed']} completed, "
             f"{d['trials']['pruned']} stopped early, {d['trials']['failed']} failed]",
             f"reason: {d['reason']}"]
    c = d["candidate"]
    if c is not None and (verdict.dense or c["trial_id"] != d["trial_id"]):
        lines.append(f"closest trial: {c['trial_id']} (skip_ratio {_cell(c['skip_ratio'])}): {json.dumps(c['policy'])}")
    lines.append(f"policy: {verdict_policy(verdict).to_json()}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ rows and tables
def trial_row(t: TrialRecord, max_quality_drop: float | None = None) -> dict[str, Any]:
    """One trial as a table row. ``feasible``: the drop's 95% upper end (the point value without
    an interval) is within ``max_quality_drop``; ``faster``: the speed-up's 95% lower end (or the
    point value) is above 1. A trial needs both to be recommended."""
    row: dict[str, Any] = {"id": t.id, "status": t.status}
    for k in POLICY_COLUMNS:
        row[k] = t.policy.get(k)
    for k in METRIC_COLUMNS:
        row[k] = getattr(t, k)
    j = judge(t, max_quality_drop) if t.status == "completed" else None
    row["feasible"] = j.within_drop if j else None
    row["faster"] = j.faster if j else None
    row["duration_s"] = t.duration_s
    row["node"] = t.node
    row["optuna_number"] = t.optuna_number
    row["error"] = t.error.splitlines()[0] if t.error else None
    row["stop_reason"] = t.stop_reason
    return row


def sort_rows(rows: list[dict[str, Any]], key: str | None, directions: dict[str, str] | None = None) -> list[dict]:
    """Best first on ``key`` (missing values last)."""
    if not key:
        return rows
    if rows and key not in rows[0]:
        raise KeyError(key)
    smaller = key in SMALLER_IS_BETTER or (directions or {}).get(key) == "min"

    def rank(r):
        v = r.get(key)
        if not isinstance(v, (int, float)) or (isinstance(v, float) and math.isnan(v)):
            return (1, 0.0)
        return (0, v if smaller else -v)

    return sorted(rows, key=rank)


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1000 else f"{v:.1f}"
    return str(v)


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str], headers: dict[str, str] | None = None) -> str:
    headers = headers or {}
    head = [headers.get(c, c) for c in columns]
    body = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(head, widths))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(b, widths)) for b in body]
    return "\n".join(lines)


TABLE_COLUMNS = ("id", "status", "threshold", "warmup_tokens", "layer_start", "layer_end", "skip_budget",
                 "dense_every", "n", "quality", "quality_drop", "quality_drop_high", "skip_ratio", "tokens_per_s",
                 "speedup", "speedup_low", "feasible", "faster")
SHORT_HEADERS = {"warmup_tokens": "warmup", "layer_start": "start", "layer_end": "end", "skip_budget": "budget",
                 "dense_every": "dense_ev", "quality_drop": "drop", "quality_drop_high": "drop_hi",
                 "tokens_per_s": "tok/s", "speedup_low": "spd_lo", "feasible": "ok", "faster": ">1"}


def trials_table(rows: Sequence[dict[str, Any]]) -> str:
    return format_table(rows, TABLE_COLUMNS, SHORT_HEADERS)


def baseline_line(view: StudyView) -> str:
    b = view.baseline
    if b is None:
        return "dense baseline: not measured"
    tps = f"{b.tokens_per_s:.2f}" if b.tokens_per_s is not None else "-"
    q = f"{b.quality:.4f}" if b.quality is not None else "-"
    return f"dense baseline: {view.quality['metric']} {q}, {tps} tokens/s on {b.n} examples"


def policy_json(policy: SkipPolicy) -> str:
    """A ``--policy`` file."""
    return policy.to_json(indent=2)


def verdict_lines(view: StudyView, verdict: Verdict) -> list[str]:
    """The last lines of a study's report: the policy file, then the verdict and its reason."""
    limit = ("any quality drop" if verdict.max_quality_drop is None
             else f"quality drop <= {verdict.max_quality_drop:g} at the 95% upper end")
    head = "dense (no skipping)" if verdict.dense else f"trial {verdict.trial.id}"
    return [
        f"recommended policy (--policy file): {verdict_policy(verdict).to_json()}",
        f"verdict ({limit}, speed-up > 1 at the 95% lower end): {head}",
        f"  {verdict.reason}",
    ]


def summary_text(view: StudyView, *, objective: str = "speedup", run_line: str | None = None) -> str:
    """The end-of-study report: baseline, Pareto table, trials per hour, the verdict (last)."""
    counts = view.counts()
    lines = [
        f"study '{view.study.name}': {counts['completed']} completed"
        + (f", {counts['pruned']} stopped early" if counts.get("pruned") else "")
        + f", {counts['failed']} failed"
        + (f", {counts['running']} running" if counts.get("running") else ""),
        baseline_line(view),
        "",
        f"Pareto front ({', '.join(f'{o} {d}' for o, d in zip(view.objectives, view.directions))}):",
    ]
    front = view.pareto()
    rows = sort_rows([trial_row(t, view.max_quality_drop) for t in front], "speedup")
    lines.append(trials_table(rows) if rows else "(no completed trial)")
    lines.append("")
    if run_line:
        lines.append(run_line)
    lines.extend(verdict_lines(view, view.recommend(objective=objective)))
    return "\n".join(lines)


# ------------------------------------------------------------------------------ export / plot
def export_records(view: StudyView) -> list[dict[str, Any]]:
    return [trial_row(t, view.max_quality_drop) for t in view.trials]


def export_json(view: StudyView) -> str:
    b = view.baseline
    doc = {
        "study": {
            "name": view.study.name, "model": view.study.model, "model_hash": view.study.model_hash,
            "task": view.study.task, "data_fingerprint": view.study.data_fingerprint,
            "created_at": view.study.created_at.isoformat(), "git_commit": view.study.git_commit,
            "config": view.study.config, "search_space": view.study.search_space,
            "hardware": view.study.hardware, "library_versions": view.study.library_versions,
        },
        "baseline": None if b is None else {"quality": b.quality, "tokens_per_s": b.tokens_per_s, "n": b.n,
                                            "metrics": b.metrics},
        "trials": [
            {**trial_row(t, view.max_quality_drop), "policy": t.policy, "metrics": t.metrics, "error": t.error,
             "started_at": t.started_at.isoformat() if t.started_at else None,
             "finished_at": t.finished_at.isoformat() if t.finished_at else None}
            for t in view.trials
        ],
    }
    return json.dumps(doc, indent=2)


def export_csv(view: StudyView) -> str:
    rows = export_records(view)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=ROW_COLUMNS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if v is None else v) for k, v in r.items()})
    return buf.getvalue()


def plot(view: StudyView, out: str) -> dict[str, Any]:
    """Quality against skip ratio; the (quality, skip ratio) Pareto front highlighted, the rest grey."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [t for t in view.completed if t.quality is not None and t.skip_ratio is not None]
    q_dir = "max" if view.quality["higher_is_better"] else "min"
    front_idx = set(pareto_front([[t.skip_ratio, t.quality] for t in done], ["max", q_dir]))
    front = sorted((done[i] for i in front_idx), key=lambda t: t.skip_ratio)
    rest = [t for i, t in enumerate(done) if i not in front_idx]

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    ax.scatter([t.skip_ratio for t in rest], [t.quality for t in rest], c="0.7", s=28, label="dominated")
    ax.plot([t.skip_ratio for t in front], [t.quality for t in front], "-o", c="tab:red", ms=6, label="Pareto front")
    for t in front:
        ax.annotate(str(t.id), (t.skip_ratio, t.quality), textcoords="offset points", xytext=(4, 4), fontsize=7)
    b = view.baseline
    if b is not None and b.quality is not None:
        ax.axhline(b.quality, ls="--", c="tab:blue", lw=1, label="dense")
        if view.max_quality_drop is not None:
            sign = -1 if view.quality["higher_is_better"] else 1
            ax.axhline(b.quality + sign * view.max_quality_drop, ls=":", c="tab:blue", lw=1,
                       label=f"max drop {view.max_quality_drop:g}")
    ax.set_xlabel("skip ratio (skipped FFNs / (layers x generated tokens))")
    ax.set_ylabel(view.quality["metric"])
    ax.set_title(f"{view.study.name}: {view.study.model}, {view.study.task}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return {"plot": out, "trials": len(done), "pareto": [t.id for t in front]}
