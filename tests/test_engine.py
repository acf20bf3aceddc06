"""The engine on tiny random models of every supported family (fast, CPU)."""

import pytest
import torch
from tiny import FAMILIES, TinyTokenizer, tiny_model

from ffnskip import SamplingParams, SkipPolicy, UnsupportedArchitecture, generate, get_adapter
from ffnskip.decode import new_cache
from ffnskip.profile import layer_cosines

TOK = TinyTokenizer()
PROMPTS = [[5, 17, 33, 2, 90, 41], [7, 7, 120], [200, 3, 64, 9, 11, 150, 31, 8, 77]]


def run(model, prompts, policy, n=16, fast=None, **kw):
    results = []
    params = SamplingParams(max_new_tokens=n, ignore_eos=True, **kw)
    for _ in generate(model, TOK, prompts, policy, params, results=results, fast=fast):
        pass
    return results


@pytest.fixture(scope="module", params=FAMILIES)
def model(request):
    return tiny_model(request.param)


@pytest.mark.parametrize("fast", [False, None])
def test_dense_is_token_identical_to_transformers_generate(model, fast):
    prompt = PROMPTS[0]
    ours = run(model, [prompt], SkipPolicy.dense(), n=24, fast=fast)[0].token_ids
    ref = model.generate(
        torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        max_new_tokens=24,
        do_sample=False,
    )[0, len(prompt):].tolist()
    assert ours == ref
    assert len(set(ours)) > 3  # the tiny model really produces varied text


def test_threshold_above_one_never_skips(model):
    r = run(model, [PROMPTS[0]], SkipPolicy(threshold=1.5, warmup_tokens=0, dense_every=0, layer_start=1, layer_end=7, skip_budget=3))[0]
    assert r.stats.skipped_ffn == 0 and r.stats.skip_ratio == 0.0
    assert r.token_ids == run(model, [PROMPTS[0]], SkipPolicy.dense())[0].token_ids


def test_threshold_minus_one_skips_exactly_the_first_k_eligible_layers(model):
    L, W, k, n = 8, 5, 3, 16
    pol = SkipPolicy(threshold=-1, layer_start=2, layer_end=7, warmup_tokens=W, skip_budget=k, dense_every=0)
    st = run(model, [PROMPTS[0]], pol, n=n)[0].stats
    post = n - W  # tokens W..n-1
    assert st.skipped_per_layer == [0, 0, post, post, post, 0, 0, 0]
    assert st.trigger_layers == [0, post, 0, 0, 0, 0, 0, 0]  # the test after layer 1 starts every run
    assert st.skipped_ffn == k * post
    assert st.skip_ratio == pytest.approx(k * post / (L * n))
    assert st.skip_ratio_post_warmup == pytest.approx(k * post / (L * (n - W)))


def test_dense_every_schedule_and_cold_end(model):
    # budget larger than what is left of the band: the run stops at layer_end - 1
    pol = SkipPolicy(threshold=-1, layer_start=5, layer_end=7, warmup_tokens=2, skip_budget=2, dense_every=3)
    st = run(model, [PROMPTS[1]], pol, n=11)[0].stats
    skipping_tokens = [t for t in range(2, 11) if (t - 2) % 3 != 2]
    assert st.skipped_per_layer[5] == st.skipped_per_layer[6] == len(skipping_tokens)
    assert st.skipped_per_layer[7] == 0


def test_skipped_layer_returns_the_residual_unchanged(model):
    """The zero trick is exact for every family: a skipped layer's output is its pre-FFN residual."""
    adapter = get_adapter(model)
    layer = adapter.layers(model)[3]
    seen = {}
    h1 = adapter.ffn_norm_module(layer).register_forward_pre_hook(lambda m, a: seen.__setitem__("h", a[0].clone()))
    h2 = layer.register_forward_hook(lambda m, a, o: seen.__setitem__("x", (o[0] if isinstance(o, tuple) else o).clone()))
    try:
        pol = SkipPolicy(mode="static", layer_start=3, layer_end=6, warmup_tokens=1, skip_budget=1, dense_every=0)
        run(model, [PROMPTS[0]], pol, n=3, fast=False)  # the model's own forward, hooks observable
    finally:
        h1.remove()
        h2.remove()
    assert torch.equal(seen["h"], seen["x"])  # last pass (token 2) skipped layer 3's FFN


