"""The perplexity task: WikiText-2 windows decoded token by token with teacher forcing. Its
"outputs" are the greedy next-token predictions at each position, so the fidelity metrics compare
the policy's predictions with dense's (``answer_agreement`` is then the share of positions whose
top-1 token equals dense's)."""

from __future__ import annotations

from ..engine import SeqStats
from . import metrics
from .progress import _bar
from .report import RunResult
from .tasks import Sample, Task
from .teacher import _dense_tf, score_continuation


def run_perplexity(model, tokenizer, policy, task: Task, samples: list[Sample], cache, model_fp, progress) -> RunResult:
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
                    "nll": s_sum / n if n else None,
                    "repetition": metrics.repetition(stf.argmax),
                },
                "dense_scores": {
                    "perplexity": task.perplexity(d_sum, n),
                    "nll": d_sum / n if n else None,
                    "answer_agreement": 1.0,  # dense's top-1 against itself
                    "rouge_l_vs_dense": 1.0,
                    "repetition": metrics.repetition(dtf["argmax"]),
                },
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
    return RunResult(
        dense=dense,
        skip=skip,
        samples=records,
        dense_pass_tps=count / d_sec if d_sec > 0 else None,
        skip_pass_tps=count / s_sec if s_sec > 0 else None,
        speed_items=[(s.input["prompt_ids"], s.input["target_ids"]) for s in samples],
    )
