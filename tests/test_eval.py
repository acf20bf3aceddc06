"""The evaluation harness on the real default model (SmolLM2-135M-Instruct) and real data, a few
samples per task with short outputs."""

from __future__ import annotations

import math

import pytest
import torch

import ffnskip
from ffnskip import SamplingParams, SkipPolicy, encode_prompt, generate
from ffnskip.eval import DenseCache, evaluate, metrics, score_continuation

pytestmark = pytest.mark.slow

ISSUE_FIELDS_DENSE = ("tokens_per_s", "repetition")
ISSUE_FIELDS_SKIP = ("tokens_per_s", "repetition", "skip_ratio", "skip_ratio_post_warmup", "answer_agreement",
                     "rouge_l_vs_dense", "first_divergence", "nll_vs_dense")
POLICY = SkipPolicy(mode="adaptive", threshold=0.95, warmup_tokens=2, skip_budget=8, dense_every=0)


@pytest.fixture(scope="module")
def smollm():
    # One thread: on a shared 2-core machine two torch threads are several times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield ffnskip.load_model("smollm2-135m")
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cache():
    return DenseCache(None)  # memory only: the tests leave nothing on disk


def test_factoid_report_has_every_field_and_real_skipping(smollm, cache):
    model, tok = smollm
    rep = evaluate(model, tok, POLICY, "factoid_qa", limit=3, seed=1, max_new_tokens=8, dense_cache=cache,
                   measure_speed=False, progress=False, model_name="smollm2-135m")
    d = rep.to_dict()
    assert d["task"] == "factoid_qa" and d["model"] == "smollm2-135m" and d["n"] == 3
    assert d["primary"] == {"name": "accuracy", "higher_is_better": True}
    for k in ("accuracy", "exact_match", *ISSUE_FIELDS_DENSE):
        assert d["dense"][k] is not None, k
    for k in ("accuracy", "exact_match", *ISSUE_FIELDS_SKIP):
        assert d["skip"][k] is not None, k
    assert d["speedup"] is not None
    assert 0 < d["skip"]["skip_ratio"] <= d["skip"]["skip_ratio_post_warmup"] <= 8 / 30 + 1e-9
    assert "samples" not in d and len(rep.samples) == 3
    s = rep.samples[0]
    assert {"index", "prompt", "reference", "dense_output", "output", "scores", "generated_tokens", "skipped_ffn",
            "skip_ratio"} <= set(s)
    assert s["prompt"].startswith("Please give answer to this question: ") and s["prompt"].endswith("\nThe answer is ")
    assert all(x["generated_tokens"] <= 8 and x["dense_generated_tokens"] <= 8 for x in rep.samples)
    # The same selection gives the same fingerprint; the dense decodes now come from the cache.
    assert cache.misses >= 3 and len(cache) >= 3  # the first call decoded densely and stored it
    misses, hits = cache.misses, cache.hits
    again = evaluate(model, tok, SkipPolicy(mode="random", warmup_tokens=2, skip_budget=8, dense_every=0), "factoid_qa",
                     limit=3, seed=1, max_new_tokens=8, dense_cache=cache, measure_speed=False, progress=False,
                     score_nll=False)
    assert again.data_fingerprint == rep.data_fingerprint
    assert [x["dense_output"] for x in again.samples] == [x["dense_output"] for x in rep.samples]
    assert cache.misses == misses and cache.hits >= hits + 3  # no dense decode was recomputed
    assert again.settings["dense_cache"]["misses"] == 0
    assert again.skip["nll_vs_dense"] is None  # switched off, still reported
    # policy minus dense, paired per sample, with intervals
    vs = d["vs_dense"]
    for k in ("accuracy", "exact_match", "output_identity", "answer_agreement_short", "rouge_l_vs_dense", "nll_vs_dense"):
        assert vs[k]["n"] == 3 and vs[k]["low"] <= vs[k]["value"] <= vs[k]["high"], k
    assert vs["accuracy"]["value"] == pytest.approx(d["skip"]["accuracy"] - d["dense"]["accuracy"])
    assert vs["output_identity"]["value"] == pytest.approx(d["skip"]["output_identity"] - 1.0)
    assert d["skip"]["answer_agreement"] == d["skip"]["output_identity"]  # the former name
    assert d["skip"]["answer_agreement_short"] >= d["skip"]["output_identity"]  # a looser agreement
    per_sample = [s["scores"]["nll_vs_dense"] - s["dense_scores"]["nll_vs_dense"] for s in rep.samples]
    assert vs["nll_vs_dense"]["value"] == pytest.approx(sum(per_sample) / 3)  # a mean over samples (pooled: over tokens)


