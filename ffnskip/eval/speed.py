"""Decode speed: tokens/s of dense and of the policy, measured alternately in this process after a
warm-up of each (:func:`measure_speed`), at equal lengths with the prompt pass left out."""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

from ..decode import SamplingParams, generate
from ..engine import SeqStats
from ..policy import SkipPolicy
from .progress import _bar
from .report import RunResult
from .stats import paired_speedup
from .tasks import Task
from .teacher import score_continuation

__all__ = ["SPEED_MAX_TOKENS", "measure_speed"]

SPEED_MAX_TOKENS = 64
"""Tokens per speed run at most (the task's ``max_new_tokens`` when smaller)."""


def measure_speed(run: Callable[[SkipPolicy, Any], tuple[int, float]], policy: SkipPolicy, items: Sequence[Any],
                  rounds: int = 2) -> dict:
    """Decode tokens/s of dense and of ``policy`` in this process: one warm-up run of each, then
    ``rounds`` rounds over ``items``, dense and policy alternating per item (the order flips
    every round). ``run(policy, item)`` decodes one item and returns ``(tokens, seconds)``.
    Each item of each round is one back-to-back pair: ``speedup_ci95`` is the paired bootstrap
    interval of the pooled speed-up over the ``pairs`` (:func:`~ffnskip.eval.stats.paired_speedup`)."""
    dense = SkipPolicy.dense()
    if not items:
        return {"method": "none", "dense_tokens_per_s": None, "skip_tokens_per_s": None}
    run(dense, items[0])
    run(policy, items[0])
    totals = {"dense": [0, 0.0], "skip": [0, 0.0]}
    pairs: dict[str, list[tuple[int, float]]] = {"dense": [], "skip": []}  # one back-to-back pair per item and round
    for r in range(rounds):
        order = [("dense", dense), ("skip", policy)]
        if r % 2:
            order.reverse()
        for item in items:
            for name, pol in order:
                tokens, seconds = run(pol, item)
                totals[name][0] += tokens
                totals[name][1] += seconds
                pairs[name].append((tokens, seconds))
    tps = {k: (v[0] / v[1] if v[1] > 0 else None) for k, v in totals.items()}
    ci = paired_speedup(pairs["dense"], pairs["skip"])
    return {
        "pairs": ci.n,
        "speedup_ci95": None if ci.low is None else [ci.low, ci.high],
        "method": "alternating",
        "items": len(items),
        "rounds": rounds,
        "dense_tokens": totals["dense"][0],
        "skip_tokens": totals["skip"][0],
        "dense_tokens_per_s": tps["dense"],
        "skip_tokens_per_s": tps["skip"],
    }


def run_speed(model, tokenizer, policy, task: Task, result: RunResult, new_tokens: int, items: int, rounds: int,
              progress: bool) -> dict:
    """Decode speed at equal lengths: every run decodes exactly ``n`` tokens after the prompt
    (no EOS, no stop strings); the time of the prompt pass (prefill) is left out."""
    n = max(2, min(new_tokens, SPEED_MAX_TOKENS))
    seen: list[SeqStats] = []  # the policy's runs, for their skip ratio
    if task.kind == "perplexity":
        windows = [(p, t[:n]) for p, t in result.speed_items[:items]]

        def run(pol, item):
            tf = score_continuation(model, pol, item[0], item[1])
            if pol is policy:
                seen.append(tf.stats)
            return tf.stats.generated_tokens - 1, tf.decode_seconds

    else:
        params = SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True)
        windows = result.speed_items[:items]

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
