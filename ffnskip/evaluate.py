"""The evaluation harness: one task, one model, one skip policy, against the same model's dense
decoding, in plain Python (no Ray). Used by ``ffnskip evaluate``, the tuning service and tests.

For every selected sample :func:`evaluate`

1. decodes it densely (greedy), through the dense cache (:class:`DenseCache`: per model, prompt
   tokens and decode settings, in memory and optionally on disk), so a tuning run decodes each
   sample densely only once;
2. decodes it with the policy, through the one decode path (:func:`ffnskip.decode.generate`);
3. scores both outputs with the task's metrics (``accuracy``, ``rouge_l``, ...) and the
   degeneration metrics (``repetition``: share of repeated word 4-grams; ``collapsed``: outputs
   that loop, see :func:`ffnskip.metrics.is_collapsed`);
4. measures what skipping changed against dense: ``answer_agreement`` (normalised outputs equal),
   ``rouge_l_vs_dense``, ``first_divergence`` (index of the first differing generated token;
   identical outputs count their full length, ``diverged`` is the share that differ at all) and
   ``nll_vs_dense``: the mean negative log-likelihood per token that the policy gives to the dense
   continuation, teacher-forced by :func:`score_continuation`, which drives the
   :class:`~ffnskip.engine.SkipController` exactly as generation does (prefill dense, then
   ``begin_step(t)`` for generated token ``t``). ``dense["nll_vs_dense"]`` is the dense model's
   own NLL of its continuation, the floor to compare against.

Speed (``tokens_per_s`` of dense and of the policy, ``speedup``) is measured separately in the
same process: after one warm-up decode of each, a few prompts are decoded by dense and the policy
alternately (:func:`measure_speed`). Without it (``measure_speed=False``), the speeds of the
evaluation passes themselves are reported (the dense one possibly from the cache).

The perplexity task decodes WikiText-2 windows token by token with the same teacher-forced
function; its "outputs" are the greedy next-token predictions at each position, so the fidelity
metrics compare the policy's predictions with dense's (``answer_agreement`` is then the share of
positions whose top-1 token equals dense's).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sys
import tempfile
import threading
import time
import types
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from . import metrics
from .decode import SamplingParams, context_length, decode_one_token, encode_prompt, generate, new_cache, prefill
from .engine import SeqStats, SkipController

try:  # the lean decode step (the lead's ffnskip.fastpath); the model's own forward otherwise
    from .fastpath import FastDecoder
except ImportError:  # pragma: no cover
    FastDecoder = None
from .policy import SkipPolicy
from .tasks import EvalError, Sample, Task, fingerprint, get_task

log = logging.getLogger(__name__)

__all__ = [
    "DenseCache",
    "EvalReport",
    "TeacherForced",
    "default_dense_cache",
    "evaluate",
    "measure_speed",
    "model_fingerprint",
    "score_continuation",
]

CACHE_FORMAT = 1
SPEED_MAX_TOKENS = 64
"""Tokens per speed run at most (the task's ``max_new_tokens`` when smaller)."""
ENV_DENSE_CACHE = "FFNSKIP_DENSE_CACHE"
"""``off`` / ``memory`` keeps the default dense cache in memory only; a path puts it there."""


# ====================================================================== identities
def model_fingerprint(model: nn.Module) -> str:
    """A cheap identity of a model's weights and numerics: config, dtype, device, and the shape,
    sum and first values of a few parameter tensors (first, middle, last)."""
    h = hashlib.sha256()
    cfg = model.config.to_dict()
    cfg.pop("_name_or_path", None)
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    params = [p for _, p in model.named_parameters()]
    if params:
        h.update(f"{params[0].dtype}|{params[0].device.type}|{len(params)}".encode())
        for i in sorted({0, len(params) // 2, len(params) - 1}):
            p = params[i].detach().reshape(-1)
            h.update(f"{tuple(params[i].shape)}|{float(p.float().sum()):.8e}".encode())
            h.update(p[:1024].float().cpu().numpy().tobytes())
    return h.hexdigest()[:32]


_CODE_VERSION: str | None = None


def _code_version() -> str:
    """Versions that change a dense decode: the decode path's source, torch and transformers."""
    global _CODE_VERSION
    if _CODE_VERSION is None:
        import transformers

        h = hashlib.sha256(f"{CACHE_FORMAT}|{torch.__version__}|{transformers.__version__}".encode())
        here = Path(__file__).resolve().parent
        for name in ("decode.py", "engine.py", "fastpath.py", "sync.py"):
            try:
                h.update((here / name).read_bytes())
            except OSError:
                pass
        _CODE_VERSION = h.hexdigest()[:16]
    return _CODE_VERSION


# ====================================================================== dense cache
def default_dense_cache_dir() -> Path | None:
    env = os.environ.get(ENV_DENSE_CACHE, "").strip()
    if env.lower() in ("off", "0", "memory", "none", "false"):
        return None
    if env:
        return Path(env).expanduser()
    base = os.environ.get("FFNSKIP_CACHE_DIR")
    root = Path(base).expanduser() if base else Path.home() / ".cache" / "ffnskip"
    return root / "dense"


class DenseCache:
    """Dense decodes, keyed by model fingerprint, prompt token ids and decode settings.

    An LRU in memory (``max_entries``) in front of an optional directory of small JSON files
    (``disk_dir``), shared by every process that points at it; writes are atomic. Safe to share
    between threads.
    """

    def __init__(self, disk_dir: str | os.PathLike | None = None, max_entries: int = 20000):
        self.disk_dir = Path(disk_dir).expanduser() if disk_dir else None
        self.max_entries = max_entries
        self._lock = threading.Lock()
        self._mem: OrderedDict[str, dict] = OrderedDict()
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(*parts: Any) -> str:
        blob = json.dumps([_code_version(), *parts], sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(blob.encode()).hexdigest()

    def _path(self, key: str) -> Path | None:
        return self.disk_dir / key[:2] / f"{key}.json" if self.disk_dir else None

    def get(self, key: str) -> dict | None:
        with self._lock:
            if key in self._mem:
                self._mem.move_to_end(key)
                self.hits += 1
                return self._mem[key]
        path = self._path(key)
        if path is not None and path.is_file():
            try:
                value = json.loads(path.read_text())
            except (OSError, ValueError):
                value = None
            if isinstance(value, dict):
                self._remember(key, value)
                with self._lock:
                    self.hits += 1
                return value
        with self._lock:
            self.misses += 1
        return None

    def put(self, key: str, value: dict) -> None:
        self._remember(key, value)
        path = self._path(key)
        if path is None:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
            with os.fdopen(fd, "w") as f:
                json.dump(value, f)
            os.replace(tmp, path)
        except OSError as exc:  # a read-only cache only costs a recomputation
            log.warning("dense cache: cannot write %s: %s", path, exc)

    def _remember(self, key: str, value: dict) -> None:
        with self._lock:
            self._mem[key] = value
            self._mem.move_to_end(key)
            while len(self._mem) > self.max_entries:
                self._mem.popitem(last=False)

    def __len__(self) -> int:
        return len(self._mem)

    def __bool__(self) -> bool:  # an empty cache is still a cache
        return True


_DEFAULT_CACHE: DenseCache | None = None


def default_dense_cache() -> DenseCache:
    """The process-wide dense cache (memory + ``$FFNSKIP_CACHE_DIR/dense`` unless
    ``$FFNSKIP_DENSE_CACHE=off``)."""
    global _DEFAULT_CACHE
    if _DEFAULT_CACHE is None:
        _DEFAULT_CACHE = DenseCache(default_dense_cache_dir())
    return _DEFAULT_CACHE


# ====================================================================== teacher forcing
@dataclass
class TeacherForced:
    """Per-token results of :func:`score_continuation`."""

    nll: list[float]
    """-log p(continuation[t] | prompt, continuation[:t]) under the policy."""
    argmax: list[int]
    """The policy's top-1 next token at each position."""
    target_nll: list[float] | None
    """-log p(targets[t] | ...) for the optional second target sequence."""
    stats: SeqStats
    seconds: float
    decode_seconds: float = 0.0
    """Wall time after the prompt pass (steps 1 .. n-1)."""


def _step_cache(model, cache, max_len: int, fast: bool | None):
    """The decode-step cache :func:`ffnskip.decode.generate` would use for one unpadded row."""
    if fast is False or FastDecoder is None:
        return cache
    why_not = FastDecoder.supports(model, max_len)
    if why_not is None:
        step = FastDecoder(model, 1, max_len, padded=False)
        step.load_prefill(cache)
        return step
    if fast:
        raise EvalError(f"the fast decode path does not support this model: {why_not}")
    return cache


@torch.inference_mode()
def score_continuation(
    model: nn.Module,
    policy: SkipPolicy | None,
    prompt_ids: Sequence[int],
    continuation: Sequence[int],
    *,
    targets: Sequence[int] | None = None,
    max_new_tokens: int | None = None,
    fast: bool | None = None,
) -> TeacherForced:
    """Teacher-forced scoring of ``continuation`` after ``prompt_ids``, with ``policy`` applied
    exactly as in :func:`ffnskip.decode.generate`: the prompt pass is dense and produces the
    distribution of token 0; the pass that feeds token ``t - 1`` is step ``t``
    (``begin_step([t])``), so warm-up, ``dense_every``, the adaptive test and the random
    baseline's per-sequence choices are the same as when the continuation is generated.

    ``targets`` (same length) are scored from the same distributions (perplexity: dense's
    top-1 predictions). ``max_new_tokens`` is the generation setting the continuation came from
    (position-based schedules and the decode cache's size depend on it; default: its length);
    ``fast`` picks the decode-step path as :func:`ffnskip.decode.generate` does. One host
    synchronisation at the end (plus the controller's own).
    """
    policy = policy or SkipPolicy.dense()
    prompt_ids = list(prompt_ids)
    continuation = list(continuation)
    n = len(continuation)
    if not prompt_ids:
        raise EvalError("score_continuation needs at least one prompt token")
    if targets is not None and len(targets) != n:
        raise EvalError("targets must be as long as the continuation")
    max_len = max(n, max_new_tokens or 0)
    ctl = SkipController(model, policy, [prompt_ids], max_new_tokens=max_len)
    if n == 0:
        return TeacherForced([], [], [] if targets is not None else None, ctl.stats[0], 0.0)
    ctx = context_length(model)
    if ctx is not None and len(prompt_ids) + n > ctx:
        raise EvalError(f"prompt ({len(prompt_ids)}) + continuation ({n}) exceed the model's context of {ctx}")
    device = next(model.parameters()).device
    cont = torch.tensor(continuation, dtype=torch.long, device=device)  # [n]
    tgt = torch.tensor(list(targets), dtype=torch.long, device=device) if targets is not None else None
    input_ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)  # [1, S]
    mask = torch.ones_like(input_ids)  # [1, S]
    pos = torch.arange(len(prompt_ids), device=device)[None]  # [1, S]
    one = torch.ones((1, 1), dtype=mask.dtype, device=device)
    cache = new_cache(model)
    nll, arg, tnll = [], [], []
    start = time.perf_counter()
    with ctl.attached():
        ctl.begin_prefill()
        logits = prefill(model, input_ids, mask, pos, cache)  # [1, V]
        step_cache = _step_cache(model, cache, len(prompt_ids) + max_len, fast)
        t_prefill = None
        for t in range(n):
            if t == 1:
                logits.sum().item()  # HOST SYNC (timing only): the prompt pass is finished
                t_prefill = time.perf_counter()
            if t > 0:
                mask = torch.cat([mask, one], dim=1)
                pos = pos[:, -1:] + 1
                ctl.begin_step([t])
                logits = decode_one_token(model, cont[t - 1].view(1, 1), mask, pos, step_cache, ctl)  # [1, V]
            logp = logits[0].float().log_softmax(-1)  # [V]
            nll.append(-logp[cont[t]])
            arg.append(logp.argmax())
            if tgt is not None:
                tnll.append(-logp[tgt[t]])
            ctl.collect_cosines()  # lagged adaptive only (1 counted read per step); else a no-op
            ctl.end_step([True])
    out_nll = torch.stack(nll).tolist()  # HOST SYNC: once per continuation
    out_arg = torch.stack(arg).tolist()
    out_t = torch.stack(tnll).tolist() if tgt is not None else None
    end = time.perf_counter()
    return TeacherForced(out_nll, out_arg, out_t, ctl.stats[0], end - start, end - t_prefill if t_prefill else 0.0)


# ====================================================================== generation
def _bar(total: int, desc: str, progress: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not progress, file=sys.stderr, leave=False, dynamic_ncols=True)


def _generate(
    model, tokenizer, prompt_ids: list[list[int]], policy: SkipPolicy, params: SamplingParams, batch_size: int, bar
) -> list[dict]:
    """Decode every prompt; one record per prompt with text, ids (``produced``: every token the
    model emitted, EOS included), stats and its share of the batch's wall time."""
    out: list[dict] = []
    for start in range(0, len(prompt_ids), batch_size):
        batch = prompt_ids[start : start + batch_size]
        results: list = []
        produced: list[list[int]] = [[] for _ in batch]
        t0 = time.perf_counter()
        for ev in generate(model, tokenizer, batch, policy, params, results=results):
            produced[ev.row].append(ev.token_id)
            if ev.finished:
                bar.update(1)
        dt = time.perf_counter() - t0
        tokens = sum(r.stats.generated_tokens for r in results)
        for r, ids in zip(results, produced):
            share = dt * r.stats.generated_tokens / tokens if tokens else dt / len(results)
            out.append(
                {
                    "text": r.text,
                    "produced": ids,
                    "finish_reason": r.finish_reason,
                    "generated_tokens": r.stats.generated_tokens,
                    "seconds": share,
                    "stats": r.stats,
                }
            )
    return out


def _numerics(model) -> dict:
    """What besides the model and the code changes a dense decode's bits here (threads, panels,
    CPU kernels: :func:`ffnskip.fastpath.numerics_key`); part of every dense cache key, so that a
    decode cached under other settings is never compared with one made under these."""
    from .fastpath import numerics_key

    return numerics_key(next(model.parameters()).device)


def _dense_generate(model, tokenizer, prompt_ids, params, batch_size, cache, model_fp, bar) -> list[dict]:
    settings = {"max_new_tokens": params.max_new_tokens, "stop": list(params.stop), "batch_size": batch_size}
    num = _numerics(model)
    keys = [cache.key("gen", model_fp, num, ids, settings) if cache is not None else None for ids in prompt_ids]
    found: list[dict | None] = [cache.get(k) if cache is not None else None for k in keys]
    missing = [i for i, f in enumerate(found) if f is None]
    bar.update(len(prompt_ids) - len(missing))
    for start in range(0, len(missing), batch_size):  # cached batch by batch: an interrupted run keeps them
        chunk = missing[start : start + batch_size]
        fresh = _generate(model, tokenizer, [prompt_ids[i] for i in chunk], SkipPolicy.dense(), params, batch_size, bar)
        for i, rec in zip(chunk, fresh):
            value = {k: rec[k] for k in ("text", "produced", "finish_reason", "generated_tokens", "seconds")}
            if cache is not None:
                cache.put(keys[i], value)
            found[i] = value
    return found  # type: ignore[return-value]


def _dense_tf(model, prompt_ids, continuation, cache, model_fp, max_new_tokens: int | None = None) -> dict:
    key = (
        cache.key("tf", model_fp, _numerics(model), list(prompt_ids), list(continuation), max_new_tokens)
        if cache is not None
        else None
    )
    hit = cache.get(key) if cache is not None else None
    if hit is not None:
        return hit
    tf = score_continuation(model, SkipPolicy.dense(), prompt_ids, continuation, max_new_tokens=max_new_tokens)
    value = {"nll": tf.nll, "argmax": tf.argmax, "seconds": tf.seconds, "tokens": len(continuation)}
    if cache is not None:
        cache.put(key, value)
    return value


# ====================================================================== speed
def measure_speed(run: Callable[[SkipPolicy, Any], tuple[int, float]], policy: SkipPolicy, items: Sequence[Any],
                  rounds: int = 2) -> dict:
    """Decode tokens/s of dense and of ``policy`` in this process: one warm-up run of each, then
    ``rounds`` rounds over ``items``, dense and policy alternating per item (the order flips
    every round). ``run(policy, item)`` decodes one item and returns ``(tokens, seconds)``."""
    dense = SkipPolicy.dense()
    if not items:
        return {"method": "none", "dense_tokens_per_s": None, "skip_tokens_per_s": None}
    run(dense, items[0])
    run(policy, items[0])
    totals = {"dense": [0, 0.0], "skip": [0, 0.0]}
    for r in range(rounds):
        order = [("dense", dense), ("skip", policy)]
        if r % 2:
            order.reverse()
        for item in items:
            for name, pol in order:
                tokens, seconds = run(pol, item)
                totals[name][0] += tokens
                totals[name][1] += seconds
    tps = {k: (v[0] / v[1] if v[1] > 0 else None) for k, v in totals.items()}
    return {
        "method": "alternating",
        "items": len(items),
        "rounds": rounds,
        "dense_tokens": totals["dense"][0],
        "skip_tokens": totals["skip"][0],
        "dense_tokens_per_s": tps["dense"],
        "skip_tokens_per_s": tps["skip"],
    }


# ====================================================================== report
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


# ====================================================================== evaluate
def _as_policy(model, tokenizer, policy, data_dir) -> SkipPolicy:
    if policy is None:
        return SkipPolicy()
    if isinstance(policy, SkipPolicy):
        return policy
    if isinstance(policy, str):
        try:
            policy = json.loads(policy)
        except json.JSONDecodeError as exc:
            from .policy import PolicyError

            raise PolicyError("<policy>", f"malformed JSON: {exc}") from None
    if isinstance(policy, dict):
        from .baselines import policy_from_spec

        return policy_from_spec(model, tokenizer, policy, data_dir)
    raise EvalError(f"policy must be a SkipPolicy, a dict or JSON text; got {type(policy).__name__}")


def _check_int(name: str, value, minimum: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise EvalError(f"{name} must be an integer >= {minimum}; got {value!r}")


def _encode(tokenizer, prompt) -> list[int]:
    if isinstance(prompt, list):
        return encode_prompt(tokenizer, prompt)
    return encode_prompt(tokenizer, prompt, raw=True)


def _render(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False)


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
      profile (:func:`ffnskip.baselines.policy_from_spec`, ``skip_budget`` layers).
    * ``limit`` / ``seed``: a deterministic subset (``perplexity``: ``limit`` counts tokens).
    * ``data_file`` / ``fields``: a user file (JSONL, JSON array or CSV) and ``{"answer":
      "column"}`` (or ``["answer=column"]``) mappings; ``data_dir`` overrides the shared data.
    * ``chat``: ``None`` is the task's default (factoid_qa: method.md's raw prompt;
      summarization and conversation: the chat template when the tokenizer has one).
    * ``max_new_tokens``: ``None`` is the task's default (factoid 24, summarization 200,
      conversation 256 per turn, perplexity window 256).
    * ``dense_cache``: a :class:`DenseCache`, ``None`` for the process-wide default, ``False``
      for none.
    * ``judge``: a :class:`ffnskip.judge.JudgeConfig` (conversation and summarization only).
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

    from .adapters import get_adapter

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
        ctx = _run_perplexity(model, tokenizer, policy, task_obj, samples, cache, model_fp, progress)
    else:
        ctx = _run_generation(model, tokenizer, policy, task_obj, samples, use_chat, new_tokens, batch_size,
                              cache, model_fp, progress, score_nll)

    # ------------------------------------------------------------------ judge
    judge_info = None
    primary_name = task_obj.primary
    if judge is not None:
        judge_info = _run_judge(judge, task_obj, samples, ctx, data_dir, progress)
        primary_name = "judge_score"

    # ------------------------------------------------------------------ speed
    speed = {"method": "evaluation-pass"}
    if measure_speed:
        speed = _run_speed(model, tokenizer, policy, task_obj, ctx, new_tokens, speed_items, speed_rounds, progress)
    dense_tps = speed.get("dense_tokens_per_s") if measure_speed else ctx["dense_pass_tps"]
    skip_tps = speed.get("skip_tokens_per_s") if measure_speed else ctx["skip_pass_tps"]
    if not measure_speed:
        speed.update({"dense_tokens_per_s": dense_tps, "skip_tokens_per_s": skip_tps,
                      "note": "speeds of the evaluation passes; the dense one may come from the cache"})
    ctx["dense"]["tokens_per_s"] = dense_tps
    ctx["skip"]["tokens_per_s"] = skip_tps
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
        dense=ctx["dense"],
        skip=ctx["skip"],
        speedup=speedup,
        data_fingerprint=fingerprint(samples),
        settings=settings,
        speed=speed,
        judge=judge_info,
        samples=ctx["samples"],
    )


# ---------------------------------------------------------------------- generative tasks
def _pooled_repetition(texts: Sequence[str]) -> float:
    total = repeated = 0
    for t in texts:
        n, r = metrics.ngram_counts(str(t).lower().split(), 4)
        total += n
        repeated += r
    return repeated / total if total else 0.0


def _degeneration(texts: Sequence[str]) -> dict:
    return {
        "repetition": _pooled_repetition(texts),
        "collapsed": sum(1 for t in texts if metrics.is_collapsed(t)),
        "empty": sum(1 for t in texts if not str(t).strip()),
    }


def _run_generation(model, tokenizer, policy, task: Task, samples: list[Sample], use_chat: bool, new_tokens: int,
                    batch_size: int, cache, model_fp, progress, score_nll: bool = True) -> dict:
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, stop=task.stop)
    conv = task.kind == "conversation"
    n_turns = [len(s.input) if conv else 1 for s in samples]
    dense_turns: list[list[dict]] = [[] for _ in samples]
    skip_turns: list[list[dict]] = [[] for _ in samples]
    dense_prompts: list[list[list[int]]] = [[] for _ in samples]
    skip_prompts: list[list[list[int]]] = [[] for _ in samples]

    def prompt_for(s: Sample, answers: list[dict]):
        if conv:
            return task.prompt(s, use_chat, [a["text"] for a in answers])
        return task.prompt(s, use_chat)

    for turn in range(max(n_turns)):
        active = [i for i, k in enumerate(n_turns) if turn < k]
        suffix = f" turn {turn + 1}" if conv else ""
        d_ids = [_encode(tokenizer, prompt_for(samples[i], dense_turns[i])) for i in active]
        with _bar(len(active), f"{task.name}: dense{suffix}", progress) as bar:
            d_out = _dense_generate(model, tokenizer, d_ids, params, batch_size, cache, model_fp, bar)
        s_ids = [_encode(tokenizer, prompt_for(samples[i], skip_turns[i])) for i in active]
        with _bar(len(active), f"{task.name}: policy{suffix}", progress) as bar:
            s_out = _generate(model, tokenizer, s_ids, policy, params, batch_size, bar)
        for j, i in enumerate(active):
            dense_turns[i].append(d_out[j])
            skip_turns[i].append(s_out[j])
            dense_prompts[i].append(d_ids[j])
            skip_prompts[i].append(s_ids[j])

    # Teacher-forced NLL of the dense continuation: under dense (cached) and under the policy.
    nll_skip: list[list[float]] = [[] for _ in samples]
    nll_dense: list[list[float]] = [[] for _ in samples]
    total_units = sum(n_turns) if score_nll else 0
    with _bar(total_units, f"{task.name}: nll vs dense", progress and score_nll) as bar:
        for i in range(len(samples) if score_nll else 0):
            for turn, d in enumerate(dense_turns[i]):
                cont = d["produced"]
                dtf = _dense_tf(model, dense_prompts[i][turn], cont, cache, model_fp, params.max_new_tokens)
                nll_dense[i].extend(dtf["nll"])
                nll_skip[i].extend(score_continuation(model, policy, dense_prompts[i][turn], cont,
                                                      max_new_tokens=params.max_new_tokens).nll)
                bar.update(1)

    # ------------------------------------------------------------------ per-sample scores
    records, d_scores, s_scores = [], [], []
    d_texts, s_texts = [], []
    div_idx, diverged, agree, rl = [], [], [], []
    for i, s in enumerate(samples):
        dt = [d["text"] for d in dense_turns[i]]
        st = [x["text"] for x in skip_turns[i]]
        d_join = "\n\n".join(dt)
        s_join = "\n\n".join(st)
        d_ids_all = [t for d in dense_turns[i] for t in d["produced"]]
        s_ids_all = [t for x in skip_turns[i] for t in x["produced"]]
        fd, dv = metrics.first_divergence(d_ids_all, s_ids_all)
        ag = all(metrics.answer_agreement(a, b) for a, b in zip(dt, st))
        r = metrics.rouge_l(s_join, d_join)
        sc = task.score(s_join if conv else st[0], s)
        dsc = task.score(d_join if conv else dt[0], s)
        n_tok = len(nll_skip[i])
        sc.update({
            "answer_agreement": float(ag),
            "rouge_l_vs_dense": r,
            "first_divergence": fd,
            "diverged": float(dv),
            "nll_vs_dense": sum(nll_skip[i]) / n_tok if n_tok else None,
            "repetition": metrics.repetition(s_join),
            "collapsed": float(metrics.is_collapsed(s_join)),
        })
        dsc.update({
            "nll_vs_dense": sum(nll_dense[i]) / n_tok if n_tok else None,
            "repetition": metrics.repetition(d_join),
            "collapsed": float(metrics.is_collapsed(d_join)),
        })
        d_scores.append(dsc)
        s_scores.append(sc)
        d_texts.append(d_join)
        s_texts.append(s_join)
        div_idx.append(fd)
        diverged.append(dv)
        agree.append(ag)
        rl.append(r)
        stats = SeqStats.merge([x["stats"] for x in skip_turns[i]])
        prompt_text = (_render(tokenizer, skip_prompts[i][0]) if not conv else list(s.input))
        records.append({
            "index": s.index,
            "id": s.id,
            "prompt": prompt_text,
            "reference": s.reference,
            "dense_output": dt if conv else dt[0],
            "output": st if conv else st[0],
            "scores": sc,
            "dense_scores": dsc,
            "generated_tokens": stats.generated_tokens,
            "dense_generated_tokens": sum(d["generated_tokens"] for d in dense_turns[i]),
            "skipped_ffn": stats.skipped_ffn,
            "skip_ratio": stats.skip_ratio,
            **({"meta": s.meta} if s.meta else {}),
        })

    all_skip = [x["stats"] for turns in skip_turns for x in turns]
    pooled = SeqStats.merge(all_skip)
    n_nll = sum(len(v) for v in nll_skip)
    dense = dict(task.aggregate(samples, d_scores))
    dense.update(_degeneration(d_texts))
    dense.update({
        "nll_vs_dense": sum(sum(v) for v in nll_dense) / n_nll if n_nll else None,
        "generated_tokens": sum(d["generated_tokens"] for turns in dense_turns for d in turns),
    })
    skip = dict(task.aggregate(samples, s_scores))
    skip.update(_degeneration(s_texts))
    skip.update({
        "skip_ratio": pooled.skip_ratio,
        "skip_ratio_post_warmup": pooled.skip_ratio_post_warmup,
        "answer_agreement": metrics.mean(float(a) for a in agree),
        "rouge_l_vs_dense": metrics.mean(rl),
        "first_divergence": metrics.mean(div_idx),
        "diverged": metrics.mean(float(d) for d in diverged),
        "nll_vs_dense": sum(sum(v) for v in nll_skip) / n_nll if n_nll else None,
        "generated_tokens": pooled.generated_tokens,
        "skipped_ffn": pooled.skipped_ffn,
        "skipped_per_layer": pooled.skipped_per_layer,
        "syncs_per_token": pooled.syncs_per_token,
    })
    d_tok = sum(d["generated_tokens"] for turns in dense_turns for d in turns)
    d_sec = sum(d["seconds"] for turns in dense_turns for d in turns)
    s_sec = sum(x["seconds"] for turns in skip_turns for x in turns)
    return {
        "dense": dense,
        "skip": skip,
        "samples": records,
        "dense_pass_tps": d_tok / d_sec if d_sec > 0 else None,
        "skip_pass_tps": pooled.generated_tokens / s_sec if s_sec > 0 else None,
        "speed_prompts": [skip_prompts[i][0] for i in range(len(samples))],
        "dense_turns": dense_turns,
        "skip_turns": skip_turns,
        "params": params,
    }


