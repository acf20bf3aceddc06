"""The serving layer without a Ray cluster: protocol validation, the batching engine loop, the
HTTP routes over a tiny model (httpx's ASGI transport), policy sources, the app builder and config,
and the CLI's user errors."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import httpx
import pytest
from tiny import TinyTokenizer, tiny_model

from ffnskip import DecodeSession, SamplingParams, SkipPolicy, generate, generate_text
from ffnskip.cli import main as cli_main
from serve import policies
from serve.config import ServeArgs
from serve.engine_loop import BatchEngine, DoneItem, ErrorItem, GenRequest, Overloaded, TokenItem, TorchThread
from serve.protocol import APIError, parse_chat, parse_completion, parse_json_body, parse_sse

ROOT = Path(__file__).resolve().parent.parent
SKIPPY = SkipPolicy(mode="adaptive", threshold=-1, warmup_tokens=1, skip_budget=2, dense_every=0)


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("llama", layers=8), TinyTokenizer()


# ---------------------------------------------------------------------- protocol
MSG = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("body, param, code", [
    ({"messages": "x"}, "messages", "invalid_type"),
    ({}, "messages", "missing_required_parameter"),
    ({"messages": []}, "messages", "invalid_value"),
    ({"messages": [3]}, "messages[0]", "invalid_type"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content[0].type",
     "unsupported_parameter"),
    ({"messages": MSG, "max_tokens": -1}, "max_tokens", "invalid_value"),
    ({"messages": MSG, "max_tokens": True}, "max_tokens", "invalid_type"),
    ({"messages": MSG, "max_tokens": 2.5}, "max_tokens", "invalid_type"),
    ({"messages": MSG, "max_completion_tokens": 0}, "max_completion_tokens", "invalid_value"),
    ({"messages": MSG, "temperature": -3}, "temperature", "invalid_value"),
    ({"messages": MSG, "temperature": 2.5}, "temperature", "invalid_value"),
    ({"messages": MSG, "top_p": 1.5}, "top_p", "invalid_value"),
    ({"messages": MSG, "top_k": -2}, "top_k", "invalid_value"),
    ({"messages": MSG, "stop": 3}, "stop", "invalid_type"),
    ({"messages": MSG, "seed": "1"}, "seed", "invalid_type"),
    ({"messages": MSG, "n": 3}, "n", "unsupported_parameter"),
    ({"messages": MSG, "logprobs": True}, "logprobs", "unsupported_parameter"),
    ({"messages": MSG, "presence_penalty": 0.5}, "presence_penalty", "unsupported_parameter"),
    ({"messages": MSG, "stream_options": {"include_usage": True}}, "stream_options", "invalid_value"),
    ({"messages": MSG, "ffnskip_policy": [1]}, "ffnskip_policy", "invalid_type"),
    ({"messages": MSG, "model": 7}, "model", "invalid_type"),
    ({"messages": MSG, "response_format": {"type": "json_object"}}, "response_format", "unsupported_parameter"),
    ({"messages": MSG, "response_format": "json"}, "response_format", "unsupported_parameter"),
])
def test_chat_validation_names_the_parameter(body, param, code):
    with pytest.raises(APIError) as ei:
        parse_chat(body)
    err = ei.value.body()["error"]
    assert (ei.value.status, err["param"], err["code"], err["type"]) == (400, param, code, "invalid_request_error")


def test_requests_parse_to_sampling_settings():
    r = parse_chat({"model": "m", "messages": [{"role": "developer", "content": [{"type": "text", "text": "be"},
                                                                                 {"type": "text", "text": " brief"}]},
                                               {"role": "user", "content": "hi"}, {"role": "assistant", "content": None}],
                    "max_completion_tokens": 7, "temperature": 0, "stop": "\n", "seed": 3, "stream": True,
                    "stream_options": {"include_usage": True}, "ignore_eos": True, "top_k": -1,
                    "ffnskip_policy": {"mode": "dense"}, "presence_penalty": 0, "user": "u", "unknown": 1})
    assert r.messages == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                          {"role": "assistant", "content": ""}]
    assert (r.max_tokens, r.temperature, r.stop, r.seed, r.stream, r.ignore_eos, r.top_k) == (7, 0.0, ("\n",), 3, True,
                                                                                             True, 0)
    assert r.policy_override == {"mode": "dense"}
    c = parse_completion({"prompt": ["once upon"], "max_tokens": 3})
    assert (c.prompt, c.temperature, c.stream) == ("once upon", 1.0, False)
    assert parse_completion({"prompt": [[1, 2, 3]]}).prompt == [1, 2, 3]
    for bad in ({"prompt": ""}, {"prompt": []}, {"prompt": [1, -2]}, {"prompt": ["a", "b"]}, {"prompt": 5}):
        with pytest.raises(APIError) as ei:
            parse_completion(bad)
        assert ei.value.param == "prompt"


def test_json_body_errors_and_sse_framing():
    for raw in (b"", b"{", b"[]", b"\xff\xfe", b'"text"', b"[" * 100_000 + b"]" * 100_000):
        with pytest.raises(APIError) as ei:
            parse_json_body(raw)
        assert ei.value.status == 400 and ei.value.code == "invalid_json"
    assert parse_json_body(b'{"a": 1}') == {"a": 1}
    from serve.protocol import SSE_DONE, sse

    text = (sse({"x": "a\nb"}) + sse({"y": 2}) + SSE_DONE).decode()
    assert parse_sse(text) == [{"x": "a\nb"}, {"y": 2}, "[DONE]"]


# ---------------------------------------------------------------------- engine loop
async def _collect(req: GenRequest):
    toks, done = [], None
    async for item in req.items():
        if isinstance(item, TokenItem):
            toks.append(item.delta)
        else:
            done = item
    return toks, done


def _entry(policy: SkipPolicy) -> policies.PolicyEntry:
    return policies.PolicyEntry(policy, "p")


def test_engine_batches_rows_with_different_max_tokens_like_single_runs(tiny):
    model, tok = tiny
    prompts = [[5, 6, 7], [9, 10], [1, 2, 3, 4, 5], [42]]
    limits = [3, 9, 6, 1]
    batch_sizes = []
    events = []

    class CountingSession(DecodeSession):
        def step(self):
            evs = super().step()
            events.extend(ev.row for ev in evs)
            return evs

    async def run():
        eng = BatchEngine(model, tok, max_batch_size=8, batch_wait_s=0.2, on_batch=batch_sizes.append,
                          session_factory=CountingSession).start()
        try:
            reqs = [eng.submit(GenRequest(p, SamplingParams(max_new_tokens=n, temperature=0, stop=("3 9",)),
                                          _entry(SKIPPY))) for p, n in zip(prompts, limits)]
            return await asyncio.gather(*(_collect(r) for r in reqs)), eng.batches
        finally:
            eng.close()

    outs, batches = asyncio.run(run())
    assert batches == 1 and batch_sizes == [4]
    for row, (p, n, (toks, done)) in enumerate(zip(prompts, limits, outs)):
        assert events.count(row) == done.completion_tokens  # the session ended the row at its own limit
        results = []
        for _ in generate(model, tok, [p], SKIPPY, SamplingParams(max_new_tokens=n, temperature=0, stop=("3 9",)),
                          results=results):
            pass
        single = results[0]
        assert isinstance(done, DoneItem)
        assert "".join(toks) + done.tail == done.text == single.text
        assert done.finish_reason == single.finish_reason
        assert done.completion_tokens == single.stats.generated_tokens == len(toks)
        assert done.stats.skipped_per_layer == single.stats.skipped_per_layer
        assert done.stats.skip_ratio == single.stats.skip_ratio


def test_cancelled_rows_stop_and_an_all_cancelled_batch_ends_early(tiny):
    model, tok = tiny
    steps = []

    class CountingSession(DecodeSession):
        def step(self):
            evs = super().step()
            steps.extend(ev.row for ev in evs)
            return evs

    async def run():
        eng = BatchEngine(model, tok, max_batch_size=2, batch_wait_s=0.2, session_factory=CountingSession).start()
        try:
            a = eng.submit(GenRequest([1, 2], SamplingParams(max_new_tokens=400, temperature=0), _entry(SKIPPY)))
            b = eng.submit(GenRequest([3, 4], SamplingParams(max_new_tokens=400, temperature=0), _entry(SKIPPY)))
            n = 0
            async for item in a.items():
                n += 1
                if n == 3:
                    a.cancel()
                    break
            got_b = 0
            async for item in b.items():
                got_b += 1
                if got_b == 10:
                    b.cancel()
                    break
            while eng.running:
                await asyncio.sleep(0.01)
            # the engine is free again
            c = eng.submit(GenRequest([7], SamplingParams(max_new_tokens=2, temperature=0), _entry(SKIPPY)))
            return await _collect(c)
        finally:
            eng.close()

    toks, done = asyncio.run(run())
    assert isinstance(done, DoneItem) and len(toks) == 2
    first_batch = steps[: len(steps) - 2]
    assert len(first_batch) < 2 * 400 and first_batch.count(1) < 400  # the batch stopped long before its end


def test_queue_bound_overloads_and_a_failing_batch_does_not_kill_the_engine(tiny):
    model, tok = tiny
    calls = []

    class FlakySession(DecodeSession):
        def __init__(self, *a, **kw):
            calls.append(1)
            super().__init__(*a, **kw)

        def step(self):
            if any(r.result.prompt_ids[0] == 99 for r in self.waiting + self.rows):
                raise RuntimeError("boom")
            return super().step()

    async def run():
        eng = BatchEngine(model, tok, max_batch_size=1, batch_wait_s=0.0, max_queued=1, session_factory=FlakySession).start()
        try:
            bad = eng.submit(GenRequest([99], SamplingParams(max_new_tokens=3), _entry(SKIPPY)))
            item = await bad.next_item()
            assert isinstance(item, ErrorItem) and "boom" in str(item.error)
            a = eng.submit(GenRequest([1], SamplingParams(max_new_tokens=500, temperature=0), _entry(SKIPPY)))
            assert isinstance(await a.next_item(), TokenItem)  # a is decoding
            b = eng.submit(GenRequest([2], SamplingParams(max_new_tokens=2, temperature=0), _entry(SKIPPY)))
            with pytest.raises(Overloaded):
                eng.submit(GenRequest([3], SamplingParams(max_new_tokens=2), _entry(SKIPPY)))
            a.cancel()
            toks, done = await _collect(b)
            assert isinstance(done, DoneItem) and len(toks) == 2
            assert eng.alive
        finally:
            eng.close()

    asyncio.run(run())
    assert len(calls) == 3  # one session each: the failing one, a, then b once a left


async def _refuses_one_more_then_all_decode(eng, reqs, release, params) -> None:
    """A full engine refuses one more request; released, it decodes every accepted one (2 tokens)."""
    with pytest.raises(Overloaded):
        eng.submit(GenRequest([9], params, _entry(SKIPPY)))
    release.set()
    for r in reqs:
        toks, done = await _collect(r)
        assert isinstance(done, DoneItem) and len(toks) == 2


def test_requests_being_admitted_still_count_against_the_queue_bound(tiny):
    """While the engine starts a batch (requests taken from the queue, not yet running) the
    replica is as full as before: no extra request slips in (seen in the overload drill)."""
    model, tok = tiny
    entered, release = threading.Event(), threading.Event()

    class SlowStart(DecodeSession):
        def __init__(self, *a, **kw):
            entered.set()
            assert release.wait(30)
            super().__init__(*a, **kw)

    async def run():
        eng = BatchEngine(model, tok, max_batch_size=2, batch_wait_s=0.2, max_queued=1, session_factory=SlowStart).start()
        try:
            params = SamplingParams(max_new_tokens=2, temperature=0)
            reqs = [eng.submit(GenRequest([i + 1], params, _entry(SKIPPY))) for i in range(3)]  # 2 to run + 1 queued
            with pytest.raises(Overloaded):
                eng.submit(GenRequest([9], params, _entry(SKIPPY)))
            assert await asyncio.to_thread(entered.wait, 30)  # 2 taken from the queue, the session not yet built
            assert (eng.running, eng.waiting) == (0, 1)
            await _refuses_one_more_then_all_decode(eng, reqs, release, params)
        finally:
            release.set()
            eng.close()

    asyncio.run(run())


def test_a_request_being_placed_in_the_batch_counts_once(tiny):
    """Halfway through admitting a batch (one joiner running, the next not yet placed) the room
    left is the batch's free rows plus the queue bound: the placed joiner is not also counted
    as being admitted (which refused requests with rows free: seen in the overload drill)."""
    model, tok = tiny
    entered, release = threading.Event(), threading.Event()

    class SlowAdd(DecodeSession):
        adds = 0

        def add(self, *a, **kw):
            SlowAdd.adds += 1
            if SlowAdd.adds == 2:  # the first joiner is in the batch, the second is being placed
                entered.set()
                assert release.wait(30)
            return super().add(*a, **kw)

    async def run():
        eng = BatchEngine(model, tok, max_batch_size=4, batch_wait_s=0.2, max_queued=1, session_factory=SlowAdd).start()
        try:
            params = SamplingParams(max_new_tokens=2, temperature=0)
            reqs = [eng.submit(GenRequest([i + 1], params, _entry(SKIPPY))) for i in range(2)]  # a batch of 2
            assert await asyncio.to_thread(entered.wait, 30)
            assert (eng.running, eng.waiting) == (1, 0)
            # room: 4 rows - 1 running - 1 being placed = 2 free rows, + 1 queued = 3 more
            reqs += [eng.submit(GenRequest([5 + i], params, _entry(SKIPPY))) for i in range(3)]
            assert eng.full
            await _refuses_one_more_then_all_decode(eng, reqs, release, params)
            assert not eng.full
        finally:
            release.set()
            eng.close()

    asyncio.run(run())


def test_a_request_joins_a_running_batch_and_decodes_as_alone(tiny):
    """Continuous batching: b arrives while a decodes, joins a's batch at the next step (before a
    ends), leaves at its own length; both decode exactly what they decode alone."""
    model, tok = tiny
    joined = []

    class Watching(DecodeSession):
        def step(self):
            evs = super().step()
            joined.append(len(self.rows) + sum(ev.finished for ev in evs))
            return evs

    async def run():
        eng = BatchEngine(model, tok, max_batch_size=4, batch_wait_s=0.0, session_factory=Watching).start()
        try:
            a = eng.submit(GenRequest([1, 2, 3], SamplingParams(max_new_tokens=40, temperature=0), _entry(SKIPPY)))
            for _ in range(5):
                assert isinstance(await a.next_item(), TokenItem)
            b = eng.submit(GenRequest([9, 8, 7, 6, 5, 4, 3], SamplingParams(max_new_tokens=6, temperature=0), _entry(SKIPPY)))
            out_b = await _collect(b)
            out_a = await _collect(a)
            return out_a, out_b, eng.batches
        finally:
            eng.close()

    (toks_a, done_a), (toks_b, done_b), batches = asyncio.run(run())
    assert batches == 2 and max(joined) == 2  # b joined a's running session
    assert done_b.completion_tokens == len(toks_b) == 6 and done_a.completion_tokens == 40 and len(toks_a) == 40 - 5
    for prompt, n, done in (([1, 2, 3], 40, done_a), ([9, 8, 7, 6, 5, 4, 3], 6, done_b)):
        results = []
        for _ in generate(model, tok, [prompt], SKIPPY, SamplingParams(max_new_tokens=n, temperature=0), results=results):
            pass
        assert done.text == results[0].text
        assert done.stats.skipped_per_layer == results[0].stats.skipped_per_layer


def test_a_long_prompt_arriving_mid_stream_is_prefilled_in_chunks_without_stopping_the_stream(tiny):
    """b's 30-token prompt arrives while a streams; with prefill_chunk=4 its prompt pass takes
    ceil(30 / 4) = 8 engine steps, and a gets one token in every one of them (counted per step of
    the engine loop, no timing); b then decodes what it decodes alone."""
    model, tok = tiny
    steps = []  # per engine step: (a's tokens in it, b still prefilling after it)

    class Watching(DecodeSession):
        def step(self):
            evs = super().step()
            steps.append((sum(ev.row == 0 for ev in evs), any(r.id == 1 for r in self.prefilling)))
            return evs

    long_prompt = [(i * 13 + 5) % 250 + 1 for i in range(30)]
    params_b = SamplingParams(max_new_tokens=3, temperature=0)

    async def run():
        eng = BatchEngine(model, tok, max_batch_size=4, batch_wait_s=0.0, session_factory=Watching, prefill_chunk=4).start()
        try:
            a = eng.submit(GenRequest([1, 2, 3], SamplingParams(max_new_tokens=400, temperature=0), _entry(SKIPPY)))
            for _ in range(3):
                assert isinstance(await a.next_item(), TokenItem)
            b = eng.submit(GenRequest(long_prompt, params_b, _entry(SKIPPY)))
            out_b = await _collect(b)
            a.cancel()
            await _collect(a)
            return out_b
        finally:
            eng.close()

    toks_b, done_b = asyncio.run(run())
    first = next(i for i, (_, pre) in enumerate(steps) if pre)
    assert [pre for _, pre in steps[first : first + 8]] == [True] * 7 + [False]  # 8 steps: 7 chunks, then b joins
    assert [n for n, _ in steps[first : first + 8]] == [1] * 8  # a's stream never stopped
    results = []
    for _ in generate(model, tok, [long_prompt], SKIPPY, params_b, results=results):
        pass
    assert done_b.text == results[0].text and done_b.completion_tokens == len(toks_b) == 3
    with pytest.raises(ValueError, match="prefill_chunk"):
        BatchEngine(model, tok, prefill_chunk=0)


def test_batch_grouping_keys():
    """Only the skip policy separates batches: sampling, seeds, lengths and stop strings are per row
    (a seeded row draws from its own generator, so its batch-mates do not change its draws)."""
    mixed = [GenRequest([1], SamplingParams(temperature=t, seed=s, top_p=p, max_new_tokens=n, stop=st), _entry(SKIPPY))
             for t, s, p, n, st in ((0, 1, 1.0, 3, ()), (0.7, 3, 0.5, 9, ("x",)), (0.7, None, 1.0, 5, ()))]
    assert len({r.group_key() for r in mixed}) == 1
    other = GenRequest([1], SamplingParams(temperature=0), _entry(SkipPolicy.dense()))
    assert other.group_key() != mixed[0].group_key()
    sd = [GenRequest([1], SamplingParams(temperature=0, max_new_tokens=n), _entry(SkipPolicy(mode="skipdecode")))
          for n in (3, 9)]
    assert sd[0].group_key() == sd[1].group_key()  # its schedule reads each row's own max_new_tokens


# ---------------------------------------------------------------------- HTTP over a tiny model
def _service(tiny, **kw):
    from serve.service import Service

    model, tok = tiny
    keys = {k: kw.pop(k) for k in ("api_key", "admin_key") if k in kw}
    args = ServeArgs(model="tiny", batch_wait_ms=1, **kw)
    return Service(args, model, tok, policies.from_dict(SKIPPY.to_dict(), "start"), **keys)


def _run_app(service, fn):
    from serve.http import build_app

    async def go():
        transport = httpx.ASGITransport(app=build_app(service))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await fn(client)

    try:
        return asyncio.run(go())
    finally:
        service.close()


def test_http_completions_equal_generate_and_stream_carries_ffnskip(tiny):
    model, tok = tiny

    async def fn(c):
        r = await c.post("/v1/completions", json={"model": "tiny", "prompt": "5 6 7", "max_tokens": 6, "temperature": 0})
        s = await c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "5 6 7"}],
                                                       "max_tokens": 6, "temperature": 0, "stream": True,
                                                       "stream_options": {"include_usage": True}})
        plain = await c.post("/v1/completions", json={"prompt": "5 6 7", "max_tokens": 6, "temperature": 0, "stream": True})
        echo = await c.post("/v1/completions", json={"prompt": "5 6 7", "max_tokens": 3, "temperature": 0, "echo": True})
        ids = await c.post("/v1/completions", json={"prompt": [5, 6, 7], "max_tokens": 6, "temperature": 0})
        return r, s, ids, plain, echo

    r, s, ids, plain, echo = _run_app(_service(tiny), fn)
    (ref,), _ = generate_text(model, tok, ["5 6 7"], SKIPPY, SamplingParams(max_new_tokens=6), raw=True)
    out = r.json()
    assert r.status_code == 200 and out["choices"][0]["text"] == ref.text
    assert out["ffnskip"] == {"policy_id": "start", "skip_ratio": ref.stats.skip_ratio,
                              "skip_ratio_post_warmup": ref.stats.skip_ratio_post_warmup,
                              "skipped_ffn": ref.stats.skipped_ffn}
    assert out["usage"] == {"prompt_tokens": 3, "completion_tokens": 6, "total_tokens": 9}
    assert ids.json()["choices"][0]["text"] == ref.text
    events = parse_sse(s.text)
    assert events[-1] == "[DONE]" and events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-2]) == ref.text
    # include_usage, as OpenAI: the last chunk has no choices and the usage; the one before finishes
    assert events[-2]["choices"] == [] and events[-2]["usage"]["completion_tokens"] == 6
    assert events[-3]["choices"][0]["finish_reason"] == "length" and "usage" not in events[-3]
    assert events[-3]["ffnskip"]["skipped_ffn"] == ref.stats.skipped_ffn
    without = parse_sse(plain.text)
    assert all("usage" not in e for e in without[:-1]) and without[-2]["choices"][0]["finish_reason"] == "length"
    assert echo.json()["choices"][0]["text"].startswith("5 6 7") and echo.json()["choices"][0]["text"] != "5 6 7"


def test_http_keys_override_switch_and_policy_swaps(tiny, tmp_path):
    from tuning.store import Store

    db = f"sqlite:///{tmp_path / 's.db'}"
    with Store(db) as store:
        st = store.create_study("st", model="tiny", task="t", search_space={}, config={"max_quality_drop": 0.1})
        t1 = store.add_trial(st.id, "completed", {"threshold": 0.7, "skip_budget": 2},
                             values={"quality_drop": 0.05, "skip_ratio": 0.1, "speedup": 1.2})
        t2 = store.add_trial(st.id, "completed", {"threshold": 0.6, "skip_budget": 3},
                             values={"quality_drop": 0.5, "skip_ratio": 0.9})  # infeasible
        t3 = store.add_trial(st.id, "completed", {"threshold": 0.6, "skip_budget": 99},
                             values={"quality_drop": 0.0, "skip_ratio": 0.01})  # does not fit 8 layers
    svc = _service(tiny, api_key="k", admin_key="a", allow_policy_override=False, db=db)
    user = {"Authorization": "Bearer k"}
    admin = {"Authorization": "Bearer a"}

    async def fn(c):
        out = {}
        out["noauth"] = await c.get("/v1/models")
        out["models"] = await c.get("/v1/models", headers=user)
        out["override"] = await c.post("/v1/chat/completions", headers=user, json={
            "messages": MSG, "ffnskip_policy": {"mode": "dense"}})
        out["put_user"] = await c.put("/v1/policy", headers=user, json={"policy": {"mode": "dense"}})
        out["put_json"] = await c.put("/v1/policy", headers=admin, json={"policy": {"mode": "dense"}})
        out["after"] = await c.post("/v1/completions", headers=user, json={"prompt": "1 2", "max_tokens": 2})
        out["put_trial"] = await c.put("/v1/policy", headers=admin, json={"trial_id": t1})
        out["put_study"] = await c.put("/v1/policy", headers=admin, json={"study": "st"})
        out["put_unfit"] = await c.put("/v1/policy", headers=admin, json={"trial_id": t3})
        out["put_missing"] = await c.put("/v1/policy", headers=admin, json={"trial_id": 12345})
        out["put_none"] = await c.put("/v1/policy", headers=admin, json={})
        out["get"] = await c.get("/v1/policy", headers=user)
        out["health"] = await c.get("/healthz")
        return out

    o = _run_app(svc, fn)
    assert o["noauth"].status_code == 401 and o["noauth"].json()["error"]["code"] == "invalid_api_key"
    assert o["models"].json()["data"][0]["id"] == "tiny"
    assert o["override"].status_code == 403 and o["override"].json()["error"]["code"] == "policy_override_disabled"
    assert o["put_user"].status_code == 401
    assert o["put_json"].status_code == 200 and o["put_json"].json()["policy_id"].startswith("json:")
    assert o["after"].json()["ffnskip"]["skipped_ffn"] == 0
    assert o["put_trial"].json()["policy_id"] == f"trial:{t1}"
    assert o["put_study"].json()["policy_id"] == f"study:st/trial:{t1}"  # t2 breaks the quality constraint
    assert o["put_unfit"].status_code == 400 and o["put_unfit"].json()["error"]["param"] == "policy.skip_budget"
    assert o["put_missing"].status_code == 404
    assert o["put_none"].status_code == 400
    assert o["get"].json()["policy_id"] == f"study:st/trial:{t1}" and o["get"].json()["allow_override"] is False
    assert o["health"].json()["status"] == "ok"
    assert t2


def test_http_timeout_body_limit_and_admin_disabled(tiny, monkeypatch):
    import serve.http

    monkeypatch.setattr(serve.http, "MAX_BODY_BYTES", 1000)
    svc = _service(tiny, request_timeout_s=0.05)

    async def fn(c):
        slow = await c.post("/v1/completions", json={"prompt": "1", "max_tokens": 400, "temperature": 0})
        big = await c.post("/v1/completions", json={"prompt": "1 " * 1000, "max_tokens": 1})
        put = await c.put("/v1/policy", json={"policy": {"mode": "dense"}})
        ok = await c.get("/healthz")
        return slow, big, put, ok

    slow, big, put, ok = _run_app(svc, fn)
    assert slow.status_code == 504 and slow.json()["error"]["code"] == "timeout"
    assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
    assert put.status_code == 403 and put.json()["error"]["code"] == "admin_disabled"
    assert ok.status_code == 200


# ---------------------------------------------------------------------- policy sources, builder, config, CLI
def test_startup_policy_sources(tmp_path):
    from tuning.store import Store

    f = tmp_path / "p.json"
    SKIPPY.save(f)
    e = policies.startup_entry(ServeArgs(policy=str(f)))
    assert e.policy == SKIPPY and e.policy_id.startswith("file:p.json@")
    assert policies.startup_entry(ServeArgs(policy_json='{"mode": "dense"}')).policy.mode == "dense"
    assert policies.startup_entry(ServeArgs(policy_json='{"mode": "dense"}', policy_id="x")).policy_id == "x"
    assert policies.startup_entry(ServeArgs()).policy == SkipPolicy()
    db = f"sqlite:///{tmp_path / 's.db'}"
    with Store(db) as store:
        st = store.create_study("s", model="m", task="t", search_space={}, config={})
        store.add_trial(st.id, "completed", {"threshold": 0.8}, values={"quality_drop": 0.0, "skip_ratio": 0.2, "speedup": 1.1})
        best = store.add_trial(st.id, "completed", {"threshold": 0.7}, values={"quality_drop": 0.0, "skip_ratio": 0.3, "speedup": 1.3})
    e = policies.startup_entry(ServeArgs(study="s", db=db))
    assert e.policy_id == f"study:s/trial:{best}" and e.policy.threshold == 0.7
    with pytest.raises(policies.PolicySourceError):
        policies.startup_entry(ServeArgs(study="nope", db=db))
    with pytest.raises(ValueError, match="at most one"):
        ServeArgs(policy=str(f), study="s")


def test_typed_app_builder_and_config_file(tmp_path):
    import yaml
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve.schema import ServeDeploySchema

    from serve.app import app

    f = tmp_path / "p.json"
    SKIPPY.save(f)
    built = call_user_app_builder_with_args_if_necessary(app, {"model": "smollm2-135m", "policy": str(f),
                                                               "max_batch_size": "4"})
    from ray.serve import Application

    assert isinstance(built, Application)
    with pytest.raises(Exception, match="max_batch_size"):
        call_user_app_builder_with_args_if_necessary(app, {"max_batch_size": 0})
    with pytest.raises(Exception, match="colour"):
        call_user_app_builder_with_args_if_necessary(app, {"colour": "red"})

    cfg = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(cfg)
    (spec,) = schema.applications
    assert spec.import_path == "serve.app:app"
    args = ServeArgs.model_validate(spec.args)
    assert args.model == "smollm2-135m" and policies.startup_entry(args).policy.threshold == 0.9
    assert cfg["http_options"]["host"] == "127.0.0.1"


def test_cli_user_errors_exit_2_before_starting_ray(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"threshold": "high"}')
    cases = [
        (["serve", "--policy", str(tmp_path / "missing.json")], "--policy"),
        (["serve", "--policy", str(bad)], "threshold"),
        (["serve", "--policy-json", "{"], "--policy-json"),
        (["serve", "--study", "nope", "--db", f"sqlite:///{tmp_path / 'empty.db'}"], "--study"),
        (["serve", "--model", "no-such-model"], "no-such-model"),
        (["serve", "--max-queued-requests", "-1"], "--max-queued-requests"),
        (["serve", "--host", "0.0.0.0"], "FFNSKIP_API_KEY"),  # reachable from elsewhere, no key: refused
        (["serve", "--http-ingress", "haproxy", "--address", "127.0.0.1:1"], "--http-ingress haproxy: only for"),
    ]
    for argv, needle in cases:
        assert cli_main(argv) == 2, argv
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err, err
    for argv in (["serve", "--max-batch-size", "0"], ["serve", "--http-ingress", "nginx"]):
        with pytest.raises(SystemExit) as ei:
            cli_main(argv)
        assert ei.value.code == 2
    from serve.cli import _loopback

    assert _loopback("127.0.0.1") and _loopback("::1") and _loopback("localhost") and _loopback("127.3.2.1")
    assert not _loopback("0.0.0.0") and not _loopback("10.0.0.5") and not _loopback("myhost")
    import ray

    assert not ray.is_initialized()


def test_operator_limits_and_safe_errors(tiny):
    """max_tokens above the operator's limit, a prompt above the character cap, ignore_eos or a
    per-request policy where the operator disabled them: 4xx naming the parameter; text
    response_format accepted; overload is 429 with Retry-After; a 500 body carries no exception text."""
    from serve.http import error_response
    from serve.protocol import overloaded
    from serve.service import Service

    async def fn(c):
        out = {}
        base = {"prompt": "5 6 7", "max_tokens": 3, "temperature": 0}
        out["limit"] = await c.post("/v1/completions", json={**base, "max_tokens": 50})
        out["chars"] = await c.post("/v1/completions", json={**base, "prompt": "9 " * 40})
        out["eos"] = await c.post("/v1/completions", json={**base, "ignore_eos": True})
        out["override"] = await c.post("/v1/completions", json={**base, "ffnskip_policy": {"mode": "dense"}})
        out["text_ok"] = await c.post("/v1/completions", json={**base, "response_format": {"type": "text"}})
        out["clamped"] = await c.post("/v1/completions", json={"prompt": "5 6 7", "temperature": 0})
        return out

    svc = _service(tiny, max_tokens_limit=10, max_prompt_chars=50, allow_ignore_eos=False, allow_policy_override=False)
    out = _run_app(svc, fn)
    assert out["limit"].status_code == 400 and out["limit"].json()["error"]["param"] == "max_tokens"
    assert out["chars"].status_code == 400 and out["chars"].json()["error"]["param"] == "prompt"
    assert out["eos"].status_code == 403 and out["eos"].json()["error"]["param"] == "ignore_eos"
    assert out["override"].status_code == 403 and out["override"].json()["error"]["param"] == "ffnskip_policy"
    assert out["text_ok"].status_code == 200
    assert out["clamped"].status_code == 200 and out["clamped"].json()["usage"]["completion_tokens"] <= 10
    r = error_response(overloaded("full"))
    assert r.status_code == 429 and r.headers["retry-after"] == "1"
    svc = _service(tiny)
    try:
        err = svc._error_of(ErrorItem(RuntimeError("/secret/path/to/weights: key=abc")))
        assert err.status == 500 and "secret" not in err.message and "abc" not in err.message
    finally:
        svc.close()
    with pytest.raises(ValueError, match="must differ"):
        _service(tiny, api_key="same", admin_key="same")
    assert Service  # (imported for its key names)


def test_prefill_chunk_flag_reaches_the_engine_and_bad_values_name_the_flag(tiny):
    import argparse

    from serve.cli import CLIError, register, serve_args

    p = argparse.ArgumentParser()
    register(p.add_subparsers())
    args = serve_args(p.parse_args(["serve", "--prefill-chunk", "64"]), local_cpus=2)
    assert args.prefill_chunk == 64
    assert serve_args(p.parse_args(["serve"]), local_cpus=2).prefill_chunk == 256
    with pytest.raises(CLIError, match="--prefill-chunk"):
        serve_args(p.parse_args(["serve", "--prefill-chunk", "0"]), local_cpus=2)
    service = _service(tiny, prefill_chunk=7)
    try:
        assert service.engine.prefill_chunk == 7
    finally:
        service.close()


# ---------------------------------------------------------------------- one torch thread
def test_the_torch_thread_runs_jobs_in_order_with_its_thread_count_and_hands_back_errors():
    import torch

    runner = TorchThread(threads=1)
    try:
        seen = []
        assert runner.run(lambda: (seen.append(threading.current_thread()), torch.get_num_threads())[1]) == 1
        assert seen == [runner.thread] and threading.current_thread() is not runner.thread
        with pytest.raises(ZeroDivisionError):
            runner.run(lambda: 1 / 0)
        assert runner.run(lambda: "still serving") == "still serving"
    finally:
        runner.stop()
    assert not runner.thread.is_alive()
    with pytest.raises(RuntimeError, match="stopped"):
        runner.submit(lambda: None)


def test_the_engine_decodes_on_the_thread_that_loaded_the_model(tiny):
    """Service.load loads the model on a TorchThread and the engine decodes there, with the
    replica's thread count (a second OpenMP master halved the server's batch-1 speed on a Xeon)."""
    import torch

    runner = TorchThread(threads=1)
    model, tok = runner.run(lambda: tiny)  # as Service.load does with load_model
    where = []

    class WhereSession(DecodeSession):
        def step(self):
            where.append((threading.current_thread(), torch.get_num_threads()))
            return super().step()

    async def run():
        eng = BatchEngine(model, tok, max_batch_size=2, batch_wait_s=0.0, session_factory=WhereSession,
                          thread=runner).start()
        try:
            assert eng.alive
            req = eng.submit(GenRequest([1, 2, 3], SamplingParams(max_new_tokens=4, temperature=0), _entry(SKIPPY)))
            toks, done = await _collect(req)
            return eng, done
        finally:
            eng.close()

    eng, done = asyncio.run(run())
    try:
        assert done.completion_tokens == 4 and where
        assert set(where) == {(runner.thread, 1)}
        assert not eng.alive and runner.thread.is_alive()  # the loop ended; the thread stays for its owner
    finally:
        runner.stop()
    assert not runner.thread.is_alive()


def test_a_service_stops_its_torch_thread_when_it_closes(tiny):
    from serve.service import Service

    runner = TorchThread(threads=1)
    model, tok = tiny
    svc = Service(ServeArgs(model="tiny", batch_wait_ms=1), model, tok, policies.from_dict(SKIPPY.to_dict(), "start"),
                  thread=runner)
    assert svc.engine.alive and svc.engine._thread is runner.thread
    svc.close()
    assert not svc.engine.alive and not runner.thread.is_alive()
