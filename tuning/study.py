"""Running a study: open the store, measure the dense baseline once, search, report.

:func:`run_study` is what ``python -m tuning`` and ``ffnskip tune`` call. Ray is touched only
through :mod:`tuning.ray_runner`.

Resume (``resume=True``): the study's finished trials are kept; trials left ``running`` by a
killed job are marked failed (in the store and in Optuna's storage); then only
``trials - completed`` new trials run. The baseline is not measured again.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .config import RENAMED_EVALUATORS, RENAMED_QUALITY_METRICS, ConfigError, TuningConfig
from .objectives import QualitySpec, baseline_values, directions, quality_spec
from .results import StudyView, load_view, summary_text
from .space import paper_points, resolve_space
from .store import BaselineRecord, Store, StoreError, StudyExists, StudyRecord, default_url
from .trial import EvalSpec

log = logging.getLogger(__name__)

#: Config keys that define what a study's numbers mean: a resumed study must keep them.
IDENTITY_KEYS = ("model", "dtype", "task", "limit", "seed", "data_file", "fields", "chat", "max_new_tokens",
                 "batch_size", "quality_metric", "objectives", "evaluator")
LIBRARIES = ("ffnskip", "torch", "transformers", "ray", "optuna", "sqlalchemy", "alembic", "datasets")


@dataclass
class StudyOutcome:
    name: str
    url: str
    ran: dict[str, int]
    """Trials this run finished: ``completed``, ``pruned`` (stopped early), ``failed``."""
    view: StudyView
    seconds: float = 0.0
    """Wall time of this run's search."""


def library_versions() -> dict[str, str | None]:
    import platform

    out: dict[str, str | None] = {"python": platform.python_version()}
    for lib in LIBRARIES:
        try:
            out[lib] = importlib.metadata.version(lib)
        except importlib.metadata.PackageNotFoundError:
            out[lib] = None
    return out


def git_commit() -> str | None:
    """The repository's HEAD (``-dirty`` with uncommitted changes), or ``None`` outside git."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
        return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def job_database_warning(url: str) -> str | None:
    """A relative SQLite path inside a submitted Ray job lands in the job's temporary copy of
    the working directory on the head node: say so."""
    if "RAY_JOB_CONFIG_JSON_ENV_VAR" not in os.environ:  # set by Ray for job drivers
        return None
    from sqlalchemy.engine import make_url

    try:
        u = make_url(url)
    except Exception:
        return None
    if u.get_backend_name() == "sqlite" and u.database and u.database != ":memory:" and not os.path.isabs(u.database):
        return (f"warning: {url} is relative to this job's working directory, a temporary copy on the head "
                "node; pass --db sqlite:////absolute/path.db or a PostgreSQL URL to keep the study")
    return None


def check_resumable(stored: dict[str, Any], cfg: TuningConfig) -> None:
    """A resumed study must evaluate the same way, or its trials would not be comparable."""
    now = cfg.to_dict()
    stored = {**stored, "evaluator": RENAMED_EVALUATORS.get(stored.get("evaluator"), stored.get("evaluator")),
              "quality_metric": RENAMED_QUALITY_METRICS.get(stored.get("quality_metric"), stored.get("quality_metric"))}
    for key in IDENTITY_KEYS:
        if stored.get(key) != now.get(key):
            raise ConfigError(
                key, f"the study was run with {stored.get(key)!r}, this run asks for {now.get(key)!r}; "
                "a resumed study must keep it (start a new --study instead)"
            )


def format_values(values: dict[str, Any]) -> str:
    def f(k, fmt):
        v = values.get(k)
        return "-" if v is None else format(v, fmt)

    def ci(lo, hi, fmt):
        return "" if values.get(lo) is None or values.get(hi) is None else f" [{f(lo, fmt)}, {f(hi, fmt)}]"

    n = values.get("n")
    text = (f"quality {f('quality', '.4f')} (drop {f('quality_drop', '+.4f')}{ci('quality_drop_low', 'quality_drop_high', '+.3f')}"
            f"{f' on {n} samples' if n else ''}), skip_ratio {f('skip_ratio', '.4f')}")
    if values.get("speedup") is None and values.get("tokens_per_s") is None:
        return text  # a successive-halving rung before the last: no speed runs
    return f"{text}, speed-up {f('speedup', '.2f')}{ci('speedup_low', 'speedup_high', '.2f')}, {f('tokens_per_s', '.2f')} tokens/s"


def start_points_for(cfg: TuningConfig, bounds: dict[str, Any], num_layers: int, max_new_tokens: int | None) -> list[dict]:
    """The trials Optuna evaluates first: the config's ``start_points``, then (``warm_start``) the
    method's published settings mapped into the search space; duplicates dropped."""
    points: list[dict] = []
    for p in [*cfg.start_points, *(paper_points(bounds, num_layers, max_new_tokens) if cfg.warm_start else [])]:
        if p not in points:
            points.append(p)
    return points


