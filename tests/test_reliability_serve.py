"""Reliability drills of the server (issue 16): fuzzing the OpenAI endpoints with Hypothesis
strategies built from the request fields of :mod:`serve.protocol`, and overload with 64
concurrent streams of which a third disconnect at random points.

One real server for the module: ``serve.http.build_app`` over a :class:`~serve.service.Service`
under uvicorn, in a subprocess of its own session on a free loopback port, serving a tiny random
LLaMA (byte-level tokenizer, a chat template). Each drill prints one ``RELIABILITY {json}`` line
(``pytest -s``) and appends it to ``$FFNSKIP_RELIABILITY_OUT``; the last test stops the server and
asserts that neither a process it started nor its port is left.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import psutil
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import proctrack  # noqa: E402
from test_reliability_study import report  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MAX_BATCH = 16
MAX_QUEUED = 48  # with MAX_BATCH: room for exactly 64 requests when idle
CLIENTS = 64
FUZZ_EXAMPLES = 160

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")

SERVER = """\
import sys

import uvicorn

from serve import policies
from serve.config import ServeArgs
from serve.http import build_app
from serve.service import Service

model_dir, port, batch, queued = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
args = ServeArgs(model=model_dir, served_model_name="tiny", max_batch_size=batch, max_queued_requests=queued,
                 batch_wait_ms=5, torch_threads=1, request_timeout_s=120, default_max_tokens=16)
entry = policies.from_dict({"mode": "adaptive", "threshold": 0.2, "warmup_tokens": 1, "skip_budget": 2}, "drill")
svc = Service.load(args, entry)
uvicorn.run(build_app(svc), host="127.0.0.1", port=port, log_level="warning")
"""


def make_tiny_model(d: Path) -> None:
    """A 4-layer random LLaMA with a byte-level tokenizer and a chat template."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<|endoftext|>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(d)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      initializer_range=0.2, eos_token_id=len(vocab) - 1)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(d)


def _port_in_use(port: int) -> bool:
    return any(c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN
               for c in psutil.net_connections(kind="tcp"))


class Server:
    def __init__(self, d: Path):
        self.port = proctrack.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = d / "server.log"
        (d / "model").mkdir()
        make_tiny_model(d / "model")
        env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
                   PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
        for key in ("FFNSKIP_API_KEY", "FFNSKIP_ADMIN_KEY"):
            env.pop(key, None)
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", SERVER, str(d / "model"), str(self.port), str(MAX_BATCH), str(MAX_QUEUED)],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=ROOT,
                start_new_session=True)
        self.seen: set[tuple[int, float]] = set()

    def track(self) -> None:
        self.seen |= proctrack.tree(self.proc.pid)

    def wait_healthy(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self.track()
            assert self.proc.poll() is None, f"the server exited ({self.proc.returncode}):\n{self.tail()}"
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"the server did not come up in {timeout:.0f} s:\n{self.tail()}"
            time.sleep(0.2)

    def metrics(self) -> dict[str, float]:
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    def stop(self) -> list[str]:
        """SIGTERM, then SIGKILL to what is left of everything it started; what was left."""
        self.track()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                pass
        left = proctrack.kill_all(self.seen)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        return left

    def tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("reliability-serve"))
    try:
        srv.wait_healthy()
        yield srv
    finally:
        srv.stop()


def assert_openai_error(r: httpx.Response) -> dict:
    """A 4xx with OpenAI's error body: ``{"error": {"message": str, "type": str, ...}}``."""
    body = r.json()
    err = body.get("error") if isinstance(body, dict) else None
    assert isinstance(err, dict), (r.status_code, r.text[:300])
    assert isinstance(err.get("message"), str) and err["message"], (r.status_code, r.text[:300])
    assert isinstance(err.get("type"), str) and err["type"], (r.status_code, r.text[:300])
    assert {"param", "code"} <= set(err), (r.status_code, r.text[:300])
    return err


def sse_events(text: str) -> list[str]:
    return [ln[len("data: "):] for ln in text.splitlines() if ln.startswith("data: ")]


def healthy_and_answering(server: Server) -> None:
    with httpx.Client(base_url=server.url, timeout=60) as c:
        h = c.get("/healthz")
        assert h.status_code == 200 and h.json()["status"] == "ok", h.text
        r = c.post("/v1/completions", json={"model": "tiny", "prompt": "hello", "max_tokens": 4, "ignore_eos": True})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 4


# ------------------------------------------------------------------------------ drill 4
def request_strategies():
    return _strategies(typed=False) | _strategies(typed=True)


