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


@pytest.mark.parametrize("policy", [SkipPolicy.dense(), SKIP, RANDOM], ids=["dense", "adaptive", "random"])
def test_rows_join_a_running_batch(policy):
    """Fast path: rows added while others decode join at the next step (a longer prompt than the
    batch so far moves the others right; a shorter one is left-padded) and each decodes exactly
    what it decodes alone; rows that finish leave and the rest go on."""
    model = tiny_model("llama")
    p = SamplingParams(max_new_tokens=10, ignore_eos=True)
    session = DecodeSession(model, TOK, policy)
    first = session.add(PROMPTS[1], p)  # 3 tokens
    session.step()
    session.step()
    assert session.fast_path and session.can_join
    longer = session.add(PROMPTS[2], SamplingParams(max_new_tokens=6, ignore_eos=True))  # 9 tokens > 3 + 2
    session.step()
    assert len(session.rows) == 2
    for _ in range(3):
        session.step()
    shorter = session.add(PROMPTS[0], p)  # joins a batch whose cache is wider than its prompt
    while not session.done:
        session.step()
    assert (len(first.token_ids), len(longer.token_ids), len(shorter.token_ids)) == (10, 6, 10)
    for prompt, r, n in ((PROMPTS[1], first, 10), (PROMPTS[2], longer, 6), (PROMPTS[0], shorter, 10)):
        a = alone(model, prompt, policy, SamplingParams(max_new_tokens=n, ignore_eos=True), None)
        assert r.token_ids == a.token_ids
        assert r.stats.skipped_per_layer == a.stats.skipped_per_layer
    assert session.cache.length < 9 + 10 + 6  # leading padding columns were dropped as rows left


def test_on_the_models_own_forward_newcomers_wait_for_the_batch_to_drain():
    model = tiny_model("gemma3_text")  # no fast-path layout
    p = SamplingParams(max_new_tokens=4, ignore_eos=True)
    session = DecodeSession(model, TOK, SKIP)
    a = session.add(PROMPTS[0], p)
    session.step()
    assert not session.fast_path and not session.can_join
    b = session.add(PROMPTS[1], p)
    session.step()
    assert len(session.rows) == 1 and len(session.waiting) == 1
    while not session.done:
        session.step()
    assert len(a.token_ids) == len(b.token_ids) == 4
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