def test_run_starts_after_the_layer_whose_similarity_crosses():
    """Hand-built: layer j's FFN outputs zero, so cos(h, x) = 1 there and only there."""
    model = tiny_model("llama", layers=8, seed=1)
    j = 4
    layer = get_adapter(model).layers(model)[j]
    with torch.no_grad():
        layer.mlp.down_proj.weight.zero_()
    ffn_cos, _ = layer_cosines(model, torch.tensor([PROMPTS[0]]))
    tau = 0.99999
    assert ffn_cos[j].min() > tau
    others = torch.cat([ffn_cos[:j], ffn_cos[j + 1 :]])
    assert others.max() < tau  # nothing else crosses
    pol = SkipPolicy(threshold=tau, layer_start=1, layer_end=8, warmup_tokens=2, skip_budget=2, dense_every=0)
    st = run(model, [PROMPTS[0]], pol, n=10)[0].stats
    assert st.trigger_layers == [0, 0, 0, 0, 8, 0, 0, 0]
    assert st.skipped_per_layer == [0, 0, 0, 0, 0, 8, 8, 0]  # run = j+1 .. j+k


def test_kv_cache_has_every_layer_for_every_token_under_heavy_skipping(model):
    cache = new_cache(model)
    prompt, n = PROMPTS[2], 12
    results = []
    pol = SkipPolicy(threshold=-1, layer_start=1, layer_end=8, warmup_tokens=0, skip_budget=7, dense_every=0)
    for _ in generate(model, TOK, [prompt], pol, SamplingParams(max_new_tokens=n, ignore_eos=True), results=results, cache=cache, fast=False):
        pass
    assert results[0].stats.skip_ratio > 0.7
    expected = len(prompt) + n - 1  # the last token is never fed back
    L = len(get_adapter(model).layers(model))
    assert len(cache.layers) == L
    for layer in cache.layers:
        if getattr(layer, "is_sliding", False):
            continue  # a sliding-window layer keeps only its window
        assert layer.keys.shape[-2] == expected and layer.values.shape[-2] == expected


@pytest.mark.parametrize("fast", [False, None])
def test_batch_equals_single_runs(model, fast):
    pol = SkipPolicy(threshold=0.5, layer_start=2, layer_end=7, warmup_tokens=3, skip_budget=3, dense_every=4)
    batch = run(model, PROMPTS, pol, n=12, fast=fast)
    for prompt, b in zip(PROMPTS, batch):
        s = run(model, [prompt], pol, n=12, fast=fast)[0]
        assert b.token_ids == s.token_ids
        assert b.stats.to_dict() | {"host_syncs": 0, "syncs_per_token": 0} == s.stats.to_dict() | {"host_syncs": 0, "syncs_per_token": 0}


@pytest.mark.parametrize("mode", ["random", "static"])
def test_baselines_skip_the_requested_number_per_token(model, mode):
    n, W, k = 14, 4, 3
    pol = SkipPolicy(mode=mode, layer_start=2, layer_end=7, warmup_tokens=W, skip_budget=k, dense_every=0, seed=11)
    st = run(model, [PROMPTS[0]], pol, n=n)[0].stats
    assert st.skipped_ffn == k * (n - W)
    assert sum(st.skipped_per_layer[2:7]) == st.skipped_ffn  # only eligible layers
    if mode == "static":
        assert st.skipped_per_layer == [0, 0, n - W, n - W, n - W, 0, 0, 0]


def test_random_is_reproducible_with_its_seed(model):
    def layers(seed):
        pol = SkipPolicy(mode="random", layer_start=1, layer_end=7, warmup_tokens=0, skip_budget=2, dense_every=0, seed=seed)
        return run(model, [PROMPTS[0]], pol, n=16)[0].stats.skipped_per_layer

    assert layers(1) == layers(1)
    assert layers(1) != layers(2)


