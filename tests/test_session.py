"""The decode session: per-row sampling and lengths, rows that join a running batch and rows that
leave it, incremental detokenisation (tiny random models, CPU)."""

from __future__ import annotations

import pytest
from tiny import TinyTokenizer, tiny_model

from ffnskip import SamplingParams, SkipPolicy, generate
from ffnskip.decode import DecodeSession, Detokenizer

TOK = TinyTokenizer()
PROMPTS = [[5, 17, 33, 2, 90, 41], [7, 7, 120], [200, 3, 64, 9, 11, 150, 31, 8, 77]]
SKIP = SkipPolicy(threshold=0.9, layer_start=1, layer_end=7, warmup_tokens=2, skip_budget=3, dense_every=0)


def alone(model, prompt, policy, params, fast):
    results = []
    for _ in generate(model, TOK, [prompt], policy, params, results=results, fast=fast):
        pass
    return results[0]


@pytest.fixture(scope="module", params=["llama", "qwen3", "gemma3_text"])
def model(request):
    return tiny_model(request.param)


@pytest.mark.parametrize("fast", [False, None])
@pytest.mark.parametrize("policy", [SkipPolicy.dense(), SKIP], ids=["dense", "adaptive"])
def test_each_row_ends_at_its_own_length_and_equals_its_prompt_alone(model, fast, policy):
    params = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in (3, 9, 5)]
    results, order = [], []
    for ev in generate(model, TOK, PROMPTS, policy, params, results=results, fast=fast):
        order.append((ev.row, ev.finished))
    assert [len(r.token_ids) for r in results] == [3, 9, 5]
    assert [r.finish_reason for r in results] == ["length"] * 3
    assert [r for r, f in order if f] == [0, 2, 1]  # each row leaves when done
    for prompt, p, r in zip(PROMPTS, params, results):
        a = alone(model, prompt, policy, p, fast)
        assert r.token_ids == a.token_ids
        assert r.stats.skipped_per_layer == a.stats.skipped_per_layer
        assert r.text == TOK.decode(r.token_ids)


def test_per_row_stop_strings_and_sampling(model):
    """A stop string ends its own row only; a seeded sampled row in a batch draws what it draws
    alone (one generator per row)."""
    free = alone(model, PROMPTS[0], SkipPolicy.dense(), SamplingParams(max_new_tokens=8, ignore_eos=True), None)
    stop = f" {free.token_ids[3]}"
    params = [
        SamplingParams(max_new_tokens=8, ignore_eos=True, stop=(stop,)),
        SamplingParams(max_new_tokens=8, ignore_eos=True, temperature=1.0, top_k=20, seed=3),
        SamplingParams(max_new_tokens=8, ignore_eos=True),
    ]
    results = []
    for _ in generate(model, TOK, PROMPTS, SkipPolicy.dense(), params, results=results):
        pass
    assert results[0].finish_reason == "stop" and stop not in results[0].text
    assert results[0].text == TOK.decode(free.token_ids)[: TOK.decode(free.token_ids).find(stop)]
    assert len(results[2].token_ids) == 8
    sampled = alone(model, PROMPTS[1], SkipPolicy.dense(), params[1], None)
    assert results[1].token_ids == sampled.token_ids
    assert results[1].token_ids != alone(model, PROMPTS[1], SkipPolicy.dense(), SamplingParams(max_new_tokens=8, ignore_eos=True), None).token_ids


def test_a_bad_params_list_is_refused(model):
    from ffnskip import GenerationError

    with pytest.raises(GenerationError, match="one per prompt"):
        list(generate(model, TOK, PROMPTS, None, [SamplingParams()] * 2))


RANDOM = SkipPolicy(mode="random", layer_start=1, layer_end=7, warmup_tokens=1, skip_budget=2, dense_every=0, seed=4)
LAGGED = SkipPolicy(threshold=0.9, layer_start=1, layer_end=7, warmup_tokens=2, skip_budget=3, dense_every=0, lagged=True)
SHORT = [7, 7, 120]
LONG = [(i * 37 + 11) % 250 + 1 for i in range(23)]  # longer than Gemma's tiny sliding window (16)
_ALONE: dict = {}
_MODELS: dict = {}


