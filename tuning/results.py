"""Reading studies back: trial tables, the Pareto front, the best policy, export and plot.

Plain Python over :class:`~tuning.store.Store` (no Ray); the ``ffnskip results`` commands and the
end-of-study summary use it, and so can other packages (:func:`best_policy` for serving).
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from typing import Any, Sequence

from ffnskip.policy import SkipPolicy

from .objectives import NoFeasibleTrial, choose_best, directions as objective_directions, feasible, pareto_front
from .store import BaselineRecord, Store, StudyRecord, TrialRecord

POLICY_COLUMNS = ("threshold", "warmup_tokens", "layer_start", "layer_end", "skip_budget", "dense_every")
METRIC_COLUMNS = ("quality", "quality_drop", "skip_ratio", "skip_ratio_post_warmup", "tokens_per_s", "speedup")
#: Sortable columns where smaller is better.
SMALLER_IS_BETTER = {"quality_drop", "duration_s", "id"}
ROW_COLUMNS = ("id", "status", *POLICY_COLUMNS, *METRIC_COLUMNS, "feasible", "duration_s", "node", "optuna_number",
               "error")


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
        return list(self.config.get("objectives") or ["quality", "skip_ratio", "tokens_per_s"])

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
        out = {"running": 0, "completed": 0, "failed": 0}
        for t in self.trials:
            out[t.status] = out.get(t.status, 0) + 1
        return out

    def pareto(self) -> list[TrialRecord]:
        """Completed trials no other completed trial dominates on the study's objectives."""
        done = self.completed
        points = [[getattr(t, o) for o in self.objectives] for t in done]
        return [done[i] for i in pareto_front(points, self.directions)]

    def best(self, max_quality_drop: float | None = None, objective: str = "skip_ratio") -> TrialRecord:
        """The best completed trial within the constraint; raises :class:`NoFeasibleTrial`."""
        limit = self.max_quality_drop if max_quality_drop is None else max_quality_drop
        return choose_best(self.completed, max_quality_drop=limit, objective=objective)

    def choose(self, max_quality_drop: float | None = None, objective: str = "skip_ratio") -> "Choice":
        """Like :meth:`best`, but when no trial keeps the quality drop within the limit, the
        study's dense baseline (drop 0, no skipping) is the answer: it is the only measured
        policy that does."""
        try:
            return Choice(self.best(max_quality_drop, objective))
        except NoFeasibleTrial as exc:
            if self.baseline is None:
                raise
            return Choice(None, f"{exc}; the dense policy (no skipping) is the only one within the limit")


@dataclass
class Choice:
    """The chosen trial, or ``None`` for the dense baseline (with ``note`` saying why)."""

    trial: TrialRecord | None
    note: str | None = None

    @property
    def policy(self) -> SkipPolicy:
        return SkipPolicy.from_dict(self.trial.policy) if self.trial else SkipPolicy.dense()


def load_view(store: Store, name: str) -> StudyView:
    study = store.require_study(name)
    return StudyView(study, store.get_baseline(study.id), store.trials(study.id))


def best_policy(url: str | None, study: str, *, max_quality_drop: float | None = None,
                objective: str = "skip_ratio") -> SkipPolicy:
    """The study's best policy within the quality constraint (dense when no trial is within it)."""
    with Store(url, must_exist=True) as store:
        return load_view(store, study).choose(max_quality_drop, objective).policy


# ------------------------------------------------------------------------------ rows and tables
def trial_row(t: TrialRecord, max_quality_drop: float | None = None) -> dict[str, Any]:
    row: dict[str, Any] = {"id": t.id, "status": t.status}
    for k in POLICY_COLUMNS:
        row[k] = t.policy.get(k)
    for k in METRIC_COLUMNS:
        row[k] = getattr(t, k)
    row["feasible"] = feasible(t.quality_drop, max_quality_drop) if t.status == "completed" else None
    row["duration_s"] = t.duration_s
    row["node"] = t.node
    row["optuna_number"] = t.optuna_number
    row["error"] = t.error.splitlines()[0] if t.error else None
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
                 "dense_every", "quality", "quality_drop", "skip_ratio", "tokens_per_s", "speedup", "feasible")
SHORT_HEADERS = {"warmup_tokens": "warmup", "layer_start": "start", "layer_end": "end", "skip_budget": "budget",
                 "dense_every": "dense_ev", "quality_drop": "drop", "tokens_per_s": "tok/s", "feasible": "ok"}


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


def choice_line(view: StudyView, choice: Choice, max_quality_drop: float | None, objective: str) -> str:
    if choice.trial is None:
        return f"best policy: dense ({choice.note})"
    t = choice.trial
    what = f"quality drop <= {max_quality_drop:g}" if max_quality_drop is not None else "unconstrained"
    return (f"best policy ({what}, highest {objective}): trial {t.id}: {view.quality['metric']} {_cell(t.quality)} "
            f"(drop {_cell(t.quality_drop)}), skip_ratio {_cell(t.skip_ratio)}, {_cell(t.tokens_per_s)} tokens/s")


def summary_text(view: StudyView, *, objective: str = "skip_ratio") -> str:
    """The end-of-study report: baseline, Pareto table, best policy."""
    counts = view.counts()
    lines = [
        f"study '{view.study.name}': {counts['completed']} completed, {counts['failed']} failed"
        + (f", {counts['running']} running" if counts.get("running") else ""),
        baseline_line(view),
        "",
        f"Pareto front ({', '.join(f'{o} {d}' for o, d in zip(view.objectives, view.directions))}):",
    ]
    front = view.pareto()
    rows = sort_rows([trial_row(t, view.max_quality_drop) for t in front], "skip_ratio")
    lines.append(trials_table(rows) if rows else "(no completed trial)")
    lines.append("")
    try:
        choice = view.choose(objective=objective)
    except NoFeasibleTrial as exc:
        lines.append(f"best policy: none ({exc})")
    else:
        lines.append(choice_line(view, choice, view.max_quality_drop, objective))
        lines.append(policy_json(choice.policy))
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