def test_whole_layer_baselines(model):
    st = run(model, [PROMPTS[0]], SkipPolicy(mode="shortgpt", layers=[3, 5]), n=10)[0].stats
    assert st.skipped_per_layer == [0, 0, 0, 10, 0, 10, 0, 0]  # removed for every token, prompt pass too
    pol = SkipPolicy(mode="skipdecode", layer_start=1, layer_end=7, warmup_tokens=2, skip_budget=2, dense_every=0)
    st = run(model, [PROMPTS[0]], pol, n=20)[0].stats
    assert st.skipped_per_layer[0] == 0 and st.skipped_per_layer[7] == 0
    per_layer = st.skipped_per_layer[1:7]
    assert per_layer == sorted(per_layer, reverse=True)  # lowest band layers skipped most often
    assert 1.4 <= st.skipped_ffn / (20 - 2) <= 2.6  # about k per post-warm-up token


def test_sampling_is_reproducible_with_a_seed(model):
    a = run(model, [PROMPTS[0]], SkipPolicy.dense(), n=12, temperature=1.0, top_p=0.9, top_k=50, seed=5)[0].token_ids
    b = run(model, [PROMPTS[0]], SkipPolicy.dense(), n=12, temperature=1.0, top_p=0.9, top_k=50, seed=5)[0].token_ids
    assert a == b


def test_unsupported_architecture_lists_supported():
    import transformers

    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    with pytest.raises(UnsupportedArchitecture) as err:
        get_adapter(cfg)
    for name in ("llama", "gemma3_text", "gpt2", "qwen3", "mistral"):
        assert name in str(err.value)


@pytest.mark.parametrize("mode", ["adaptive", "static", "shortgpt", "skipdecode"])
def test_fast_path_and_model_forward_agree(mode):
    model = tiny_model("llama")
    kw = {"layers": [2, 5]} if mode == "shortgpt" else dict(threshold=0.3, layer_start=2, layer_end=7, warmup_tokens=2, skip_budget=3, dense_every=3)
    pol = SkipPolicy(mode=mode, **kw)
    a = run(model, PROMPTS, pol, n=14, fast=False)
    b = run(model, PROMPTS, pol, n=14, fast=True)
    assert sum(r.stats.skipped_ffn for r in a) > 0
    for x, y in zip(a, b):
        assert x.token_ids == y.token_ids
        assert x.stats.skipped_per_layer == y.stats.skipped_per_layer


def test_fast_path_cache_has_every_layer_for_every_token():
    from ffnskip.fastpath import FastDecoder

    model = tiny_model("qwen3")
    seen = []
    orig = FastDecoder.step

    def spy(self, *a, **k):
        seen.append(self)
        return orig(self, *a, **k)

    FastDecoder.step = spy
    try:
        pol = SkipPolicy(threshold=-1, layer_start=1, layer_end=8, warmup_tokens=0, skip_budget=7, dense_every=0)
        run(model, [PROMPTS[2]], pol, n=12, fast=True)
    finally:
        FastDecoder.step = orig
    fd = seen[-1]
    n = len(PROMPTS[2]) + 12 - 1
    assert fd.length == n
    for k, v in zip(fd.k, fd.v):
        assert k[:, :, :n].abs().sum(-1).min() > 0 and v[:, :, :n].abs().sum(-1).min() > 0  # every slot written


def test_a_cancelled_row_stops_while_the_others_go_on():
    model = tiny_model("llama")
    results = []
    stop_row_1 = lambda r: r == 1 and len(results[1].token_ids) >= 3  # noqa: E731
    for _ in generate(model, TOK, PROMPTS, SkipPolicy.dense(), SamplingParams(max_new_tokens=10, ignore_eos=True), results=results, cancelled=stop_row_1):
        pass
    assert [len(r.token_ids) for r in results] == [10, 3, 10]
    assert [r.finish_reason for r in results] == ["length", "cancelled", "length"]
    assert results[1].stats.generated_tokens == 3


