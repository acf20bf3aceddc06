"""The engine on tiny random models of every supported family (fast, CPU)."""

import pytest
import torch
from tiny import FAMILIES, TinyTokenizer, tiny_model

from ffnskip import SamplingParams, SkipPolicy, UnsupportedArchitecture, generate, get_adapter
from ffnskip.decode import new_cache
from ffnskip.saturation import layer_cosines

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


def test_dense_every_schedule(model):
    pol = SkipPolicy(threshold=-1, layer_start=5, layer_end=7, warmup_tokens=2, skip_budget=2, dense_every=3)
    st = run(model, [PROMPTS[1]], pol, n=11)[0].stats
    skipping_tokens = [t for t in range(2, 11) if (t - 2) % 3 != 2]  # every 3rd post-warm-up token dense
    assert st.skipped_per_layer == [0] * 5 + [len(skipping_tokens)] * 2 + [0]


def test_warmup_zero_with_threshold_minus_one_skips_k_per_decode_step(model):
    """Every token but the prompt pass's (token 0, always dense) skips exactly k FFNs."""
    n, k = 12, 3
    pol = SkipPolicy(threshold=-1, layer_start=2, layer_end=7, warmup_tokens=0, skip_budget=k, dense_every=0)
    st = run(model, [PROMPTS[0]], pol, n=n)[0].stats
    assert st.skipped_ffn == k * (n - 1)
    assert st.skipped_per_layer == [0, 0, n - 1, n - 1, n - 1, 0, 0, 0]


def _zero_ffn_at(model, j):
    """Layer j's FFN outputs zero, so cos(h, x) = 1 there and only there (checked)."""
    layer = get_adapter(model).layers(model)[j]
    with torch.no_grad():
        layer.mlp.down_proj.weight.zero_()
    ffn_cos, _ = layer_cosines(model, torch.tensor([PROMPTS[0]]))
    tau = 0.99999
    assert ffn_cos[j].min() > tau
    assert torch.cat([ffn_cos[:j], ffn_cos[j + 1 :]]).max() < tau  # nothing else crosses
    return tau


@pytest.mark.parametrize("lagged", [False, True])
@pytest.mark.parametrize("fast", [False, True])
def test_a_run_is_clamped_at_the_cold_end(lagged, fast):
    """A crossing late in the band: the run j+1 .. j+k would enter the cold end; it stops at
    layer_end - 1 (j = 4, k = 4, band [1, 7): layers 5 and 6 only)."""
    model = tiny_model("llama", layers=8, seed=1)
    tau = _zero_ffn_at(model, 4)
    pol = SkipPolicy(threshold=tau, layer_start=1, layer_end=7, warmup_tokens=2, skip_budget=4, dense_every=0, lagged=lagged)
    st = run(model, [PROMPTS[0]], pol, n=10, fast=fast)[0].stats
    post = 10 - 2  # tokens 2..9 (lagged: the warm-up's cosines decide token 2)
    assert st.trigger_layers == [0, 0, 0, 0, post, 0, 0, 0]
    assert st.skipped_per_layer == [0, 0, 0, 0, 0, post, post, 0]


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
    model = tiny_model("llama", layers=8, seed=1)
    tau = _zero_ffn_at(model, 4)
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


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_ffn_share_from_hand_computed_shapes(family):
    """method.md §3: FFN matmul weights / all per-token matmul weights, LM head included."""
    from ffnskip import ffn_share

    model = tiny_model(family)
    L, D, V = 8, 64, 256
    if family == "llama":  # gate, up, down [128 x 64]; q, o [64 x 64]; k, v [32 x 64] (2 of 4 heads)
        ffn, attn = 3 * D * 128, 2 * D * D + 2 * D * 32
    else:  # GPT-2: c_fc, c_proj of the MLP [64 x 256]; c_attn [64 x 192], c_proj [64 x 64]
        ffn, attn = 2 * D * 4 * D, D * 3 * D + D * D
    assert ffn_share(model) == pytest.approx(L * ffn / (L * (ffn + attn) + V * D), rel=1e-12)


def test_unsupported_architecture_lists_supported():
    import transformers

    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    with pytest.raises(UnsupportedArchitecture) as err:
        get_adapter(cfg)
    for name in ("llama", "gemma3_text", "gpt2", "qwen3", "mistral"):
        assert name in str(err.value)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