def rate_line(ran: dict[str, Any], seconds: float) -> str | None:
    """``this run: 12 trial(s) in 14.2 min: 50.7 trials/hour (7 stopped early by successive halving)``."""
    n = ran.get("completed", 0) + ran.get("failed", 0) + ran.get("pruned", 0)
    if not n or seconds <= 0:
        return None
    extra = []
    if ran.get("pruned"):
        extra.append(f"{ran['pruned']} stopped early by successive halving")
    if ran.get("failed"):
        extra.append(f"{ran['failed']} failed")
    return (f"this run: {n} trial(s) in {seconds / 60:.1f} min: {n / (seconds / 3600):.1f} trials/hour"
            + (f" ({', '.join(extra)})" if extra else ""))


def _measure_baseline(store: Store, cfg: TuningConfig, spec: EvalSpec, study: StudyRecord | None,
                      echo: Callable[[str], None]) -> tuple[StudyRecord, BaselineRecord]:
    """Measure the dense baseline (a Ray task), create the study row if needed, store both."""
    from . import ray_runner

    echo(f"measuring the dense baseline: {cfg.model} on {cfg.task}" + (f" ({cfg.limit} examples)" if cfg.limit else ""))
    base = ray_runner.run_baseline(spec, cfg.resources.cpu, cfg.resources.gpu)
    report = base["report"]
    qspec = quality_spec(report, cfg.quality_metric)
    new_tokens = (report.get("settings") or {}).get("max_new_tokens")
    bounds = resolve_space(cfg.search_space, base["num_layers"], new_tokens)  # fail before storing anything
    if study is None:
        study = store.create_study(
            cfg.study, model=cfg.model, task=cfg.task, model_hash=base.get("model_hash"),
            data_fingerprint=base.get("data_fingerprint"),
            search_space={"num_layers": base["num_layers"], "max_new_tokens": new_tokens, "bounds": bounds},
            config=cfg.to_dict(), hardware=base.get("hardware"), library_versions=library_versions(),
            git_commit=git_commit(),
        )
    values = baseline_values(report, qspec)
    baseline = store.save_baseline(
        study.id,
        metrics={"quality": qspec.to_dict(), "primary": report.get("primary"), "dense": report.get("dense"),
                 "n": report.get("n"), "model_type": base.get("model_type")},
        quality=values["quality"], tokens_per_s=values["tokens_per_s"], outputs=base.get("dense_cache"),
        n=report.get("n"), node=base.get("node"), duration_s=base.get("duration_s"),
    )
    echo(f"dense baseline: {qspec.metric} {values['quality']:.4f}, {values['tokens_per_s'] or 0:.2f} tokens/s "
         f"({base.get('duration_s') or 0:.0f} s)")
    return study, baseline


def say(line: str) -> None:
    """Progress for a terminal or a log file (unbuffered, so it shows while the study runs)."""
    print(line, flush=True)


