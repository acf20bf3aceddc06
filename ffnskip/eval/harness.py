"""The evaluation harness's entry point :func:`evaluate`: one task, one model, one skip policy,
against the same model's dense decoding, in plain Python (no Ray). Used by ``ffnskip evaluate``,
the tuning service and tests.

For every selected sample :func:`evaluate`

1. decodes it densely (greedy), through the dense cache (:class:`~ffnskip.eval.cache.DenseCache`:
   per model, prompt tokens and decode settings, in memory and optionally on disk), so a tuning
   run decodes each sample densely only once;
2. decodes it with the policy, through the one decode path (:func:`ffnskip.decode.generate`);
3. scores both outputs with the task's metrics (``accuracy``, ``rouge_l``, ...) and the
   degeneration metrics (``repetition``: share of repeated word 4-grams; ``collapsed``: outputs
   that loop, see :func:`ffnskip.eval.metrics.is_collapsed`);
4. measures what skipping changed against dense: ``answer_agreement`` (normalised outputs equal),
   ``rouge_l_vs_dense``, ``first_divergence`` (index of the first differing generated token;
   identical outputs count their full length, ``diverged`` is the share that differ at all) and
   ``nll_vs_dense``: the mean negative log-likelihood per token that the policy gives to the dense
   continuation, teacher-forced by :func:`~ffnskip.eval.teacher.score_continuation`, which drives
   the :class:`~ffnskip.engine.SkipController` exactly as generation does (prefill dense, then
   ``begin_step(t)`` for generated token ``t``). ``dense["nll_vs_dense"]`` is the dense model's
   own NLL of its continuation, the floor to compare against.

Speed (``tokens_per_s`` of dense and of the policy, ``speedup``) is measured separately in the
same process: after one warm-up decode of each, a few prompts are decoded by dense and the policy
alternately (:func:`~ffnskip.eval.speed.measure_speed`). Without it (``measure_speed=False``),
the speeds of the evaluation passes themselves are reported (the dense one possibly from the
cache).

The perplexity task (:mod:`ffnskip.eval.perplexity`) decodes WikiText-2 windows token by token
with the same teacher-forced function.
"""

from __future__ import annotations

import os
import time
from typing import Sequence

from torch import nn

from ..policy import SkipPolicy
from .cache import DenseCache, default_dense_cache
from .generation import run_generation
from .identity import model_fingerprint
from .judge import run_judge
from .perplexity import run_perplexity
from .report import EvalReport
from .speed import run_speed
from .stats import vs_dense
from .tasks import EvalError, Task, fingerprint, get_task

__all__ = ["evaluate"]


def _as_policy(model, tokenizer, policy, data_dir) -> SkipPolicy:
    """A SkipPolicy, a dict or JSON text (:func:`ffnskip.policy.parse_policy`), measured for
    this model where it is an unmeasured shortgpt policy."""
    from ..baselines import measured
    from ..policy import parse_policy

    return measured(model, tokenizer, parse_policy(policy), data_dir)