@pytest.mark.parametrize("mode", ["adaptive", "static", "random", "shortgpt", "skipdecode"])
def test_fast_path_and_model_forward_agree(mode, family):
    model = tiny_model(family)
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
def test_panelled_matmul_is_deterministic_and_agrees_with_a_plain_matmul(rows):
    """What the fast path guarantees of its column panels (one per core): for a fixed panel count
    the result is bit-identical run to run; across panel counts, and against F.linear, it agrees
    to float rounding only (a BLAS may block a narrower panel differently: seen on AVX-512/AMX)."""
    from ffnskip.fastpath import _matmul, _panels

    torch.manual_seed(0)
    w = torch.randn(96, 40)  # [out, in]
    x = torch.randn(rows, 1, 40)
    ref = torch.nn.functional.linear(x, w)  # [rows, 1, 96]
    for p in (1, 2, 4, 5):  # 5 does not divide 96: one panel
        panels = _panels(w, p)
        assert panels.shape == ((1, 40, 96) if p in (1, 5) else (p, 40, 96 // p))
        # panel j holds output columns [j out/p, (j+1) out/p), input-major
        assert torch.equal(panels[-1, :, -1], w[-1])
        y = _matmul(x, panels)
        assert y.shape == (rows, 1, 96)
        assert torch.equal(_matmul(x, panels), y)  # deterministic for this panel count
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


def test_the_dense_cache_key_covers_threads_and_cpu():
    """A dense decode cached under other numerics settings (threads = panels, the CPU's kernels)
    is never reused: the key changes with them."""
    from ffnskip.eval.cache import DenseCache
    from ffnskip.eval.generation import _dense_generate
    from ffnskip.eval.identity import _numerics
    from ffnskip.fastpath import numerics_key

    model = tiny_model("llama")
    key = numerics_key("cpu")
    assert {"panels", "threads", "cpu_capability", "cpu"} <= set(key)
    threads = torch.get_num_threads()
    cache = DenseCache(None)

    class Bar:
        def update(self, n):
            pass

    params = SamplingParams(max_new_tokens=4, ignore_eos=True)
    try:
        torch.set_num_threads(1)
        one = _numerics(model)
        _dense_generate(model, TOK, [PROMPTS[0]], params, 1, cache, "fp", Bar())
        assert (cache.misses, cache.hits) == (1, 0)
        _dense_generate(model, TOK, [PROMPTS[0]], params, 1, cache, "fp", Bar())
        assert (cache.misses, cache.hits) == (1, 1)
        torch.set_num_threads(2)
        assert _numerics(model) != one and _numerics(model)["panels"] == 2 != one["panels"]
        _dense_generate(model, TOK, [PROMPTS[0]], params, 1, cache, "fp", Bar())
        assert (cache.misses, cache.hits) == (2, 1)  # other threads: decoded afresh
    finally:
        torch.set_num_threads(threads)


def _biased(family: str, seed: int = 3):
    """A tiny model with every bias its config allows, all random and non-zero."""
    import transformers
    from tiny import tiny_config

    cfg = tiny_config(family)
    cfg.attention_bias = True
    if family == "llama":
        cfg.mlp_bias = True
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    n = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, 0.5)
                n += 1
    return model, n


@pytest.mark.parametrize("family, biases_per_layer", [("llama", 7), ("qwen3", 4)])
def test_fast_path_is_exact_on_biased_models(family, biases_per_layer):
    """LLaMA with attention_bias and mlp_bias, Qwen3 with attention_bias: the fast path adds
    every bias (q/k/v, o_proj, gate/up/down), so dense greedy decoding is transformers'."""
    from ffnskip.fastpath import FastDecoder

    model, n = _biased(family)
    assert n == 8 * biases_per_layer  # q, k, v, o (+ gate, up, down)
    assert FastDecoder.supports(model, 64) is None  # the default path is the fast one
    prompt = PROMPTS[0]
    ref = model.generate(
        torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long), max_new_tokens=24, do_sample=False
    )[0, len(prompt):].tolist()
    assert run(model, [prompt], SkipPolicy.dense(), n=24)[0].token_ids == ref  # fast=None: the default
    assert run(model, [prompt], SkipPolicy.dense(), n=24, fast=True)[0].token_ids == ref
    assert len(set(ref)) > 3
    # with the biases zeroed the tokens change: the test really depends on them
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.zero_()
    assert run(model, [prompt], SkipPolicy.dense(), n=24)[0].token_ids != ref
    # skipping on the biased model: fast path and the model's own forward agree
    model, _ = _biased(family)
    pol = SkipPolicy(threshold=0.3, layer_start=2, layer_end=7, warmup_tokens=2, skip_budget=3, dense_every=3)
    a, b = run(model, PROMPTS, pol, n=14, fast=False), run(model, PROMPTS, pol, n=14, fast=True)
    assert sum(r.stats.skipped_ffn for r in a) > 0
    assert [r.token_ids for r in a] == [r.token_ids for r in b]