# ---------------------------------------------------------------------- perplexity
def _run_perplexity(model, tokenizer, policy, task: Task, samples: list[Sample], cache, model_fp, progress) -> dict:
    records, stats = [], []
    d_nll_tot = s_nll_tot = vs_tot = 0.0
    count = 0
    agree_tok = 0
    div_idx, diverged, rl = [], [], []
    d_preds, s_preds = [], []
    d_sec = s_sec = 0.0
    with _bar(len(samples), f"{task.name}: dense + policy", progress) as bar:
        for s in samples:
            prompt, target = s.input["prompt_ids"], s.input["target_ids"]
            dtf = _dense_tf(model, prompt, target, cache, model_fp)
            stf = score_continuation(model, policy, prompt, target, targets=dtf["argmax"])
            n = len(target)
            d_sum, s_sum, vs_sum = sum(dtf["nll"]), sum(stf.nll), sum(stf.target_nll or [])
            d_nll_tot += d_sum
            s_nll_tot += s_sum
            vs_tot += vs_sum
            count += n
            same = sum(1 for a, b in zip(dtf["argmax"], stf.argmax) if a == b)
            agree_tok += same
            fd, dv = metrics.first_divergence(dtf["argmax"], stf.argmax)
            div_idx.append(fd)
            diverged.append(dv)
            d_text = tokenizer.decode(dtf["argmax"], skip_special_tokens=True)
            s_text = tokenizer.decode(stf.argmax, skip_special_tokens=True)
            r = metrics.rouge_l(s_text, d_text)
            rl.append(r)
            d_preds.append(dtf["argmax"])
            s_preds.append(stf.argmax)
            stats.append(stf.stats)
            d_sec += float(dtf.get("seconds") or 0.0)
            s_sec += stf.seconds
            records.append({
                "index": s.index,
                "id": s.id,
                "prompt": tokenizer.decode(prompt, skip_special_tokens=True),
                "reference": tokenizer.decode(target, skip_special_tokens=True),
                "dense_output": d_text,
                "output": s_text,
                "scores": {
                    "perplexity": task.perplexity(s_sum, n),
                    "answer_agreement": same / n if n else None,
                    "rouge_l_vs_dense": r,
                    "first_divergence": fd,
                    "diverged": float(dv),
                    "nll_vs_dense": vs_sum / n if n else None,
                    "repetition": metrics.repetition(stf.argmax),
                },
                "dense_scores": {"perplexity": task.perplexity(d_sum, n), "repetition": metrics.repetition(dtf["argmax"])},
                "generated_tokens": stf.stats.generated_tokens,
                "dense_generated_tokens": n,
                "skipped_ffn": stf.stats.skipped_ffn,
                "skip_ratio": stf.stats.skip_ratio,
                "meta": s.meta,
            })
            bar.update(1)
    pooled = SeqStats.merge(stats)

    def rep(preds):
        tot = r = 0
        for p in preds:
            a, b = metrics.ngram_counts(p, 4)
            tot += a
            r += b
        return r / tot if tot else 0.0

    dense = {
        "perplexity": task.perplexity(d_nll_tot, count),
        "nll": d_nll_tot / count if count else None,
        "repetition": rep(d_preds),
        "collapsed": 0,
        "tokens": count,
    }
    skip = {
        "perplexity": task.perplexity(s_nll_tot, count),
        "nll": s_nll_tot / count if count else None,
        "repetition": rep(s_preds),
        "collapsed": 0,
        "skip_ratio": pooled.skip_ratio,
        "skip_ratio_post_warmup": pooled.skip_ratio_post_warmup,
        "answer_agreement": agree_tok / count if count else None,
        "rouge_l_vs_dense": metrics.mean(rl),
        "first_divergence": metrics.mean(div_idx),
        "diverged": metrics.mean(float(d) for d in diverged),
        "nll_vs_dense": vs_tot / count if count else None,
        "tokens": count,
        "skipped_ffn": pooled.skipped_ffn,
        "skipped_per_layer": pooled.skipped_per_layer,
        "syncs_per_token": pooled.syncs_per_token,
    }
    return {
        "dense": dense,
        "skip": skip,
        "samples": records,
        "dense_pass_tps": count / d_sec if d_sec > 0 else None,
        "skip_pass_tps": count / s_sec if s_sec > 0 else None,
        "windows": [(s.input["prompt_ids"], s.input["target_ids"]) for s in samples],
    }