def _model(family):
    if family not in _MODELS:
        _MODELS[family] = tiny_model(family)
    return _MODELS[family]


def alone_cached(family, prompt, policy, n, fast):
    key = (family, tuple(prompt), repr(policy), n, fast)
    if key not in _ALONE:
        _ALONE[key] = alone(_model(family), prompt, policy, SamplingParams(max_new_tokens=n, ignore_eos=True), fast)
    return _ALONE[key]


def run_with_joins(family, policy, fast, chunk):
    """``a`` decodes; ``b`` (23 tokens, longer than the batch so far: the running row moves right)
    joins after 2 steps; ``c`` (6 tokens, shorter: left-padded) is added 2 steps later (with
    chunking, while b's prompt pass is still running: it waits for the next pass). Returns the
    session, (prompt, result, max_new_tokens) per row, and the events of each step after b came."""
    session = DecodeSession(_model(family), TOK, policy, fast=fast, prefill_chunk=chunk)
    rows = [(SHORT, session.add(SHORT, SamplingParams(max_new_tokens=20, ignore_eos=True)), 20)]
    session.step()
    session.step()
    rows.append((LONG, session.add(LONG, SamplingParams(max_new_tokens=5, ignore_eos=True)), 5))
    per_step = []
    while not session.done:
        if len(per_step) == 2:
            rows.append((PROMPTS[0], session.add(PROMPTS[0], SamplingParams(max_new_tokens=8, ignore_eos=True)), 8))
        per_step.append(session.step())
        assert not session.rows or min(r.start for r in session.rows) == 0  # no column is padding for every row
    return session, rows, per_step


JOIN_CASES = [("llama", None), ("qwen3", None), ("llama", False), ("gemma3_text", None), ("gpt2", None)]


@pytest.mark.parametrize("chunk", [None, 5], ids=["whole", "chunk5"])
@pytest.mark.parametrize("policy", [SkipPolicy.dense(), SKIP], ids=["dense", "adaptive"])
@pytest.mark.parametrize("family, fast", JOIN_CASES, ids=[f"{f}-{'hook' if x is False else 'auto'}" for f, x in JOIN_CASES])
def test_rows_join_a_running_batch_and_each_equals_its_prompt_alone(family, fast, policy, chunk):
    """Both paths (the fast path's cache; the model's own forward with its DynamicCache, Gemma 3's
    sliding-window layers included): rows added while others decode join mid-batch, with their
    prompt pass whole or in chunks of 5, and each decodes exactly what it decodes alone; rows that
    finish leave and the rest go on."""
    session, rows, per_step = run_with_joins(family, policy, fast, chunk)
    assert session.fast_path == (family in ("llama", "qwen3") and fast is None)
    for prompt, r, n in rows:
        a = alone_cached(family, prompt, policy, n, fast)
        assert len(r.token_ids) == n
        assert r.token_ids == a.token_ids
        assert r.stats.skipped_per_layer == a.stats.skipped_per_layer
    # rows producing a token per step: b joins after its pass (1 step whole, ceil(23 / 5) = 5 chunks),
    # c after b's pass and its own (ceil(6 / 5) = 2)
    counts = [len(evs) for evs in per_step[:7]]
    assert counts == ([1, 1, 1, 1, 2, 2, 3] if chunk else [2, 2, 3, 3, 3, 2, 2])


