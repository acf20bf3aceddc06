"""Generative tasks (factoid QA, summarization, conversations): every sample decoded densely
(through the dense cache) and with the policy, scored by the task, and compared with dense."""

from __future__ import annotations

import time
from typing import Sequence

from ..decode import SamplingParams, encode_prompt, generate
from ..engine import SeqStats
from ..policy import SkipPolicy
from . import metrics
from .identity import _numerics
from .progress import _bar
from .report import RunResult
from .tasks import Sample, Task
from .teacher import _dense_tf, score_continuation

#: What the dense output scores against itself, per sample and pooled (the fidelity metrics).
DENSE_FIDELITY = {"output_identity": 1.0, "answer_agreement": 1.0, "answer_agreement_short": 1.0, "rouge_l_vs_dense": 1.0}


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


def _encode(tokenizer, prompt) -> list[int]:
    if isinstance(prompt, list):
        return encode_prompt(tokenizer, prompt)
    return encode_prompt(tokenizer, prompt, raw=True)


def _render(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False)


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


def run_generation(model, tokenizer, policy, task: Task, samples: list[Sample], use_chat: bool, new_tokens: int,
                   batch_size: int, cache, model_fp, progress, score_nll: bool = True) -> RunResult:
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
    div_idx, diverged, agree, agree_short, rl = [], [], [], [], []
    for i, s in enumerate(samples):
        dt = [d["text"] for d in dense_turns[i]]
        st = [x["text"] for x in skip_turns[i]]
        d_join = "\n\n".join(dt)
        s_join = "\n\n".join(st)
        d_ids_all = [t for d in dense_turns[i] for t in d["produced"]]
        s_ids_all = [t for x in skip_turns[i] for t in x["produced"]]
        fd, dv = metrics.first_divergence(d_ids_all, s_ids_all)
        ag = all(metrics.answer_agreement(a, b) for a, b in zip(dt, st))
        ag_short = all(metrics.answer_agreement_short(a, b) for a, b in zip(dt, st))
        r = metrics.rouge_l(s_join, d_join)
        sc = task.score(s_join if conv else st[0], s)
        dsc = task.score(d_join if conv else dt[0], s)
        n_tok = len(nll_skip[i])
        sc.update({
            "output_identity": float(ag),
            "answer_agreement": float(ag),  # the former name of output_identity
            "answer_agreement_short": float(ag_short),
            "rouge_l_vs_dense": r,
            "first_divergence": fd,
            "diverged": float(dv),
            "nll_vs_dense": sum(nll_skip[i]) / n_tok if n_tok else None,
            "repetition": metrics.repetition(s_join),
            "collapsed": float(metrics.is_collapsed(s_join)),
        })
        dsc.update({
            **DENSE_FIDELITY,  # dense against itself
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
        agree_short.append(ag_short)
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
        **DENSE_FIDELITY,
        "nll_vs_dense": sum(sum(v) for v in nll_dense) / n_nll if n_nll else None,
        "generated_tokens": sum(d["generated_tokens"] for turns in dense_turns for d in turns),
    })
    skip = dict(task.aggregate(samples, s_scores))
    skip.update(_degeneration(s_texts))
    skip.update({
        "skip_ratio": pooled.skip_ratio,
        "skip_ratio_post_warmup": pooled.skip_ratio_post_warmup,
        "output_identity": metrics.mean(float(a) for a in agree),
        "answer_agreement": metrics.mean(float(a) for a in agree),  # the former name of output_identity
        "answer_agreement_short": metrics.mean(float(a) for a in agree_short),
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
    return RunResult(
        dense=dense,
        skip=skip,
        samples=records,
        dense_pass_tps=d_tok / d_sec if d_sec > 0 else None,
        skip_pass_tps=pooled.generated_tokens / s_sec if s_sec > 0 else None,
        speed_items=[skip_prompts[i][0] for i in range(len(samples))],
    )
