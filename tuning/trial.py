"""What a worker does: load the model once per process, evaluate a policy, return plain data.

Plain Python, no Ray: the Ray glue (:mod:`tuning.ray_runner`) calls :func:`run_baseline` in a
Ray task and :func:`run_trial` in Ray Tune's trial actors, and the tests call both directly.

Model once per worker: Ray Tune runs trials in actors, and the study reuses them
(``TuneConfig(reuse_actors=True)``: every trial asks for the same resources), so a module-level
cache in the actor's process keeps the model across the trials that actor runs. A worker that
dies takes its cache with it; its replacement loads the model again.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
import platform
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from .store import utcnow

log = logging.getLogger(__name__)

#: (model, dtype, device) -> (model, tokenizer), one entry per worker process in practice.
_MODELS: dict[tuple, tuple[Any, Any]] = {}
#: The process's dense cache (see :func:`_process_cache`).
_CACHE = None
#: Baseline dense-cache payloads already copied into this process's cache (by their keys).
_SEEDED: set[int] = set()
#: How many times this process loaded a model (the end-to-end test checks it).
LOADS = {"count": 0}


@dataclass(frozen=True)
class EvalSpec:
    """Everything a worker needs to evaluate a policy the way the study does."""

    model: str
    task: str
    limit: int | None = None
    seed: int = 0
    dtype: str | None = None
    device: str | None = None
    data_file: str | None = None
    fields: tuple[tuple[str, str], ...] | None = None
    data_dir: str | None = None
    chat: bool | None = None
    max_new_tokens: int | None = None
    batch_size: int = 1
    evaluator: str = "ffnskip.eval:evaluate"
    progress: bool = True
    threads: int = 1
    score_nll: bool = True
    """The teacher-forced ``nll_vs_dense`` (one more pass over every sample); off on the
    intermediate rungs of successive halving, whose reports only rank the trial."""
    measure_speed: bool = True
    """The alternating dense / policy speed runs (a fixed ~14 decodes per evaluation); off on the
    intermediate rungs: the speed-up is measured once, on the last rung, where it is judged."""

    @classmethod
    def from_config(cls, cfg, *, absolute_paths: bool = False) -> "EvalSpec":
        """From a :class:`~tuning.config.TuningConfig`. ``absolute_paths``: resolve relative local
        paths here (an embedded Ray, whose workers may run elsewhere in the file system)."""

        def path(p):
            if p and absolute_paths and Path(p).expanduser().exists():
                return str(Path(p).expanduser().resolve())
            return p

        return cls(
            model=path(cfg.model), task=cfg.task, limit=cfg.limit, seed=cfg.seed, dtype=cfg.dtype,
            device=cfg.device, data_file=path(cfg.data_file),
            fields=tuple(sorted(cfg.fields.items())) if cfg.fields else None,
            data_dir=path(cfg.data_dir), chat=cfg.chat, max_new_tokens=cfg.max_new_tokens,
            batch_size=cfg.batch_size, evaluator=cfg.evaluator, progress=cfg.progress,
            threads=max(1, int(cfg.resources.cpu)),
        )

    def evaluate_kwargs(self) -> dict[str, Any]:
        kwargs = {
            "limit": self.limit, "seed": self.seed, "data_file": self.data_file,
            "fields": dict(self.fields) if self.fields else None, "data_dir": self.data_dir,
            "chat": self.chat, "max_new_tokens": self.max_new_tokens, "batch_size": self.batch_size,
            "measure_speed": self.measure_speed, "progress": self.progress, "model_name": self.model,
        }
        if not self.score_nll:  # only when off: an evaluator without the argument keeps working otherwise
            kwargs["score_nll"] = False
        return kwargs


def load_evaluator(path: str) -> Callable:
    from .config import ConfigError

    module, _, name = path.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise ConfigError("evaluator", f"cannot import {path}: {exc}") from None
    if not callable(fn):
        raise ConfigError("evaluator", f"{path} is not callable")
    return fn


def get_model(spec: EvalSpec):
    """``(model, tokenizer)``, loaded at most once per process and spec."""
    import torch

    if torch.get_num_threads() != spec.threads:
        torch.set_num_threads(spec.threads)
    key = (spec.model, spec.dtype, spec.device)
    if key not in _MODELS:
        import ffnskip

        start = time.perf_counter()
        _MODELS.clear()  # one model per worker: a new spec replaces the old one
        _MODELS[key] = ffnskip.load_model(spec.model, dtype=spec.dtype, device=spec.device)
        LOADS["count"] += 1
        log.info("loaded %s in %.1f s (pid %d)", spec.model, time.perf_counter() - start, os.getpid())
    return _MODELS[key]


def node_name() -> str:
    return socket.gethostname()


def hardware(model=None) -> dict[str, Any]:
    """Where the evaluation runs: host, CPUs, torch threads, accelerator."""
    import torch

    info: dict[str, Any] = {
        "node": node_name(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
    }
    if model is not None:
        device = next(model.parameters()).device
        info["device"] = str(device)
        info["dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
        if device.type == "cuda":
            info["gpu"] = torch.cuda.get_device_name(device)
    return info


def model_facts(spec: EvalSpec, model) -> dict[str, Any]:
    """Depth, architecture and file hash of the loaded model."""
    from ffnskip import get_adapter

    facts: dict[str, Any] = {
        "num_layers": len(get_adapter(model).layers(model)),
        "model_type": getattr(model.config, "model_type", None),
        "model_hash": None,
    }
    try:
        from ffnskip.loading import file_sha256, resolve_model

        info = resolve_model(spec.model)
        facts["model_hash"] = info.file_hash
        if info.file_hash is None and info.kind == "hf_dir":
            weights = sorted(Path(info.source).glob("*.safetensors")) or sorted(Path(info.source).glob("*.bin"))
            if weights:
                facts["model_hash"] = file_sha256(weights)
    except Exception as exc:  # the hash is provenance, not a reason to fail the study
        log.warning("could not hash model %s: %s", spec.model, exc)
    return facts


def _evaluate(spec: EvalSpec, policy, dense_cache):
    model, tokenizer = get_model(spec)
    evaluate = load_evaluator(spec.evaluator)
    report = evaluate(model, tokenizer, policy, spec.task, dense_cache=dense_cache, **spec.evaluate_kwargs())
    return model, report


def _process_cache():
    """This process's dense cache (memory + the default disk directory), remembering every entry
    it served so the baseline can hand its dense decodes to the trials."""
    global _CACHE
    if _CACHE is None:
        from ffnskip.eval import DenseCache, default_dense_cache_dir

        class StudyCache(DenseCache):
            def __init__(self):
                super().__init__(default_dense_cache_dir())
                self.entries: dict[str, dict] = {}

            def get(self, key):
                value = super().get(key)
                if value is not None:
                    self.entries[key] = value
                return value

            def put(self, key, value):
                super().put(key, value)
                self.entries[key] = value

            def seed(self, entries: dict[str, dict]) -> None:
                """Add another process's entries (not counted as hits or misses)."""
                for key, value in entries.items():
                    self.put(key, value)

        _CACHE = StudyCache()
    return _CACHE