@pytest.mark.parametrize("family, fast", [("llama", None), ("gemma3_text", None)])
@pytest.mark.parametrize("policy", [RANDOM, LAGGED], ids=["random", "lagged"])
def test_joins_with_per_sequence_random_choices_and_the_lagged_rule(family, fast, policy):
    _, rows, _ = run_with_joins(family, policy, fast, 5)
    for prompt, r, n in rows:
        a = alone_cached(family, prompt, policy, n, fast)
        assert (r.token_ids, r.stats.skipped_per_layer) == (a.token_ids, a.stats.skipped_per_layer)


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_a_long_prompt_joins_in_chunks_while_the_running_row_gets_a_token_every_step(family):
    """A 23-token prompt with prefill_chunk=4 takes ceil(23 / 4) = 6 steps; the running row gets
    one token in each, and the newcomer its first token in the 6th."""
    session = DecodeSession(_model(family), TOK, SKIP, prefill_chunk=4)
    a = session.add(SHORT, SamplingParams(max_new_tokens=12, ignore_eos=True))
    session.step()
    b = session.add(LONG, SamplingParams(max_new_tokens=3, ignore_eos=True))
    seen = []
    for _ in range(6):
        seen.append(([ev.row for ev in session.step()], [r.id for r in session.prefilling]))
    assert seen == [([a.row], [b.row])] * 5 + [([a.row, b.row], [])]
    assert len(a.token_ids) == 7 and len(b.token_ids) == 1


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_a_batch_that_drains_during_a_chunked_prompt_pass_finishes_it_at_once(family):
    """Once no row decodes, nothing waits: the rest of the prompt pass runs in the next step."""
    session = DecodeSession(_model(family), TOK, SKIP, prefill_chunk=4)
    a = session.add(SHORT, SamplingParams(max_new_tokens=2, ignore_eos=True))
    session.step()
    b = session.add(LONG, SamplingParams(max_new_tokens=4, ignore_eos=True))
    assert [ev.row for ev in session.step()] == [a.row] and session.prefilling and not session.rows  # a left
    assert [ev.row for ev in session.step()] == [b.row] and not session.prefilling
    while not session.done:
        session.step()
    assert b.token_ids == alone_cached(family, LONG, SKIP, 4, None).token_ids


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "8"])
def test_a_bad_prefill_chunk_is_refused_by_name(bad):
    from ffnskip import GenerationError

    with pytest.raises(GenerationError, match="prefill_chunk must be a positive integer"):
        DecodeSession(_model("llama"), TOK, prefill_chunk=bad)


def test_a_cache_of_another_kind_takes_no_joiners():
    """A cache the caller passes in that rows cannot be merged into (here a StaticCache): newcomers
    wait for the batch to drain, then start a fresh batch."""
    from transformers import StaticCache

    model = _model("gemma3_text")
    p = SamplingParams(max_new_tokens=4, ignore_eos=True)
    session = DecodeSession(model, TOK, SKIP, cache=StaticCache(config=model.config, max_cache_len=32))
    a = session.add(PROMPTS[0], p)
    session.step()
    assert not session.fast_path and not session.can_join
    b = session.add(PROMPTS[1], p)
    session.step()
    assert len(session.rows) == 1 and len(session.waiting) == 1
    while not session.done:
        session.step()
    assert a.token_ids == alone(model, PROMPTS[0], SKIP, p, None).token_ids
    assert b.token_ids == alone(model, PROMPTS[1], SKIP, p, None).token_ids


class WindowTokenizer(TinyTokenizer):
    """Records how many ids each decode call reads; id 250 + the next id form one character
    (a stand-in for a multi-byte character split over two tokens)."""

    def __init__(self):
        self.calls: list[int] = []

    def decode(self, ids, skip_special_tokens=True):
        self.calls.append(len(ids))
        out, i = "", 0
        while i < len(ids):
            if ids[i] == 250:
                out += "\ufffd" if i + 1 == len(ids) else f" <{ids[i + 1]}>"
                i += 2
            else:
                out += f" {ids[i]}"
                i += 1
        return out


def test_incremental_detokenisation_reads_a_short_window():
    tok = WindowTokenizer()
    d = Detokenizer(tok)
    ids = [5, 250, 7, 9] + list(range(20, 60))
    for i, t in enumerate(ids):
        d.push(t)
        if i == 1:
            assert d.text == " 5"  # the half character is held back
    d.flush()
    assert d.text == tok.decode(ids)
    tok.calls.pop()
    assert max(tok.calls) <= 4  # never the whole row (44 ids)
