"""The only module that talks to Ray: connect or start Ray, run the baseline task, run Ray Tune.

* Ray: ``--address`` or ``$RAY_ADDRESS`` (set by ``ray job submit``) connects to a cluster;
  without either an embedded local Ray is started (``address="local"``: never someone else's
  ``ray start`` cluster by accident) and stopped at the end.
* Search: Ray Tune's ``OptunaSearch`` with ``metric=[...]``, ``mode=[...]`` and Optuna's
  ``RDBStorage`` on the study's database, so the Optuna study (and optuna-dashboard) outlives the
  job. The quality constraint is set on each Optuna trial (``Trial.set_constraint``, <= 0 is
  feasible) by :class:`_Search` from the trial's result, before it tells Optuna the values.
* Store: all writes happen in the driver, in :class:`StoreCallback` (Tune callbacks), so a worker
  needs no database access (a SQLite file on the head node works on a multi-node cluster), and a
  trial whose worker dies is still recorded, from Tune's error report.
* Successive halving (config ``scheduler: {kind: asha, ...}``): a trial reports one result per
  rung of growing sample counts (:func:`tuning.trial.run_rungs`); Ray Tune's ``ASHAScheduler``
  (``time_attr="rung"``, ``metric="asha_score"``) stops the ones outside the best
  ``1 / reduction_factor`` of their rung. A stopped trial is stored as ``pruned`` (its last rung's
  values and the reason) and told to Optuna as ``PRUNED``; only the last rung, on the study's own
  ``limit``, completes a trial.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
from datetime import datetime
from typing import Any, Callable, Iterator

from .objectives import constraint_value
from .space import policy_from_params, suggest
from .store import METRIC_COLUMNS, Store, optuna_storage

log = logging.getLogger(__name__)

#: Error text kept per failed trial (the traceback tail is the useful part).
MAX_ERROR_CHARS = 20000
INTERRUPTED = "interrupted: the job ended before this trial finished"


# ------------------------------------------------------------------------------ Ray itself
@contextlib.contextmanager
def ray_session(address: str | None = None) -> Iterator[dict[str, bool]]:
    """Ray for the duration of a study; yields ``{"embedded": bool, "owned": bool}`` (``owned``:
    started or connected here, so shut down or disconnected at the end)."""
    import ray

    # Trials run in the job's working directory (relative data paths keep working), and Tune
    # writes no per-trial result logs: results go to the SQL store.
    os.environ["RAY_CHDIR_TO_TRIAL_DIR"] = "0"
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    if ray.is_initialized():  # the caller (a test, a notebook) owns Ray
        yield {"embedded": False, "owned": False}
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        info = {"embedded": False, "owned": True}
    else:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(address="local", include_dashboard=False, log_to_driver=True)
        info = {"embedded": True, "owned": True}
    try:
        yield info
    finally:
        ray.shutdown()


def check_resources(cpu: float, gpu: float, embedded: bool) -> None:
    """An embedded Ray that cannot fit one trial would wait forever: say so instead."""
    import ray

    from .config import ConfigError

    if not embedded:  # a cluster may autoscale to fit
        return
    total = ray.cluster_resources()
    if gpu > total.get("GPU", 0):
        raise ConfigError("resources.gpu", f"is {gpu:g} but this machine has {total.get('GPU', 0):g} GPUs; "
                          "set it to 0 here, or submit the study to a GPU cluster")
    if cpu > total.get("CPU", 0):
        raise ConfigError("resources.cpu", f"is {cpu:g} but this machine has {total.get('CPU', 0):g} CPUs")


def run_baseline(spec, cpu: float, gpu: float) -> dict[str, Any]:
    """The dense baseline in one Ray task with a trial's resources (same hardware as the trials)."""
    import ray

    from .trial import run_baseline as baseline

    task = ray.remote(num_cpus=cpu, num_gpus=gpu, max_retries=0)(baseline)
    try:
        return ray.get(task.remote(spec))
    except ray.exceptions.RayTaskError as exc:
        # A user error (unknown model, missing data file, bad evaluator) is one line, not a
        # remote traceback.
        from ffnskip.cli import user_errors

        from .config import ConfigError

        cause = getattr(exc, "cause", None)
        if isinstance(cause, (*user_errors(), ConfigError)):
            raise cause from None
        raise


