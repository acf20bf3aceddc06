"""Teacher forcing: :func:`score_continuation` scores a given continuation token by token with a
skip policy applied exactly as in generation (``nll_vs_dense``, the perplexity task, its speed
runs); :func:`_dense_tf` is its dense result through the dense cache."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from ..decode import DecodeSession, GenerationError, SamplingParams, context_length
from ..engine import SeqStats, SkipController
from ..policy import SkipPolicy
from ..sync import to_host
from .identity import _numerics
from .tasks import EvalError

__all__ = ["PromptLogprobs", "TeacherForced", "prompt_logprobs", "score_continuation"]


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
    ``fast`` picks the decode-step path as :func:`ffnskip.decode.generate` does: it runs on the
    same :class:`~ffnskip.decode.DecodeSession` (:meth:`~ffnskip.decode.DecodeSession.feed` in
    place of sampling). One host synchronisation at the end (plus the controller's own).
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
    if n == 0:
        return TeacherForced([], [], [] if targets is not None else None, SkipController(model, policy, [prompt_ids]).stats[0], 0.0)
    ctx = context_length(model)
    if ctx is not None and len(prompt_ids) + n > ctx:
        raise EvalError(f"prompt ({len(prompt_ids)}) + continuation ({n}) exceed the model's context of {ctx}")
    if ctx is not None:
        max_len = min(max_len, ctx - len(prompt_ids))
    device = next(model.parameters()).device
    cont = torch.tensor(continuation, dtype=torch.long, device=device)  # [n]
    tgt = torch.tensor(list(targets), dtype=torch.long, device=device) if targets is not None else None
    # The same decode session as generation: one row, its prompt pass, then one pass per fed token.
    session = DecodeSession(model, None, policy, fast=fast)
    try:
        session.add(prompt_ids, SamplingParams(max_new_tokens=max_len, ignore_eos=True))
        start = time.perf_counter()
        session.admit()  # the prompt pass: the distribution of token 0
    except GenerationError as exc:
        raise EvalError(str(exc)) from None
    ctl = session.ctl
    logits = session.logits  # [1, V]
    nll, arg, tnll = [], [], []
    t_prefill = None
    for t in range(n):
        if t == 1:
            logits.sum().item()  # HOST SYNC (timing only): the prompt pass is finished
            t_prefill = time.perf_counter()
        if t > 0:
            logits = session.feed(cont[t - 1].view(1))  # step t (begin_step([t])): [1, V]
        logp = logits[0].float().log_softmax(-1)  # [V]
        nll.append(-logp[cont[t]])
        arg.append(logp.argmax())
        if tgt is not None:
            tnll.append(-logp[tgt[t]])
        ctl.collect_cosines()  # lagged adaptive only (1 counted read per step); else a no-op
        ctl.end_step([True])
    out_nll = to_host(torch.stack(nll))  # HOST SYNC: once per continuation
    out_arg = to_host(torch.stack(arg))
    out_t = to_host(torch.stack(tnll)) if tgt is not None else None
    end = time.perf_counter()
    return TeacherForced(out_nll, out_arg, out_t, ctl.stats[0], end - start, end - t_prefill if t_prefill else 0.0)


@dataclass
class PromptLogprobs:
    """Dense log-probabilities of a token sequence (OpenAI's ``echo`` + ``logprobs``)."""

    token_logprobs: list[float | None]
    """log p(ids[i] | ids[:i]); None for the first token (nothing conditions it)."""
    top: list[list[tuple[int, float]] | None]
    """The ``k`` most likely ids and their log-probabilities at each position (None for the first)."""
    next_top: list[tuple[int, float]]
    """The ``max(k, 1)`` most likely next ids after the whole sequence (its greedy continuation first)."""


@torch.inference_mode()
def prompt_logprobs(model: nn.Module, ids: Sequence[int], k: int = 1) -> PromptLogprobs:
    """One dense forward pass over ``ids`` (the model's own forward, no skipping: a loglikelihood
    request measures the dense model) with every position's distribution. Two host syncs."""
    ids = list(ids)
    if not ids:
        raise EvalError("prompt_logprobs needs at least one token")
    ctx = context_length(model)
    if ctx is not None and len(ids) > ctx:
        raise EvalError(f"{len(ids)} tokens exceed the model's context of {ctx}")
    device = next(model.parameters()).device
    x = torch.tensor([ids], dtype=torch.long, device=device)  # [1, n]
    logp = model(input_ids=x, use_cache=False).logits[0].float().log_softmax(-1)  # [n, V]
    got = logp[:-1].gather(1, x[0, 1:, None])[:, 0]  # [n - 1]: log p(ids[i] | ids[:i]) for i >= 1
    kk = max(1, k)
    tv, ti = logp.topk(min(kk, logp.shape[-1]), dim=-1)  # [n, kk]
    got_h, tv_h, ti_h = to_host(got), to_host(tv), to_host(ti)  # HOST SYNCS
    top: list[list[tuple[int, float]] | None] = [None]
    for i in range(1, len(ids)):
        top.append(list(zip(ti_h[i - 1], tv_h[i - 1]))[:k] if k else [])
    return PromptLogprobs([None, *got_h], top, list(zip(ti_h[-1], tv_h[-1])))


# ---------------------------------------------------------------------- dense, through the cache
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