def run_study(cfg: TuningConfig, *, db: str | None = None, resume: bool = False, address: str | None = None,
              storage_path: str | None = None, echo: Callable[[str], None] = say) -> StudyOutcome:
    """Run (or resume) the study ``cfg.study`` until it has ``cfg.trials`` trials; report it."""
    from . import ray_runner

    url = db or cfg.db or default_url()
    name = cfg.study
    if not name:
        raise ConfigError("study", "a study needs a name (--study NAME)")
    warning = job_database_warning(url)
    if warning:
        echo(warning)
    store = Store(url)
    try:
        existing = store.get_study(name)
        if existing is not None and not resume:
            raise StudyExists(
                f"study '{name}' already exists in {store.location}: pass --resume to continue it, "
                "or choose another --study"
            )
        if existing is None and ray_runner.optuna_study_exists(url, name):
            raise StoreError(
                f"{store.location} already holds an Optuna study named '{name}' but no ffnskip study: "
                "choose another --study (or delete it: optuna delete-study --study-name ... --storage ...)"
            )
        if existing is not None:
            check_resumable(existing.config, cfg)
        if cfg.scheduler is not None and cfg.task == "perplexity":
            raise ConfigError("scheduler", "successive halving counts samples, but the perplexity task's limit counts "
                              "tokens: set scheduler: null for it")
        echo(f"study '{name}' in {store.location}" + (" (resuming)" if existing else ""))

        with ray_runner.ray_session(address) as ray_info:
            ray_runner.check_resources(cfg.resources.cpu, cfg.resources.gpu, ray_info["embedded"])
            spec = EvalSpec.from_config(cfg, absolute_paths=ray_info["embedded"] or not ray_info["owned"])
            study = existing
            baseline = store.get_baseline(study.id) if study else None
            if baseline is None:  # a new study (or one whose first job died during the baseline)
                study, baseline = _measure_baseline(store, cfg, spec, study, echo)
            q = baseline.metrics["quality"]
            qspec = QualitySpec(q["metric"], bool(q["higher_is_better"]))
            bounds = resolve_space(cfg.search_space, study.search_space["num_layers"],
                                   study.search_space.get("max_new_tokens"))

            if existing is not None:
                interrupted = store.fail_running_trials(study.id, ray_runner.INTERRUPTED)
                finished = {t.optuna_number: t for t in store.trials(study.id)
                            if t.status in ("completed", "pruned") and t.optuna_number is not None}
                stale = ray_runner.fail_stale_optuna_trials(url, name, finished, list(cfg.objectives),
                                                            cfg.max_quality_drop)
                if interrupted:
                    echo(f"marked {interrupted} interrupted trial(s) of the killed run as failed")
                if stale["told"]:
                    echo(f"told Optuna {stale['told']} finished trial(s) that the killed run had stored but not "
                         "reported to it")
            counts = store.count_trials(study.id)
            done = counts["completed"] + counts.get("pruned", 0)  # a trial stopped early is done too
            remaining = cfg.trials - done
            ran: dict[str, Any] = {"completed": 0, "failed": 0, "pruned": 0}
            seconds = 0.0
            if remaining <= 0:
                echo(f"the study already has {done} finished trials (--trials {cfg.trials}): nothing to run")
            else:
                num_layers = study.search_space["num_layers"]
                new_tokens = study.search_space.get("max_new_tokens")
                rungs = cfg.scheduler.rungs(baseline.n) if cfg.scheduler is not None and baseline.n else None
                echo(f"running {remaining} trial(s), {cfg.concurrency} at a time "
                     f"({done} already finished, {cfg.trials} in total)"
                     + (f"; successive halving over {' -> '.join(str(n) for _, n in rungs)} samples, keeping "
                        f"1/{cfg.scheduler.reduction_factor:g} per rung" if rungs and len(rungs) > 1 else ""))
                ran = ray_runner.run_search(
                    cfg=cfg, spec=spec,
                    context={"quality": qspec.to_dict(), "baseline_quality": baseline.quality,
                             "baseline_tokens_per_s": baseline.tokens_per_s, "dense_cache": baseline.outputs,
                             "max_quality_drop": cfg.max_quality_drop,
                             "rungs": rungs if rungs and len(rungs) > 1 else None},
                    bounds=bounds, store=store, url=url, study_id=study.id, study_name=name,
                    num_samples=remaining, directions=directions(cfg.objectives, qspec),
                    # A resumed search must not replay the first run's random draws.
                    seed=cfg.seed + ray_runner.optuna_trial_count(url, name),
                    # At most one per trial to run: Optuna stores every enqueued point as a WAITING trial.
                    start_points=None if existing is not None else start_points_for(cfg, bounds, num_layers,
                                                                                    new_tokens)[:remaining],
                    total=cfg.trials, done_before=done, echo=echo, fmt=format_values,
                    storage_path=storage_path,
                )
                seconds = ran.pop("seconds", 0.0)
        view = load_view(store, name)
        echo("")
        echo(summary_text(view, run_line=rate_line(ran, seconds)))
        return StudyOutcome(name=name, url=url, ran=ran, view=view, seconds=seconds)
    finally:
        store.close()