def _strategies(typed: bool):
    """Bodies for each endpoint from the request fields of serve.protocol: every field either a
    well-formed value or any JSON value, fields missing or extra, plus raw bytes."""
    from hypothesis import strategies as st

    from serve.protocol import _UNSUPPORTED, ROLES

    scalar = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70),
                       st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20))
    anyjson = st.recursive(scalar, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                          st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                           max_leaves=8)

    def field(good):  # typed: well-formed values only (their ranges may still be off)
        return good if typed else st.one_of(good, good, anyjson)

    # Lone surrogates too (JSON's "\ud800" escapes): Hypothesis' text leaves them out by default.
    text = st.one_of(st.text(max_size=40), st.text(st.characters(categories=["Cs", "Ll"]), max_size=6))
    message = st.fixed_dictionaries({"role": field(st.sampled_from(ROLES)),
                                     "content": field(st.one_of(text, st.lists(st.fixed_dictionaries(
                                         {"type": st.sampled_from(["text", "image_url"]), "text": text}),
                                         max_size=2)))})
    policy = st.fixed_dictionaries({}, optional={
        "mode": field(st.sampled_from(["adaptive", "dense", "static", "shortgpt"])),
        "threshold": field(st.floats(-1.5, 1.5)), "warmup_tokens": field(st.integers(-2, 8)),
        "skip_budget": field(st.integers(-2, 8)), "layer_start": field(st.integers(-2, 6)),
        "layer_end": field(st.integers(-2, 6)), "dense_every": field(st.integers(-2, 5)),
    })
    common = {
        "model": field(st.sampled_from(["tiny", "other"])), "max_tokens": field(st.integers(-2, 6)),
        "temperature": field(st.one_of(st.floats(-1, 3), st.sampled_from([1e-300, 5e-324, 1e-5]))), "top_p": field(st.floats(-0.5, 1.5)),
        "top_k": field(st.integers(-3, 300)), "stop": field(st.one_of(text, st.lists(text, max_size=6))),
        "seed": field(st.one_of(st.integers(-2**64, 2**64), st.sampled_from([2**63, 2**64, -2**63 - 1]))), "stream": field(st.booleans()),
        "stream_options": field(st.fixed_dictionaries({"include_usage": field(st.booleans())})),
        "n": field(st.integers(0, 3)), "user": field(text), "ignore_eos": field(st.booleans()),
        "ffnskip_policy": field(policy), "response_format": field(st.sampled_from([{"type": "text"},
                                                                                   {"type": "json_object"}])),
        **({} if typed else {k: anyjson for k in _UNSUPPORTED}),
    }
    chat = st.fixed_dictionaries({"messages": field(st.lists(message, max_size=3))},
                                 optional={**common, "max_completion_tokens": field(st.integers(-1, 6))})
    completion = st.fixed_dictionaries(
        {"prompt": field(st.one_of(text, st.lists(st.integers(-5, 400), max_size=6), st.lists(text, max_size=2)))},
        optional={**common, "echo": field(st.booleans()), "logprobs": field(st.integers(-1, 7))})
    tokenize = st.fixed_dictionaries({}, optional={"prompt": field(text), "add_special_tokens": field(st.booleans())})
    detokenize = st.fixed_dictionaries({}, optional={"tokens": field(st.lists(st.integers(-3, 400), max_size=6))})
    swap = st.fixed_dictionaries({}, optional={"policy": field(policy), "trial_id": anyjson, "study": anyjson})
    json_body = st.one_of(
        st.tuples(st.just("POST"), st.just("/v1/chat/completions"), chat),
        st.tuples(st.just("POST"), st.just("/v1/completions"), completion),
        st.tuples(st.just("POST"), st.just("/tokenize"), tokenize),
        st.tuples(st.just("POST"), st.just("/detokenize"), detokenize),
        st.tuples(st.just("PUT"), st.just("/v1/policy"), swap),
    ).map(lambda t: (t[0], t[1], json.dumps(t[2]).encode()))
    raw = st.tuples(st.sampled_from(["POST", "PUT", "GET", "DELETE", "PATCH"]),
                    st.sampled_from(["/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize",
                                     "/v1/policy", "/v1/models", "/healthz", "/v1/nope", "/"]),
                    st.one_of(st.binary(max_size=64), anyjson.map(lambda v: json.dumps(v).encode())))
    return st.one_of(json_body, json_body, json_body, raw)