def _check_int(name: str, value, minimum: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise EvalError(f"{name} must be an integer >= {minimum}; got {value!r}")


def evaluate(
    model: nn.Module,
    tokenizer,
    policy: SkipPolicy | dict | str | None = None,
    task: str | Task = "factoid_qa",
    *,
    limit: int | None = None,
    seed: int = 0,
    data_file: str | os.PathLike | None = None,
    fields: Sequence[str] | dict[str, str] | None = None,
    data_dir: str | os.PathLike | None = None,
    chat: bool | None = None,
    max_new_tokens: int | None = None,
    batch_size: int = 1,
    dense_cache: DenseCache | None | bool = None,
    measure_speed: bool = True,
    progress: bool = True,
    model_name: str | None = None,
    judge=None,
    speed_items: int = 3,
    speed_rounds: int = 2,
    score_nll: bool = True,
) -> EvalReport:
    """Evaluate ``policy`` on ``task`` against the same model's dense decoding.

    * ``policy``: a :class:`SkipPolicy` (or its dict / JSON); ``None`` is the default policy.
      A ``{"mode": "shortgpt"}`` dict without ``layers`` gets them from the block-influence
      profile (:func:`ffnskip.baselines.measured`, ``skip_budget`` layers).
    * ``limit`` / ``seed``: a deterministic subset (``perplexity``: ``limit`` counts tokens).
    * ``data_file`` / ``fields``: a user file (JSONL, JSON array or CSV) and ``{"answer":
      "column"}`` (or ``["answer=column"]``) mappings; ``data_dir`` overrides the shared data.
    * ``chat``: ``None`` is the task's default (factoid_qa: method.md's raw prompt;
      summarization and conversation: the chat template when the tokenizer has one).
    * ``max_new_tokens``: ``None`` is the task's default (factoid 24, summarization 200,
      conversation 256 per turn, perplexity window 256).
    * ``dense_cache``: a :class:`DenseCache`, ``None`` for the process-wide default, ``False``
      for none.
    * ``judge``: a :class:`ffnskip.eval.judge.JudgeConfig` (conversation and summarization only).
    * ``measure_speed``: the alternating dense / policy speed runs (``speed_items`` prompts,
      ``speed_rounds`` rounds); ``score_nll``: the teacher-forced ``nll_vs_dense`` (one more
      decode of every sample with the policy; ``None`` in the report when off).
    """
    t_start = time.perf_counter()
    task_obj = task if isinstance(task, Task) else get_task(str(task))
    _check_int("limit", limit, 1, allow_none=True)
    _check_int("seed", seed, 0)
    _check_int("batch_size", batch_size, 1)
    _check_int("max_new_tokens", max_new_tokens, 1, allow_none=True)
    if judge is not None and task_obj.name not in ("conversation", "summarization"):
        raise EvalError(f"the judge scores conversation and summarization only, not {task_obj.name}")
    if dense_cache is False:
        cache = None
    elif dense_cache is None:
        cache = default_dense_cache()
    elif isinstance(dense_cache, DenseCache):
        cache = dense_cache
    else:
        raise EvalError(f"dense_cache must be a DenseCache, None (the default cache) or False; got {dense_cache!r}")
    hits0, misses0 = (cache.hits, cache.misses) if cache is not None else (0, 0)

    from ..adapters import get_adapter

    num_layers = len(get_adapter(model).layers(model))
    policy = _as_policy(model, tokenizer, policy, data_dir)
    policy.resolve(num_layers)  # fail early with the field's name

    samples = task_obj.load(
        data_dir=data_dir, data_file=data_file, fields=fields, tokenizer=tokenizer, limit=limit, seed=seed,
        max_new_tokens=max_new_tokens,
    )
    if not samples:
        raise EvalError(f"task {task_obj.name}: no samples selected")
    has_template = bool(getattr(tokenizer, "chat_template", None))
    use_chat = (task_obj.default_chat if chat is None else bool(chat)) and has_template
    new_tokens = max_new_tokens or task_obj.default_max_new_tokens
    model_fp = model_fingerprint(model)
    name = model_name or str(getattr(model.config, "_name_or_path", "") or type(model).__name__)

    if task_obj.kind == "perplexity":
        run = run_perplexity(model, tokenizer, policy, task_obj, samples, cache, model_fp, progress)
    else:
        run = run_generation(model, tokenizer, policy, task_obj, samples, use_chat, new_tokens, batch_size,
                             cache, model_fp, progress, score_nll)

    # ------------------------------------------------------------------ judge
    judge_info = None
    primary_name = task_obj.primary
    if judge is not None:
        judged = run_judge(judge, task_obj, samples, run, data_dir, progress)
        judged.add_to(run)
        judge_info = judged.info
        primary_name = "judge_score"

    # ------------------------------------------------------------------ speed
    speed = {"method": "evaluation-pass"}
    if measure_speed:
        speed = run_speed(model, tokenizer, policy, task_obj, run, new_tokens, speed_items, speed_rounds, progress)
    dense_tps = speed.get("dense_tokens_per_s") if measure_speed else run.dense_pass_tps
    skip_tps = speed.get("skip_tokens_per_s") if measure_speed else run.skip_pass_tps
    if not measure_speed:
        speed.update({"dense_tokens_per_s": dense_tps, "skip_tokens_per_s": skip_tps,
                      "note": "speeds of the evaluation passes; the dense one may come from the cache"})
    run.dense["tokens_per_s"] = dense_tps
    run.skip["tokens_per_s"] = skip_tps
    speedup = skip_tps / dense_tps if dense_tps and skip_tps else None

    settings = {
        "max_new_tokens": new_tokens,
        "chat": use_chat,
        "stop": list(task_obj.stop),
        "batch_size": batch_size,
        "limit": limit,
        "seed": seed,
        "data": str(data_file) if data_file is not None else "default",
        "data_dir": str(data_dir) if data_dir else None,
        "greedy": True,
        "dense_cache": {"hits": cache.hits - hits0, "misses": cache.misses - misses0,
                        "disk": str(cache.disk_dir) if cache.disk_dir else None} if cache is not None else None,
        "seconds": round(time.perf_counter() - t_start, 3),
    }
    return EvalReport(
        task=task_obj.name,
        model=name,
        n=len(samples),
        policy=policy.to_dict(),
        primary={"name": primary_name, "higher_is_better": task_obj.higher_is_better if primary_name != "judge_score" else True},
        dense=run.dense,
        skip=run.skip,
        speedup=speedup,
        data_fingerprint=fingerprint(samples),
        settings=settings,
        speed=speed,
        judge=judge_info,
        vs_dense=vs_dense(run.samples),
        speedup_ci95=speed.get("speedup_ci95") if measure_speed else None,
        samples=run.samples,
    )