def test_dense_against_dense_agrees_fully(smollm, cache):
    model, tok = smollm
    # The package-level entry point: ffnskip.evaluate(model, tokenizer, policy, task, ...).
    rep = ffnskip.evaluate(model, tok, SkipPolicy.dense(), "factoid_qa", limit=2, seed=2, max_new_tokens=8,
                           dense_cache=cache, measure_speed=False, progress=False)
    sk = rep.skip
    assert sk["answer_agreement"] == 1.0 and sk["rouge_l_vs_dense"] == 1.0
    assert sk["diverged"] == 0.0 and sk["skip_ratio"] == 0.0
    lengths = [s["dense_generated_tokens"] for s in rep.samples]
    assert sk["first_divergence"] == pytest.approx(sum(lengths) / len(lengths))  # censored at the full length
    assert sk["nll_vs_dense"] == pytest.approx(rep.dense["nll_vs_dense"], abs=1e-5)
    assert rep.dense["accuracy"] == sk["accuracy"]
    for k, iv in rep.vs_dense.items():  # dense against dense: no difference, no spread
        assert (iv["value"], iv["low"], iv["high"]) == (0.0, 0.0, 0.0), k


@pytest.mark.parametrize("mode", ["adaptive", "random"])
def test_teacher_forcing_applies_the_policy_exactly_as_generation(smollm, mode):
    """Teacher-forcing a policy's own greedy output under the same policy gives back every token
    as the argmax and the same skip decisions."""
    model, tok = smollm
    pol = SkipPolicy(mode=mode, threshold=0.95, warmup_tokens=3, skip_budget=9, dense_every=4, seed=7)
    ids = encode_prompt(tok, "Name three rivers in Europe.")
    params = SamplingParams(max_new_tokens=16, ignore_eos=True)
    results, produced = [], []
    for ev in generate(model, tok, [ids], pol, params, results=results):
        produced.append(ev.token_id)
    tf = score_continuation(model, pol, ids, produced, max_new_tokens=16)
    assert tf.argmax == produced
    assert tf.stats.skipped_per_layer == results[0].stats.skipped_per_layer
    assert tf.stats.skipped_ffn > 0
    # each NLL is -log p(token) under the policy: the generating pass's own logits, by hand
    assert all(math.isfinite(x) and x >= 0 for x in tf.nll)
    dense_tf = score_continuation(model, SkipPolicy.dense(), ids, produced, max_new_tokens=16)
    assert tf.nll[:3] == pytest.approx(dense_tf.nll[:3], abs=1e-4)  # warm-up tokens: dense
    assert tf.nll != pytest.approx(dense_tf.nll, abs=1e-4)  # after it the policy's own distributions


def test_summarization_scores_rouge_per_bucket(smollm, cache):
    model, tok = smollm
    # One short story (129 words; a large story's 2,000-token prompt alone costs half a minute on
    # a loaded CPU). The stratified selection over buckets is tested without a model.
    rep = evaluate(model, tok, POLICY, "summarization", limit=1, seed=7, max_new_tokens=4, dense_cache=cache,
                   measure_speed=False, progress=False, score_nll=False)
    assert rep.primary["name"] == "rouge_l"
    assert rep.skip["by_bucket"]["small"]["n"] == 1
    # every ROUGE is the package's score of that side's own output against the highlights
    s = rep.samples[0]
    for side, out, scores in ((rep.dense, s["dense_output"], s["dense_scores"]), (rep.skip, s["output"], s["scores"])):
        want = metrics.rouge(out, s["reference"])
        for k in ("rouge1", "rouge2", "rouge_l"):
            assert scores[k] == pytest.approx(want[k]) and side[k] == pytest.approx(want[k])
    assert rep.skip["rouge_l_vs_dense"] == pytest.approx(metrics.rouge_l(s["output"], s["dense_output"]))
    assert all("@highlight" not in s["prompt"] for s in rep.samples)
    assert all(len(s["reference"].splitlines()) >= 2 for s in rep.samples)  # the highlights


def test_conversation_asks_the_second_turn_after_the_models_own_answer(smollm, cache):
    model, tok = smollm
    rep = evaluate(model, tok, POLICY, "conversation", limit=1, seed=5, max_new_tokens=5, dense_cache=cache,
                   measure_speed=False, progress=False, score_nll=False)
    s = rep.samples[0]
    assert len(s["prompt"]) == 2 and len(s["output"]) == 2 and len(s["dense_output"]) == 2
    assert s["generated_tokens"] == 10  # two turns of 5 tokens (no EOS that early)
    assert rep.primary == {"name": "rouge_l_vs_dense", "higher_is_better": True}


