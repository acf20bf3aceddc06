"""The engine on the real embedded default model, SmolLM2-135M-Instruct (30 layers)."""

import pytest
import torch

import ffnskip
from ffnskip import SamplingParams, SkipPolicy, encode_prompt, generate, generate_text

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm():
    return ffnskip.load_model("smollm2-135m")


def test_dense_raw_equals_transformers_greedy_generate(smollm):
    model, tok = smollm
    prompt = "The capital of France is"
    (res,), _ = generate_text(model, tok, [prompt], SkipPolicy.dense(), SamplingParams(max_new_tokens=24), raw=True)
    enc = tok(prompt, return_tensors="pt")
    ref = model.generate(**enc, max_new_tokens=24, do_sample=False)
    ref_text = tok.decode(ref[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert res.text == ref_text
    assert "Paris" in res.text


def test_issue_policy_gives_the_hand_computed_ratios(smollm):
    model, tok = smollm
    pol = SkipPolicy.from_dict(
        {"mode": "adaptive", "threshold": -1, "layer_start": 5, "layer_end": 25, "warmup_tokens": 8, "skip_budget": 9, "dense_every": 0}
    )
    (res,), _ = generate_text(model, tok, ["Tell me about the sea."], pol, SamplingParams(max_new_tokens=40, ignore_eos=True))
    st = res.stats
    assert st.generated_tokens == 40
    assert st.skip_ratio == pytest.approx(0.24)
    assert st.skip_ratio_post_warmup == pytest.approx(0.30)
    assert st.skipped_per_layer == [0] * 5 + [32] * 9 + [0] * 16


def test_batch_of_three_equals_three_single_runs(smollm):
    model, tok = smollm
    prompts = ["What is 2 + 2?", "Name a colour of the sky on a clear day and say why it looks that way.", "Hi"]
    pol = SkipPolicy(threshold=0.9, warmup_tokens=4, skip_budget=6, dense_every=3)
    params = SamplingParams(max_new_tokens=16, ignore_eos=True)
    batch, _ = generate_text(model, tok, prompts, pol, params)
    assert sum(r.stats.skipped_ffn for r in batch) > 0
    for p, b in zip(prompts, batch):
        (s,), _ = generate_text(model, tok, [p], pol, params)
        assert b.text == s.text
        assert b.stats.skipped_per_layer == s.stats.skipped_per_layer
        assert b.stats.skip_ratio == s.stats.skip_ratio


def test_streaming_deltas_concatenate_to_the_text_and_stop_strings_cut(smollm):
    model, tok = smollm
    ids = [encode_prompt(tok, "Write one sentence about the moon.")]
    (full,), _ = generate_text(model, tok, ["Write one sentence about the moon."], SkipPolicy.dense(), SamplingParams(max_new_tokens=30))
    stop = full.text[len(full.text) // 2 : len(full.text) // 2 + 4]
    assert stop.strip()
    results, deltas = [], []
    for ev in generate(model, tok, ids, SkipPolicy.dense(), SamplingParams(max_new_tokens=30, stop=(stop,)), results=results):
        deltas.append(ev.delta)
    assert "".join(deltas) == results[0].text
    assert results[0].text == full.text[: full.text.index(stop)]
    assert results[0].finish_reason == "stop"


def test_eos_ends_generation_early(smollm):
    model, tok = smollm
    (res,), _ = generate_text(model, tok, ["Say only the word yes."], SkipPolicy.dense(), SamplingParams(max_new_tokens=60))
    assert res.finish_reason == "stop" and res.stats.generated_tokens < 60


def test_gemma3_second_architecture_runs_and_skips():
    try:
        model, tok = ffnskip.load_model("gemma3-270m")
    except Exception as exc:  # the package is part of the pinned install; surface why it failed
        pytest.fail(f"gemma3-270m failed to load: {exc}")
    assert model.config.model_type == "gemma3_text"
    pol = SkipPolicy(threshold=-1, layer_start=4, layer_end=14, warmup_tokens=4, skip_budget=4, dense_every=0)
    (res,), _ = generate_text(model, tok, ["The capital of France is"], pol, SamplingParams(max_new_tokens=12, ignore_eos=True))
    L = model.config.num_hidden_layers
    assert res.stats.skipped_per_layer == [0] * 4 + [8] * 4 + [0] * (L - 8)
    dense, _ = generate_text(model, tok, ["The capital of France is"], SkipPolicy.dense(), SamplingParams(max_new_tokens=12), raw=True)
    enc = tok("The capital of France is", return_tensors="pt")
    ref = model.generate(**enc, max_new_tokens=12, do_sample=False)
    assert dense[0].text == tok.decode(ref[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def test_ffn_share_from_shapes(smollm):
    model, _ = smollm
    share = ffnskip.ffn_share(model)
    # SmolLM2-135M: 30 layers, hidden 576, FFN 1536 (gate, up, down), 9 query heads and 3 K/V
    # heads of 64, vocabulary 49152 (the tied LM head counts: it is read every token)
    L, D, F, kv, V = 30, 576, 1536, 3 * 64, 49152
    ffn, attn = 3 * D * F, 2 * D * D + 2 * D * kv
    assert share == pytest.approx(L * ffn / (L * (ffn + attn) + V * D), rel=1e-12)
    assert torch.is_tensor(model.lm_head.weight)