@pytest.mark.parametrize("rows", [1, 3])
def test_panelled_matmul_equals_a_plain_matmul(rows):
    """The fast path's column panels (one per core) compute the same numbers as one matmul, and
    as F.linear up to float rounding."""
    from ffnskip.fastpath import _matmul, _panels

    torch.manual_seed(0)
    w = torch.randn(96, 40)  # [out, in]
    x = torch.randn(rows, 1, 40)
    ref = _matmul(x, _panels(w, 1))  # [rows, 1, 96]
    assert ref.shape == (rows, 1, 96)
    for p in (2, 4, 5):  # 5 does not divide 96: one panel
        assert _panels(w, p).shape[0] == (1 if p == 5 else p)
        assert torch.equal(_matmul(x, _panels(w, p)), ref)
    assert torch.allclose(ref, torch.nn.functional.linear(x, w), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fast", [False, True])
def test_lagged_adaptive_reads_the_device_once_per_token(fast):
    """lagged: the cosines travel with the sampled token, so a realistic threshold costs no
    extra host synchronisation, and the fast path and the model's forward decide alike."""
    model = tiny_model("llama")
    kw = dict(threshold=0.3, layer_start=2, layer_end=7, warmup_tokens=2, skip_budget=3, dense_every=0)
    lagged = run(model, PROMPTS, SkipPolicy(lagged=True, **kw), n=14, fast=fast)
    eager = run(model, PROMPTS, SkipPolicy(**kw), n=14, fast=fast)
    assert sum(r.stats.skipped_ffn for r in lagged) > 0
    for r in lagged:
        assert r.stats.host_syncs == r.stats.generated_tokens  # exactly 1 per token
    assert sum(r.stats.host_syncs for r in eager) > sum(r.stats.generated_tokens for r in eager)
    other = run(model, PROMPTS, SkipPolicy(lagged=True, **kw), n=14, fast=not fast)
    for x, y in zip(lagged, other):
        assert x.token_ids == y.token_ids
        assert x.stats.skipped_per_layer == y.stats.skipped_per_layer


def test_lagged_with_an_always_firing_threshold_matches_the_eager_rule():
    """threshold -1 fires at the first tested layer whatever the cosines: decided from the previous
    token (warm-up gives it one) or within the token, the runs are the same."""
    model = tiny_model("qwen3")
    kw = dict(threshold=-1, layer_start=2, layer_end=7, warmup_tokens=2, skip_budget=3, dense_every=4)
    a = run(model, PROMPTS, SkipPolicy(lagged=True, **kw), n=12)
    b = run(model, PROMPTS, SkipPolicy(**kw), n=12)
    for x, y in zip(a, b):
        assert x.token_ids == y.token_ids
        assert x.stats.skipped_per_layer == y.stats.skipped_per_layer
        assert x.stats.trigger_layers == y.stats.trigger_layers
        assert sum(x.stats.skipped_per_layer) > 0


def test_lagged_run_starts_after_the_first_layer_above_threshold_one_token_earlier():
    """The rule itself, on recorded numbers: the run of token t starts after the first tested
    layer whose cosine at token t - 1 was above the threshold (nan = FFN not run, never fires)."""
    from ffnskip.engine import SkipController

    model = tiny_model("llama")
    pol = SkipPolicy(lagged=True, threshold=0.5, layer_start=2, layer_end=7, warmup_tokens=0, skip_budget=2, dense_every=0)
    ctl = SkipController(model, pol, [PROMPTS[0], PROMPTS[1]], max_new_tokens=4)
    ctl.begin_step([1, 1])
    assert not any(any(s) for s in ctl._skip)  # nothing measured yet: no run
    nan = float("nan")
    # tested layers 1..5 (runs start at 2..6); row 0 fires at layer 3, row 1 only at a nan
    ctl._cos_dev = {j: torch.zeros(2) for j in range(1, 6)}
    ctl.accept_cosines([[0.1, 0.4, 0.9, 0.95, 0.2], [0.1, 0.2, 0.3, 0.4, 0.45]])
    ctl._cos_prev[1][2] = nan
    ctl.begin_step([2, 2])
    assert [i for i, s in enumerate(ctl._skip[0]) if s] == [4, 5]
    assert ctl.stats[0].trigger_layers[3] == 1
    assert not any(ctl._skip[1])