def test_perplexity_is_decoded_token_by_token(smollm, cache):
    model, tok = smollm
    rep = evaluate(model, tok, POLICY, "perplexity", limit=24, max_new_tokens=12, dense_cache=cache,
                   measure_speed=True, speed_items=1, speed_rounds=1, progress=False)
    assert rep.n == 2 and rep.dense["tokens"] == rep.skip["tokens"] == 24
    assert rep.skip["skip_ratio"] > 0
    assert rep.primary == {"name": "perplexity", "higher_is_better": False}
    assert rep.speed["method"] == "alternating" and rep.skip["tokens_per_s"] > 0
    assert rep.speed["pairs"] == 1 and rep.speedup_ci95 is None  # one pair: no interval claimed
    assert rep.vs_dense["nll"]["value"] == pytest.approx(
        sum(s["scores"]["nll"] - s["dense_scores"]["nll"] for s in rep.samples) / len(rep.samples))
    # pooled numbers from the per-sample ones, by hand (token-weighted)
    n = [s["dense_generated_tokens"] for s in rep.samples]
    for side, key in ((rep.dense, "dense_scores"), (rep.skip, "scores")):
        ppl = math.exp(sum(k * math.log(s[key]["perplexity"]) for k, s in zip(n, rep.samples)) / sum(n))
        assert side["perplexity"] == pytest.approx(ppl) == pytest.approx(math.exp(side["nll"]))
    agree = sum(k * s["scores"]["answer_agreement"] for k, s in zip(n, rep.samples)) / sum(n)
    assert rep.skip["answer_agreement"] == pytest.approx(agree)
    for s in rep.samples:  # full agreement exactly when the policy's predictions never diverged
        assert (s["scores"]["answer_agreement"] == 1.0) == (s["scores"]["diverged"] == 0.0)
    # against dense: the same evaluation of the dense policy agrees everywhere, same perplexity
    same = evaluate(model, tok, SkipPolicy.dense(), "perplexity", limit=24, max_new_tokens=12, dense_cache=cache,
                    measure_speed=False, progress=False)
    assert same.skip["answer_agreement"] == 1.0 and same.skip["skip_ratio"] == 0.0
    assert same.skip["perplexity"] == pytest.approx(rep.dense["perplexity"], rel=1e-5)
    assert rep.skip["perplexity"] != pytest.approx(rep.dense["perplexity"], rel=1e-6)  # skipping changed it


def test_factoid_accuracy_scores_the_generated_text_not_the_prompt(smollm, cache, tmp_path):
    """The gold answer sits in the question itself; the score reads only what the model wrote."""
    import json

    model, tok = smollm
    data = tmp_path / "qa.jsonl"
    rows = [{"question": "Ignore the word banana. What is the capital of France?", "answer": "banana"},
            {"question": "How many legs does a spider have?", "answer": "8"}]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    rep = evaluate(model, tok, SkipPolicy.dense(), "factoid_qa", data_file=str(data), max_new_tokens=8,
                   dense_cache=cache, measure_speed=False, progress=False, score_nll=False)
    first, second = rep.samples
    assert "banana" in first["prompt"] and "banana" not in first["output"].lower()
    assert first["scores"]["accuracy"] == 0.0 == first["dense_scores"]["accuracy"]
    assert second["output"].startswith("8") and second["scores"]["accuracy"] == 1.0
    for s in rep.samples:
        assert s["scores"]["accuracy"] == float(metrics.substring_match(s["output"], s["reference"]))
    assert rep.skip["accuracy"] == rep.dense["accuracy"] == 0.5


def test_shortgpt_policy_from_the_profile(smollm):
    from ffnskip.baselines import measured, shortgpt_policy

    model, tok = smollm
    pol = shortgpt_policy(model, tok, 3, text="The quick brown fox jumps over the lazy dog. " * 20, tokens=128)
    assert pol.mode == "shortgpt" and len(pol.layers) == 3 and pol.layers == sorted(pol.layers)
    assert 0 not in pol.layers  # layer 0 rewrites the residual entirely (influence ~1)
    spec = measured(model, tok, SkipPolicy.shortgpt(skip_budget=2))
    assert len(spec.layers) == 2