# ---------------------------------------------------------------------- speed and judge
def _run_speed(model, tokenizer, policy, task: Task, ctx: dict, new_tokens: int, items: int, rounds: int,
               progress: bool) -> dict:
    """Decode speed at equal lengths: every run decodes exactly ``n`` tokens after the prompt
    (no EOS, no stop strings); the time of the prompt pass (prefill) is left out."""
    n = max(2, min(new_tokens, SPEED_MAX_TOKENS))
    seen: list[SeqStats] = []  # the policy's runs, for their skip ratio
    if task.kind == "perplexity":
        windows = [(p, t[:n]) for p, t in ctx["windows"][:items]]

        def run(pol, item):
            tf = score_continuation(model, pol, item[0], item[1])
            if pol is policy:
                seen.append(tf.stats)
            return tf.stats.generated_tokens - 1, tf.decode_seconds

    else:
        params = SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True)
        windows = ctx["speed_prompts"][:items]

        def run(pol, ids):
            results: list = []
            first = None
            for ev in generate(model, tokenizer, [ids], pol, params, results=results):
                if first is None:
                    first = time.perf_counter()  # token 0 is out: the prompt pass is done
            if pol is policy:
                seen.append(results[0].stats)
            return results[0].stats.generated_tokens - 1, time.perf_counter() - first

    with _bar(1, f"{task.name}: speed", progress) as bar:
        out = measure_speed(run, policy, windows, rounds)
        bar.update(1)
    out["tokens_per_run"] = n
    out["skip_ratio"] = SeqStats.merge(seen).skip_ratio if seen else None
    out["timing"] = "decode only (prompt pass excluded), fixed length, EOS and stop strings ignored"
    return out