# ------------------------------------------------------------------------------ Optuna
def make_sampler(cfg, *, seed: int):
    import optuna

    # Constraints need no constraints_func: Optuna >= 5 samplers read the values that
    # _Search sets on each trial with Trial.set_constraint.
    if cfg.sampler == "nsga2":
        population = cfg.population_size or max(4, min(50, cfg.trials // 3))
        return optuna.samplers.NSGAIISampler(population_size=population, seed=seed)
    startup = cfg.startup_trials or min(10, max(2, cfg.trials // 3))
    return optuna.samplers.TPESampler(n_startup_trials=startup, seed=seed)


def fail_stale_optuna_trials(url: str, study_name: str, finished: dict[int, Any] | None = None,
                             objectives: list[str] | None = None, max_quality_drop: float | None = None) -> dict[str, int]:
    """Optuna trials left RUNNING by a killed job: one the store holds as finished (``finished``:
    stored trial records by Optuna number; the job died between writing the store and telling
    Optuna) is told to Optuna as the store has it (COMPLETE with its values and constraint, or
    PRUNED); the others become FAIL (they will never report). Returns ``{"failed", "told"}``."""
    import optuna
    from optuna.trial import TrialState

    storage = optuna_storage(url)
    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        return {"failed": 0, "told": 0}
    out = {"failed": 0, "told": 0}
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        row = (finished or {}).get(t.number)
        values = [getattr(row, m, None) for m in objectives or ()] if row is not None else []
        if row is not None and row.status == "pruned":
            study.tell(t.number, state=TrialState.PRUNED)
            out["told"] += 1
        elif row is not None and row.status == "completed" and values and None not in values:
            trial = optuna.trial.Trial(study, t._trial_id)
            trial.set_constraint("quality_drop", constraint_value(row.quality_drop, max_quality_drop))
            for key in ("quality_drop", "quality_drop_high", "skip_ratio_post_warmup", "speedup", "speedup_low", "n",
                        "node"):
                if getattr(row, key, None) is not None:
                    trial.set_user_attr(key, getattr(row, key))
            study.tell(t.number, [float(v) for v in values], state=TrialState.COMPLETE)
            out["told"] += 1
        else:
            storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
            out["failed"] += 1
    return out


def optuna_study_exists(url: str, study_name: str) -> bool:
    import optuna

    return study_name in optuna.get_all_study_names(storage=optuna_storage(url))


def optuna_trial_count(url: str, study_name: str) -> int:
    import optuna

    try:
        return len(optuna.load_study(study_name=study_name, storage=optuna_storage(url)).trials)
    except KeyError:
        return 0


def _make_search_class():
    from ray.tune.search.optuna import OptunaSearch

    class _Search(OptunaSearch):
        """OptunaSearch that records the quality constraint and a few facts on each Optuna trial."""

        def __init__(self, *args, max_quality_drop: float | None = None, **kwargs):
            self._max_quality_drop = max_quality_drop
            super().__init__(*args, **kwargs)

        def optuna_number(self, trial_id: str) -> int | None:
            ot = self._ot_trials.get(trial_id)
            return None if ot is None else ot.number

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
            ot = self._ot_trials.get(trial_id)
            if (ot is not None and result and not error and result.get("final") is False
                    and trial_id not in self._completed_trials):
                # Stopped by successive halving: its values are on part of the samples, not
                # comparable with the completed trials', so Optuna learns only that it was pruned.
                from optuna.trial import TrialState

                ot.set_user_attr("stopped_at_samples", result.get("rung_samples"))
                ot.set_user_attr("asha_score", result.get("asha_score"))
                try:
                    self._ot_study.tell(ot, state=TrialState.PRUNED)
                except Exception as exc:  # noqa: BLE001 - as OptunaSearch does for its own tell
                    log.warning("optuna: %s", exc)
                self._completed_trials.add(trial_id)
                return
            if ot is not None and result and not error and "quality_drop" in result:
                if self._max_quality_drop is not None:
                    ot.set_constraint("quality_drop", constraint_value(result["quality_drop"], self._max_quality_drop))
                for key in ("quality_drop", "quality_drop_high", "skip_ratio_post_warmup", "speedup", "speedup_low", "n",
                            "node"):
                    if result.get(key) is not None:
                        ot.set_user_attr(key, result[key])
            super().on_trial_complete(trial_id, result=result, error=error)

    return _Search


# ------------------------------------------------------------------------------ the store side
def _parse_time(text: str | None) -> datetime | None:
    try:
        return datetime.fromisoformat(text) if text else None
    except ValueError:
        return None


def error_text(trial) -> str:
    """``Type: message`` of what a trial raised (or how its worker died), then the traceback.

    Read from the trial's local error files (written before Tune calls ``on_trial_error``; the
    copies under ``storage_path`` appear only after the next sync).
    """
    import ray.cloudpickle as cloudpickle
    from ray.exceptions import RayActorError, RayTaskError

    err = body = None
    try:
        if trial.pickled_error_file and os.path.isfile(trial.pickled_error_file):
            with open(trial.pickled_error_file, "rb") as f:
                err = cloudpickle.load(f)
    except Exception:  # an unpicklable error: the text file below still has it
        err = None
    try:
        if trial.error_file and os.path.isfile(trial.error_file):
            with open(trial.error_file, encoding="utf-8", errors="replace") as f:
                body = f.read()
    except OSError:
        body = None
    head = None
    if isinstance(err, RayTaskError) and getattr(err, "cause", None) is not None:
        head = f"{type(err.cause).__name__}: {err.cause}"
    elif isinstance(err, RayActorError):
        head = "worker died: " + (str(err).strip().splitlines() or ["RayActorError"])[0]
    elif err is not None:
        head = f"{type(err).__name__}: {err}"
    body = (body or "").strip()[-MAX_ERROR_CHARS:]  # the traceback's tail is the useful part
    return "\n\n".join(x for x in (head, body) if x) or "the trial failed without an error message"


def _make_callback_class():
    from ray import tune

    class StoreCallback(tune.Callback):
        """Writes every trial to the store as it starts, completes or fails; prints progress."""

        def __init__(self, store: Store, study_id: int, search, *, seed: int, total: int, done_before: int,
                     echo: Callable[[str], None], fmt: Callable[[dict], str], status_every_s: float = 60.0,
                     reduction_factor: float = 2.0):
            self.store, self.study_id, self.search, self.seed = store, study_id, search, seed
            self.echo, self.fmt = echo, fmt
            self.rows: dict[str, int] = {}
            self.finished: set[str] = set()
            self.last: dict[str, tuple] = {}  # a running trial's last rung: (result, values, metrics)
            self.history: dict[str, list] = {}  # per trial: one summary per rung so far
            self.started: dict[str, Any] = {}  # when a trial's first rung started
            self.total, self.done_before = total, done_before
            self.completed = self.failed = self.pruned = 0
            self.reduction_factor = reduction_factor
            self.status_every_s = status_every_s
            self._last_status = time.monotonic()

        # ---------------------------------------------------------------- helpers
        def _label(self, trial) -> str:
            row = self.rows.get(trial.trial_id)
            return f"trial {row}" if row else f"trial {trial.trial_id}"

        def _row(self, trial) -> int:
            if trial.trial_id not in self.rows:  # an error before the trial started
                self.on_trial_start(0, [], trial)
            return self.rows[trial.trial_id]

        def _progress(self) -> str:
            done = self.done_before + self.completed + self.pruned
            return (f"[{done}/{self.total} finished" + (f", {self.pruned} stopped early" if self.pruned else "")
                    + f", {self.failed} failed]")

        # ---------------------------------------------------------------- Tune hooks
        def on_trial_start(self, iteration, trials, trial, **info):
            if trial.trial_id in self.rows:
                return
            try:
                policy = policy_from_params(trial.config, seed=self.seed).to_dict()
                shown = _policy_brief(policy)
            except Exception as exc:  # an invalid start point: keep what was asked for
                policy = {"mode": "adaptive", "seed": self.seed, **{k: v for k, v in trial.config.items()}}
                shown = f"{policy} (invalid: {exc})"
            self.rows[trial.trial_id] = self.store.start_trial(
                self.study_id, policy, ray_trial_id=trial.trial_id,
                optuna_number=self.search.optuna_number(trial.trial_id),
            )
            self.echo(f"{self._label(trial)} started: {shown}")

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if trial.trial_id in self.finished or "quality" not in result:
                return
            row = self._row(trial)
            values = {k: result.get(k) for k in METRIC_COLUMNS}
            report = result.get("report") or {}
            history = self.history.setdefault(trial.trial_id, [])
            history.append({"samples": result.get("rung_samples"), "asha_score": result.get("asha_score"),
                            "seconds": (report.get("settings") or {}).get("seconds"),
                            **{k: values.get(k) for k in ("quality_drop", "quality_drop_high", "speedup", "speedup_low")}})
            metrics = {**report,
                       "worker": {k: result.get(k) for k in ("node", "pid", "model_loads")},
                       "rung": {k: result.get(k) for k in ("rung", "rung_samples", "rung_index", "rungs", "asha_score")},
                       "rungs": list(history)}
            final = result.get("final", True)
            if final:
                self.store.complete_trial(
                    row, values=values, metrics=metrics, samples=result.get("samples") or [],
                    node=result.get("node"), started_at=self.started.get(trial.trial_id) or _parse_time(result.get("started_at")),
                    finished_at=_parse_time(result.get("finished_at")),
                )
                self.finished.add(trial.trial_id)
                self.completed += 1
                self.echo(f"{self._label(trial)} completed: {self.fmt(values)} {self._progress()}")
                return
            self.started.setdefault(trial.trial_id, _parse_time(result.get("started_at")))
            if result.get("done"):  # the scheduler stopped it on this rung
                self._prune(trial, result, values, metrics)
                return
            self.last[trial.trial_id] = (result, values, metrics)
            self.store.update_trial(row, values=values, metrics=metrics, node=result.get("node"))
            self.echo(f"{self._label(trial)} rung {result.get('rung_index', 0) + 1}/{result.get('rungs')} "
                      f"({result.get('rung_samples')} samples, score {result.get('asha_score', 0):.3f}): "
                      f"{self.fmt(values)}")

        def _prune(self, trial, result, values, metrics) -> None:
            if trial.trial_id in self.finished:
                return
            n = result.get("rung_samples")
            score = result.get("asha_score")
            reason = (f"stopped early by successive halving after rung {result.get('rung_index', 0) + 1} of "
                      f"{result.get('rungs')} ({n} samples): its score {score:.3f} (the skip ratio within the quality "
                      "drop, else minus the excess drop) was outside the best 1/"
                      f"{self.reduction_factor:g} of the trials that reached that rung")
            self.store.prune_trial(
                self._row(trial), reason, values=values, metrics=metrics, samples=result.get("samples") or [],
                node=result.get("node"), started_at=self.started.get(trial.trial_id),
                finished_at=_parse_time(result.get("finished_at")),
            )
            self.finished.add(trial.trial_id)
            self.pruned += 1
            self.echo(f"{self._label(trial)} stopped early after {n} samples: {self.fmt(values)} {self._progress()}")

        def _fail(self, trial, text: str, shown: str, node: str | None = None) -> None:
            """Record ``trial`` as failed with ``text``, once; print ``shown``."""
            if trial.trial_id in self.finished:
                return
            self.store.fail_trial(self._row(trial), text, node=node)
            self.finished.add(trial.trial_id)
            self.failed += 1
            self.echo(f"{self._label(trial)} FAILED: {shown} {self._progress()}")

        def on_trial_error(self, iteration, trials, trial, **info):
            if trial.trial_id in self.finished:
                return
            text = error_text(trial)
            self._fail(trial, text, text.splitlines()[0], node=getattr(trial, "node_ip", None))

        def on_trial_complete(self, iteration, trials, trial, **info):
            last = self.last.get(trial.trial_id)
            if last is not None and trial.trial_id not in self.finished:  # stopped after a rung
                self._prune(trial, *last)
                return
            self._fail(trial, "the trial ended without reporting a result", "no result")

        def on_step_end(self, iteration, trials, **info):
            now = time.monotonic()
            if now - self._last_status < self.status_every_s:
                return
            self._last_status = now
            running = sum(1 for t in trials if t.status == "RUNNING")
            pending = sum(1 for t in trials if t.status == "PENDING")
            self.echo(f"... {running} running, {pending} pending {self._progress()}")

        def __getstate__(self):  # Tune pickles its callbacks with the experiment state
            state = self.__dict__.copy()
            state.update(store=None, echo=None, fmt=None, last={}, history={})
            return state

        def unfinished_rows(self) -> list[int]:
            return [row for tid, row in self.rows.items() if tid not in self.finished]

    return StoreCallback


def _policy_brief(p: dict) -> str:
    return (
        f"threshold={p['threshold']:.4f} warmup={p['warmup_tokens']} layers=[{p['layer_start']},{p['layer_end']}) "
        f"budget={p['skip_budget']} dense_every={p['dense_every']}"
    )


# ------------------------------------------------------------------------------ the search
def _trainable(config: dict, spec=None, context=None) -> None:
    from ray import tune

    from .trial import run_rungs

    for result in run_rungs(spec, config, context):  # successive halving may stop us after any rung
        tune.report(result)


def make_scheduler(cfg, rungs: list | None):
    """Ray Tune's ASHA over the rungs (``None`` without successive halving)."""
    if cfg.scheduler is None or not rungs or len(rungs) < 2:
        return None
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(time_attr="rung", metric="asha_score", mode="max", grace_period=cfg.scheduler.min_samples,
                         max_t=rungs[-1][0], reduction_factor=cfg.scheduler.reduction_factor)


def run_search(*, cfg, spec, context: dict[str, Any], bounds: dict[str, Any], store: Store, url: str,
               study_id: int, study_name: str, num_samples: int, directions: list[str], seed: int,
               start_points: list[dict] | None, total: int, done_before: int,
               echo: Callable[[str], None], fmt: Callable[[dict], str], storage_path: str | None = None) -> dict:
    """Run ``num_samples`` trials with Ray Tune; every trial lands in the store. Returns counts."""
    from ray import tune

    Search = _make_search_class()
    search = Search(
        space=functools.partial(suggest, space=bounds),
        metric=list(cfg.objectives), mode=list(directions),
        sampler=make_sampler(cfg, seed=seed), study_name=study_name, storage=optuna_storage(url),
        points_to_evaluate=start_points or None, max_quality_drop=cfg.max_quality_drop,
    )
    callback = _make_callback_class()(
        store, study_id, search, seed=cfg.seed, total=total, done_before=done_before, echo=echo, fmt=fmt,
        reduction_factor=cfg.scheduler.reduction_factor if cfg.scheduler is not None else 2.0,
    )
    trainable = tune.with_resources(
        tune.with_parameters(_trainable, spec=spec, context=context),
        {"cpu": cfg.resources.cpu, "gpu": cfg.resources.gpu},
    )
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=search, scheduler=make_scheduler(cfg, context.get("rungs")), num_samples=num_samples,
            max_concurrent_trials=cfg.concurrency, reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=f"{study_name}-{time.strftime('%Y%m%d-%H%M%S')}",
            storage_path=storage_path,
            verbose=0,
            callbacks=[callback],
            failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
        ),
    )
    # Tune's result files are off (the store has everything): do not warn that they are missing.
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
    started = time.monotonic()
    try:
        tuner.fit()
    finally:
        # Whatever did not finish (Ctrl-C, a crash of the driver loop) is not left "running".
        left = callback.unfinished_rows()
        if left:
            store.fail_running_trials(study_id, INTERRUPTED, ids=left)
    return {"completed": callback.completed, "failed": callback.failed, "pruned": callback.pruned,
            "seconds": time.monotonic() - started}