def test_fast_path_refuses_what_it_cannot_compute():
    from ffnskip.fastpath import FastDecoder

    model = tiny_model("llama")
    model.config.hidden_act = "gelu"
    assert "activation" in FastDecoder.supports(model, 64)
    model = tiny_model("llama")
    mlp = model.model.layers[0].mlp
    mlp.down_proj = torch.nn.Sequential(mlp.down_proj)  # same numbers, not a plain linear
    assert "down_proj" in FastDecoder.supports(model, 64)
    with pytest.raises(Exception, match="does not support"):
        run(model, [PROMPTS[0]], SkipPolicy.dense(), n=2, fast=True)


class _FFNRows:
    """Counts the rows every FFN computes in decode steps (T = 1), for both paths: on the
    model's own forward the FFN module's input, on the fast path ``FastDecoder._mlp``'s."""

    def __init__(self, model, monkeypatch):
        from ffnskip.fastpath import FastDecoder

        layers = list(get_adapter(model).layers(model))
        index = {id(layer): i for i, layer in enumerate(layers)}
        self.rows = [0] * len(layers)
        self.fast_layers = {}
        for i, layer in enumerate(layers):
            mlp = layer.mlp
            orig = mlp.forward

            def spy(x, *a, _i=i, _orig=orig, **k):
                if x.shape[1] == 1:
                    self.rows[_i] += x.shape[0]
                return _orig(x, *a, **k)

            monkeypatch.setattr(mlp, "forward", spy, raising=False)
        orig_mlp, orig_pack = FastDecoder._mlp, FastDecoder._pack
        counter = self

        def pack(fd, adapter, layer):
            lw = orig_pack(fd, adapter, layer)
            counter.fast_layers[id(lw)] = index[id(layer)]
            return lw

        def mlp_spy(fd, lw, h):
            counter.rows[counter.fast_layers[id(lw)]] += h.shape[0]
            return orig_mlp(fd, lw, h)

        monkeypatch.setattr(FastDecoder, "_pack", pack)
        monkeypatch.setattr(FastDecoder, "_mlp", mlp_spy)


@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("mode", ["random", "adaptive"])
def test_the_ffn_computes_only_the_rows_that_do_not_skip_it(fast, mode, monkeypatch):
    """Rows of one batch skip different layers (random: per-sequence choices; adaptive: per-row
    cosines); every FFN receives exactly the rows that run it, and the batch still equals the
    single runs (the right rows were computed)."""
    model = tiny_model("qwen2")
    pol = SkipPolicy(mode=mode, threshold=0.3, layer_start=1, layer_end=7, warmup_tokens=1, skip_budget=3, dense_every=0, seed=5)
    n = 10
    spy = _FFNRows(model, monkeypatch)
    batch = run(model, PROMPTS, pol, n=n, fast=fast)
    per_row = [r.stats.skipped_per_layer for r in batch]
    assert len({tuple(p) for p in per_row}) > 1  # the rows really skip differently
    expected = [sum(n - 1 - p[i] for p in per_row) for i in range(8)]  # n - 1 decode steps per row
    assert spy.rows == expected
    monkeypatch.undo()
    for prompt, b in zip(PROMPTS, batch):
        assert run(model, [prompt], pol, n=n, fast=fast)[0].token_ids == b.token_ids


@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("mode", ["dense", "static"])
def test_finished_and_cancelled_rows_compute_no_ffn(fast, mode, monkeypatch):
    """Row 1 is cancelled after 3 tokens, row 2 ends on EOS after 5: from their last token on,
    no FFN computes them, in every mode (dense too), while row 0 goes on to 10."""
    model = tiny_model("llama")
    pol = SkipPolicy.dense() if mode == "dense" else SkipPolicy(mode="static", layer_start=2, layer_end=7, warmup_tokens=2, skip_budget=2, dense_every=0)
    n = 10
    free = run(model, PROMPTS, pol, n=n, fast=fast)
    eos = free[2].token_ids[4]
    if eos in free[2].token_ids[:4] or eos in free[0].token_ids:
        pytest.fail("pick another EOS token for this tiny model")  # the choice below relies on it
    model.generation_config.eos_token_id = eos
    spy = _FFNRows(model, monkeypatch)
    results = []
    params = SamplingParams(max_new_tokens=n)
    cancel = lambda r: r == 1 and len(results[1].token_ids) >= 3  # noqa: E731
    for _ in generate(model, TOK, PROMPTS, pol, params, results=results, fast=fast, cancelled=cancel):
        pass
    assert [r.finish_reason for r in results] == ["length", "cancelled", "stop"]
    steps = [n - 1, 3 - 1, 5 - 1]  # decode passes each row took part in (the EOS token is the 5th)
    expected = [sum(s - r.stats.skipped_per_layer[i] for s, r in zip(steps, results)) for i in range(8)]
    assert spy.rows == expected


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
