"""The compiled decode layer (``ffnskip.compiled``, opt-in): the same tokens and skip decisions as
the eager fast path. It compiles (Inductor, seconds per graph on 2 cores), so only this file does."""

import gc

import pytest
from tiny import TinyTokenizer, tiny_model

from ffnskip import SamplingParams, SkipPolicy, compiled as cm, generate
from ffnskip.fastpath import FastDecoder

TOK = TinyTokenizer()
PROMPTS = [[5, 17, 33, 2, 90, 41], [7, 7, 120], [200, 3, 64, 9, 11, 150, 31, 8, 77]]  # unequal: padded


def run(model, prompts, policy, compiled: bool, n=14, monkeypatch=None):
    monkeypatch.setenv("FFNSKIP_COMPILE", "1" if compiled else "0")
    results = []
    for _ in generate(model, TOK, prompts, policy, SamplingParams(max_new_tokens=n, ignore_eos=True), results=results, fast=True):
        pass
    return results


@pytest.fixture(scope="module")
def model():
    return tiny_model("qwen2")  # q/k/v biases: the custom op adds them


def test_env_switch_is_read_per_decoder(model, monkeypatch):
    monkeypatch.setenv("FFNSKIP_COMPILE", "yes")
    assert FastDecoder(model, 1, 8, False).compiled
    monkeypatch.setenv("FFNSKIP_COMPILE", "0")
    assert not FastDecoder(model, 1, 8, False).compiled
    assert FastDecoder(model, 1, 8, False, compiled=True).compiled


def test_compiled_layers_give_the_eager_tokens_and_skips(model, monkeypatch):
    dense = SkipPolicy.dense()
    # batch 1 and a padded batch (the masked graph), dense
    for prompts in ([PROMPTS[0]], PROMPTS):
        a, b = run(model, prompts, dense, False, monkeypatch=monkeypatch), run(model, prompts, dense, True, monkeypatch=monkeypatch)
        assert [r.token_ids for r in a] == [r.token_ids for r in b]
        assert len(set(a[0].token_ids)) > 3
    # the adaptive test on the compiled layers' h and x; rows split the batch (those layers run eager)
    pol = SkipPolicy(threshold=0.9, layer_start=2, layer_end=7, warmup_tokens=2, skip_budget=3, dense_every=3)
    a, b = run(model, PROMPTS, pol, False, monkeypatch=monkeypatch), run(model, PROMPTS, pol, True, monkeypatch=monkeypatch)
    assert sum(r.stats.skipped_ffn for r in a) > 0
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert [r.stats.skipped_per_layer for r in a] == [r.stats.skipped_per_layer for r in b]
    # every row skipping the same layers: the graph without the FFN
    every = SkipPolicy(threshold=-1.0, layer_start=2, layer_end=7, warmup_tokens=1, skip_budget=4)
    a, b = run(model, [PROMPTS[0]], every, False, monkeypatch=monkeypatch), run(model, [PROMPTS[0]], every, True, monkeypatch=monkeypatch)
    assert a[0].stats.skipped_ffn > 0
    assert a[0].token_ids == b[0].token_ids
    assert a[0].stats.skipped_per_layer == b[0].stats.skipped_per_layer


def test_handles_do_not_keep_a_dropped_model_alive():
    m = tiny_model("llama", layers=2)
    dec = FastDecoder(m, 1, 8, False, compiled=True)
    h = cm.handle(dec.layers[0].qkv)
    assert cm.handle(dec.layers[0].qkv) is h  # registered once
    key = int(h)
    assert key in cm._MATS
    del dec, m  # the weights' fast-path copies live on the model's layers
    gc.collect()
    assert key not in cm._MATS