def _trial_cache(entries: dict[str, Any] | None):
    """The process cache holding the study baseline's dense decodes: a trial decodes only its own
    policy, whichever worker (or node) it runs on."""
    cache = _process_cache()
    tag = hash(frozenset(entries)) if entries else None
    if tag is not None and tag not in _SEEDED:
        cache.seed(entries)
        _SEEDED.add(tag)
    return cache


def run_baseline(spec: EvalSpec) -> dict[str, Any]:
    """The study's dense baseline: the dense policy on the study's data, measured once.

    Returns the report, the dense cache entries it used (``dense_cache``: handed to every trial
    and stored with the baseline), the model's depth and hash, and the hardware.
    """
    from ffnskip import SkipPolicy

    started = time.perf_counter()
    cache = _process_cache()
    cache.entries = {}
    model, report = _evaluate(spec, SkipPolicy.dense(), cache)
    out = {
        "report": report.to_dict(),
        "samples": list(report.samples),
        "data_fingerprint": report.data_fingerprint,
        "dense_cache": cache.entries,
        "hardware": hardware(model),
        "node": node_name(),
        "duration_s": time.perf_counter() - started,
    }
    out.update(model_facts(spec, model))
    return out


def run_trial(spec: EvalSpec, params: dict[str, Any], context: dict[str, Any]) -> dict[str, Any]:
    """Evaluate one trial's policy; returns the objective values, the report and the samples.

    ``context``: ``quality`` (:class:`~tuning.objectives.QualitySpec` as a dict),
    ``baseline_quality``, ``baseline_tokens_per_s`` and optionally ``dense_cache`` (the
    baseline's dense results, so a trial decodes only its own policy).
    """
    from .objectives import QualitySpec, asha_score, trial_values
    from .space import policy_from_params

    started = utcnow()
    policy = policy_from_params(params, seed=spec.seed)
    _, report = _evaluate(spec, policy, _trial_cache(context.get("dense_cache")))
    data = report.to_dict()
    values = trial_values(
        data, QualitySpec(**context["quality"]), context.get("baseline_quality"), context.get("baseline_tokens_per_s")
    )
    if not spec.measure_speed:  # the evaluation passes' speeds (dense from the cache) are no speed-up
        values.update(tokens_per_s=None, speedup=None, speedup_low=None, speedup_high=None)
    return {
        **values,
        "asha_score": asha_score(values, context.get("max_quality_drop")),
        "policy": policy.to_dict(),
        "report": data,
        "samples": list(report.samples),
        "node": node_name(),
        "pid": os.getpid(),
        "model_loads": LOADS["count"],
        "started_at": started.isoformat(),
        "finished_at": utcnow().isoformat(),
    }


def run_rungs(spec: EvalSpec, params: dict[str, Any], context: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """:func:`run_trial` on each rung of successive halving, smallest first: one result per rung,
    with ``rung`` (what the scheduler reads: ASHA's milestone), ``rung_samples``, ``rungs`` and
    ``final`` (the last rung: the study's own ``limit``, so a trial that is not stopped ends with
    exactly the result it would have had without the scheduler).

    ``context["rungs"]``: ``[(t, samples), ...]`` (:meth:`tuning.config.Scheduler.rungs`) or
    ``None`` for one rung on all samples. The dense decodes of every rung come from the baseline's
    cache; only the policy's are decoded again on the larger rung. The rungs before the last skip
    what nothing ranks on there: the teacher-forced ``nll_vs_dense`` and the speed runs (the
    speed-up is measured on the last rung, where the recommendation judges it), so a trial stopped
    after its first rung costs a few decodes, not a full evaluation."""
    rungs = context.get("rungs") or [(None, spec.limit)]
    for i, (t, samples) in enumerate(rungs):
        final = i == len(rungs) - 1
        rung_spec = spec if final else dataclasses.replace(spec, limit=int(samples), score_nll=False,
                                                           measure_speed=False)
        out = run_trial(rung_spec, params, context)
        out.update(rung=float(t if t is not None else (out.get("n") or 1)), rung_samples=out.get("n"), rung_index=i,
                   rungs=len(rungs), final=final)
        yield out