def test_fuzzed_requests_get_no_5xx_and_openai_errors(server):
    from hypothesis import HealthCheck, example, given, settings

    statuses: Counter[int] = Counter()
    stream_errors: list[str] = []
    started = time.monotonic()
    with httpx.Client(base_url=server.url, timeout=60) as client:

        @settings(max_examples=FUZZ_EXAMPLES, derandomize=True, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck), print_blob=True)
        @given(request_strategies())
        # What this drill found (each was a 500): a seed beyond 64 bits, a temperature whose
        # logits / temperature overflow, a lone surrogate in /tokenize.
        @example(("POST", "/v1/completions", b'{"prompt": "hi", "max_tokens": 2, "seed": 18446744073709551616}'))
        @example(("POST", "/v1/chat/completions",
                  b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 1e-300}'))
        @example(("POST", "/tokenize", b'{"prompt": "\\ud800"}'))
        def one(req):
            method, path, body = req
            r = client.request(method, path, content=body, headers={"Content-Type": "application/json"})
            statuses[r.status_code] += 1
            assert r.status_code < 500, (method, path, body[:300], r.status_code, r.text[:500])
            if r.status_code >= 400:
                assert_openai_error(r)
            elif "text/event-stream" in r.headers.get("content-type", ""):
                events = sse_events(r.text)
                assert events and events[-1] == "[DONE]", (body[:300], r.text[-300:])
                for e in events[:-1]:
                    obj = json.loads(e)
                    if "error" in obj:
                        stream_errors.append(e)
                        assert obj["error"].get("type") != "server_error", (body[:300], e)
            else:
                r.json()  # every 200 is JSON

        one()
    fuzz_s = time.monotonic() - started
    healthy_and_answering(server)
    assert sum(statuses.values()) >= FUZZ_EXAMPLES
    assert statuses[200] > 0 and sum(n for s, n in statuses.items() if 400 <= s < 500) > 0, statuses
    report("server fuzzing (Hypothesis)", cases=sum(statuses.values()), seconds=round(fuzz_s, 1),
           statuses={str(k): v for k, v in sorted(statuses.items())}, server_errors=0,
           stream_error_events=len(stream_errors), healthy_after=True)


# ------------------------------------------------------------------------------ drill 5
async def one_stream(client: httpx.AsyncClient, i: int, leave_after: int | None, max_tokens: int,
                     hold: asyncio.Event | None = None) -> dict:
    """One streaming chat; ``leave_after``: disconnect after that many data events (once ``hold``
    is set, if given)."""
    body = {"model": "tiny", "messages": [{"role": "user", "content": f"client {i}: count to ten"}],
            "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
    events: list[str] = []
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            return {"status": r.status_code, "body": (await r.aread()).decode(errors="replace")}
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
                if leave_after is not None and len(events) >= leave_after:
                    if hold is not None:
                        await hold.wait()
                    return {"status": 200, "left": True, "events": events}  # closing the response disconnects
    return {"status": 200, "left": False, "events": events}


async def overload(url: str, plan: list[int | None], max_tokens: int, left_tokens: int) -> list[dict]:
    limits = httpx.Limits(max_connections=len(plan) + 8, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        return await asyncio.gather(*(one_stream(client, i, leave, left_tokens if leave else max_tokens)
                                      for i, leave in enumerate(plan)))


async def full_queue_429s(url: str, n_probes: int) -> tuple[list[dict], list[float], list[int]]:
    """Fill the replica (MAX_BATCH decoding + MAX_QUEUED waiting, long requests), then time
    ``n_probes`` more requests, which must get 429; then every client leaves."""
    limits = httpx.Limits(max_connections=CLIENTS + n_probes + 8, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        hold = asyncio.Event()
        # Long enough (the context is 2048 tokens) to be still decoding when the probes come: the first
        # 16 rows start decoding while the other 48 are still arriving, and on a slow CPU 440 tokens
        # of this tiny model ended before the 20 probes did (a probe then waited its turn, not 429).
        long = [asyncio.create_task(one_stream(client, i, 1, 1900, hold)) for i in range(MAX_BATCH + MAX_QUEUED)]
        deadline = time.monotonic() + 60
        while True:  # every long request admitted (decoding or queued)
            h = (await client.get("/healthz")).json()
            if h["running"] + h["waiting"] >= MAX_BATCH + MAX_QUEUED:
                break
            ended = [t.result() for t in long if t.done()]
            assert not ended and time.monotonic() < deadline, f"the replica did not fill up: {h} {ended[:2]}"
            await asyncio.sleep(0.05)
        latencies, statuses = [], []
        for i in range(n_probes):
            t0 = time.perf_counter()
            r = await client.post("/v1/completions", json={"model": "tiny", "prompt": f"probe {i}", "max_tokens": 2})
            latencies.append(time.perf_counter() - t0)
            statuses.append(r.status_code)
            if r.status_code == 429:
                assert r.headers.get("retry-after") == "1" and assert_openai_error(r)["code"] == "server_overloaded"
        h = (await client.get("/healthz")).json()
        hold.set()  # every long client leaves
        results = await asyncio.gather(*long)
        # still full after the probes (the message says how the probes fared and how the long rows ended)
        assert h["running"] + h["waiting"] == MAX_BATCH + MAX_QUEUED, (
            h, Counter(statuses), [round(x, 3) for x in latencies], Counter(
                (r["status"], r.get("left"), len(r.get("events", []))) for r in results))
        return results, latencies, statuses


def test_overload_and_disconnects(server):
    rng = random.Random(16)
    leavers = set(rng.sample(range(CLIENTS), CLIENTS // 3))
    # A leaver asks for many tokens and leaves after 1..8 events: its row must stop computing.
    plan = [rng.randint(1, 8) if i in leavers else None for i in range(CLIENTS)]
    max_tokens, left_tokens = 8, 200
    before = server.metrics()
    started = time.monotonic()
    results = asyncio.run(overload(server.url, plan, max_tokens, left_tokens))
    wall = time.monotonic() - started
    # The rows of the clients that left drain from the batch at once.
    t0 = time.monotonic()
    while True:
        m = server.metrics()
        if m["ffnskip_sequences_running"] == 0 and m["ffnskip_requests_waiting"] == 0:
            break
        assert time.monotonic() - t0 < 10, m
        time.sleep(0.05)
    drained_s = time.monotonic() - t0
    statuses = Counter(r["status"] for r in results)
    assert statuses == {200: CLIENTS}, statuses  # no 5xx, no 429: the bound leaves room for 64
    done = [r for r in results if not r["left"]]
    left = [r for r in results if r["left"]]
    assert len(left) == len(leavers) and len(done) == CLIENTS - len(leavers)
    for r in done:
        assert r["events"][-1] == "[DONE]", r["events"][-3:]
        chunks = [json.loads(e) for e in r["events"][:-1]]
        assert not any("error" in c for c in chunks), chunks
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    for r in left:
        assert not any("error" in json.loads(e) for e in r["events"] if e != "[DONE]")
    cancelled = m['ffnskip_requests_cancelled_total{reason="disconnected"}'] - before.get(
        'ffnskip_requests_cancelled_total{reason="disconnected"}', 0)
    saved = m["ffnskip_cancelled_tokens_saved_total"] - before.get("ffnskip_cancelled_tokens_saved_total", 0)
    computed = m["ffnskip_cancelled_tokens_computed_total"] - before.get("ffnskip_cancelled_tokens_computed_total", 0)
    generated = m["ffnskip_generated_tokens_total"] - before.get("ffnskip_generated_tokens_total", 0)
    assert cancelled == len(left), (cancelled, len(left))
    # Cancelled rows stopped: they computed a few tokens each, not their 200.
    assert computed < len(left) * 40 and saved > len(left) * (left_tokens - 40), (computed, saved)
    assert generated < len(done) * max_tokens + len(left) * 40, generated
    server_errors = sum(v - before.get(k, 0) for k, v in m.items()
                        if k.startswith("ffnskip_requests_total") and 'status="5' in k)
    assert server_errors == 0

    # A full queue answers 429 at once.
    long, latencies, probe_statuses = asyncio.run(full_queue_429s(server.url, 20))
    assert probe_statuses == [429] * 20, probe_statuses
    assert all(r["status"] == 200 and r["left"] for r in long), Counter(r["status"] for r in long)
    lat = sorted(latencies)
    p50, worst = lat[len(lat) // 2], lat[-1]
    # "At once": answered before tokenising, never after waiting for room (the long streams hold
    # the replica for many seconds). The typical probe is fast; the slowest may lose the event
    # loop to the decode threads for a scheduler slice or two on a loaded 2-core machine (66.8 ms
    # seen once on a Zen 3 VM in CI, p50 25 ms), so the worst case gets a wider bound.
    assert p50 < 0.050 and worst < 0.500, f"429 took {worst * 1000:.1f} ms (p50 {p50 * 1000:.1f} ms)"
    healthy_and_answering(server)
    report("overload + disconnects", clients=CLIENTS, disconnected=len(left), completed=len(done),
           completed_with_done=len(done), server_errors=int(server_errors), wall_s=round(wall, 1),
           cancelled_counted=int(cancelled), cancelled_tokens_computed=int(computed),
           cancelled_tokens_saved=int(saved), drained_s=round(drained_s, 2), probes_429=len(lat),
           latency_429_p50_ms=round(p50 * 1000, 1), latency_429_max_ms=round(worst * 1000, 1))


# ------------------------------------------------------------------------------ drill 6
def test_server_stops_and_leaves_no_process_or_port(server):
    port = server.port
    assert _port_in_use(port)
    left = server.stop()
    assert not left, f"processes outlived the server: {left}"
    deadline = time.monotonic() + 10
    while _port_in_use(port) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _port_in_use(port), f"port {port} is still listening"
    report("no process or port left (server)", processes_left=0, port_left=False)