def _run_judge(config, task: Task, samples: list[Sample], ctx: dict, data_dir, progress) -> dict:
    from . import data as _data
    from .judge import Judge

    judge = Judge(config, _data.judge_prompts(data_dir))
    scores: dict[str, list] = {"dense": [], "skip": []}
    bad = {"dense": 0, "skip": 0}
    failed = {"dense": 0, "skip": 0}

    def judged(side: str, call):
        u0, e0 = judge.stats.unparseable, judge.stats.errors
        value = call()
        bad[side] += judge.stats.unparseable - u0
        failed[side] += judge.stats.errors - e0
        return value

    with _bar(len(samples), f"{task.name}: judge", progress) as bar:
        for i, s in enumerate(samples):
            rec = ctx["samples"][i]
            if task.name == "summarization":
                # One pairwise judgement scores both sides; a bad one counts for both.
                d, p = judged("skip", lambda: judge.score_summary_pair(
                    s.meta.get("bucket", "small"), s.input, rec["dense_output"], rec["output"]))
            else:
                d = judged("dense", lambda: judge.score_conversation(s.input, rec["dense_output"], s.reference)["score"])
                p = judged("skip", lambda: judge.score_conversation(s.input, rec["output"], s.reference)["score"])
            rec["dense_scores"]["judge_score"] = d
            rec["scores"]["judge_score"] = p
            scores["dense"].append(d)
            scores["skip"].append(p)
            bar.update(1)
    if task.name == "summarization":
        bad["dense"], failed["dense"] = bad["skip"], failed["skip"]
    for side in ("dense", "skip"):
        ctx[side]["judge_score"] = metrics.mean(scores[side])
        ctx[side]["judge_n"] = sum(1 for v in scores[side] if v is not None)
        ctx[side]["judge_unparseable"] = bad[side]
        ctx[side]["judge_errors"] = failed[side]
    info = {"url": config.endpoint, "model": config.model, **judge.stats.to_dict()}
    info["templates"] = ("LLM-KICK summary pairwise (dense = Assistant 1)" if task.name == "summarization"
                         else "MT-Bench single-v1 / single-math-v1 (+ multi-turn)")
    return info


# ---------------------------------------------------------------------- ffnskip.evaluate(...)
class _CallableModule(types.ModuleType):
    """Lets ``ffnskip.evaluate(model, tokenizer, policy, task, ...)`` call :func:`evaluate`
    while ``from ffnskip.evaluate import evaluate, EvalReport`` keeps working."""

    def __call__(self, *args, **kwargs) -> EvalReport:
        return evaluate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
