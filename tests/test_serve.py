"""The served application end to end: ``ffnskip serve`` (a real Ray Serve on a free loopback port)
on the default model, driven by the ``openai`` client and raw HTTP.

One module-scoped server (started as a subprocess, exactly as a user starts it); the last test
stops it with SIGTERM and checks that no process it started is left.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import proctrack
import psutil
import pytest

pytestmark = pytest.mark.slow

API_KEY = "test-api-key"
ADMIN_KEY = "test-admin-key"
MODEL = "smollm2-135m"
POLICY = {"mode": "adaptive", "threshold": 0.9, "warmup_tokens": 2, "skip_budget": 6, "dense_every": 3}
MAX_BATCH = 4
MAX_QUEUED = 2
ROOT = Path(__file__).resolve().parent.parent


def _seed_store(url: str) -> dict:
    from tuning.store import Store

    with Store(url) as store:
        st = store.create_study("serve-study", model=MODEL, task="factoid_qa", search_space={},
                                config={"objectives": ["quality", "skip_ratio"], "max_quality_drop": 0.05})
        ok = store.add_trial(st.id, "completed", {"threshold": 0.8, "warmup_tokens": 4, "skip_budget": 5},
                             values={"quality": 0.9, "quality_drop": 0.01, "skip_ratio": 0.2, "tokens_per_s": 9.0, "speedup": 1.1})
        best = store.add_trial(st.id, "completed", {"threshold": 0.85, "warmup_tokens": 4, "skip_budget": 8},
                               values={"quality": 0.89, "quality_drop": 0.02, "skip_ratio": 0.3, "tokens_per_s": 9.5, "speedup": 1.2})
        store.add_trial(st.id, "completed", {"threshold": 0.5, "warmup_tokens": 0, "skip_budget": 12},
                        values={"quality": 0.5, "quality_drop": 0.4, "skip_ratio": 0.6, "tokens_per_s": 12.0})
    return {"study": "serve-study", "trial": ok, "best": best}


@dataclass
class Server:
    url: str
    port: int
    proc: subprocess.Popen
    log: Path
    db: str
    store: dict
    policy_id: str
    seen: set

    def client(self, key: str | None = API_KEY, **kw) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=kw.pop("timeout", 180.0), **kw)

    def descendants(self) -> set:
        self.seen |= proctrack.tree(self.proc.pid, include_root=False)
        return self.seen

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve")
    policy_file = d / "policy.json"
    policy_file.write_text(json.dumps(POLICY))
    db = f"sqlite:///{d / 'store.db'}"
    store = _seed_store(db)
    port = proctrack.free_port()
    env = dict(os.environ, RAY_AUTH_MODE="disabled", HF_HUB_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0",
               FFNSKIP_API_KEY=API_KEY, FFNSKIP_ADMIN_KEY=ADMIN_KEY, PYTHONUNBUFFERED="1")
    log = d / "serve.log"
    cmd = [sys.executable, "-m", "ffnskip.cli", "serve", "--policy", str(policy_file), "--db", db,
           "--port", str(port), "--num-cpus", "2", "--max-batch-size", str(MAX_BATCH),
           "--max-queued-requests", str(MAX_QUEUED), "--batch-wait-ms", "50", "--request-timeout", "150"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
    from serve.policies import from_file

    srv = Server(f"http://127.0.0.1:{port}", port, proc, log, db, store, from_file(str(policy_file)).policy_id, set())
    try:
        proctrack.wait_ready(proc, lambda: httpx.get(f"{srv.url}/healthz", timeout=5).status_code == 200,
                             srv.log_tail, srv.seen, not_yet=(httpx.HTTPError,))
        yield srv
    finally:
        if proc.poll() is None:  # the last test did not run or failed: stop it anyway
            srv.descendants()
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(120)
            except subprocess.TimeoutExpired:
                proc.kill()
        proctrack.kill_all(srv.seen)


def _assert_error(r: httpx.Response, status: int | tuple, param: str | None = "any") -> dict:
    statuses = status if isinstance(status, tuple) else (status,)
    assert r.status_code in statuses, (r.status_code, r.text)
    body = r.json()
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, body
    assert isinstance(err["message"], str) and err["message"]
    if param != "any":
        assert err["param"] == param, body
    return err


def _openai(server: Server):
    import openai

    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=180)


# ---------------------------------------------------------------------- OpenAI client
def test_binds_loopback_only(server):
    listeners = [c for c in psutil.net_connections(kind="tcp")
                 if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == server.port]
    assert listeners
    assert {c.laddr.ip for c in listeners} == {"127.0.0.1"}


def test_openai_client_completions_and_chat(server):
    client = _openai(server)
    comp = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0)
    assert comp.object == "text_completion"
    assert comp.choices[0].text.strip()
    assert comp.choices[0].finish_reason in ("length", "stop")
    assert 0 < comp.usage.completion_tokens <= 8
    assert comp.usage.total_tokens == comp.usage.prompt_tokens + comp.usage.completion_tokens
    info = comp.model_extra["ffnskip"]
    assert info["policy_id"] == server.policy_id
    assert set(info) == {"policy_id", "skip_ratio", "skip_ratio_post_warmup", "skipped_ffn"}

    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Tell me about the sea."}],
                                          max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content.strip()
    assert chat.usage.completion_tokens == 12
    info = chat.model_extra["ffnskip"]
    # warm-up 2, budget 6, every 3rd post-warm-up token dense: some FFNs are skipped in 12 tokens
    assert info["skipped_ffn"] > 0 and 0 < info["skip_ratio"] < info["skip_ratio_post_warmup"] <= 1
    assert info["skipped_ffn"] == round(info["skip_ratio"] * 30 * 12)


def test_openai_client_streaming(server):
    client = _openai(server)
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Name three colours."}], max_tokens=8, temperature=0,
        stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip()
    last, finish = chunks[-1], chunks[-2]
    assert last.choices == [] and last.usage.completion_tokens <= 8  # include_usage: OpenAI's usage chunk
    assert finish.choices[0].finish_reason in ("length", "stop")
    assert finish.model_extra["ffnskip"]["policy_id"] == server.policy_id
    # the same request, not streamed, gives the same greedy text
    whole = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Name three colours."}],
                                           max_tokens=8, temperature=0)
    assert whole.choices[0].message.content == text

    comp_chunks = list(client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=6, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in comp_chunks if c.choices).strip()
    assert "skip_ratio" in comp_chunks[-2].model_extra["ffnskip"]
    assert comp_chunks[-1].usage.completion_tokens <= 6


def test_raw_stream_ends_with_done(server):
    from serve.protocol import parse_sse

    with server.client() as c:
        r = c.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}],
                                                 "max_tokens": 4, "stream": True, "temperature": 0})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.text.rstrip().endswith("data: [DONE]")
    events = parse_sse(r.text)
    assert events[-1] == "[DONE]"
    assert events[-2]["ffnskip"]["policy_id"] == server.policy_id and "usage" not in events[-2]  # not asked for


# ---------------------------------------------------------------------- bad input
BAD = [
    # (endpoint, raw body or JSON object, expected status, expected param)
    ("chat", b"{not json", 400, None),
    ("chat", b"", 400, None),
    ("chat", b"[1, 2]", 400, None),
    ("chat", {"model": MODEL, "messages": "hello"}, 400, "messages"),
    ("chat", {"model": MODEL}, 400, "messages"),
    ("chat", {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role"),
    ("chat", {"model": MODEL, "messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    ("chat", {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": -1}, 400, "max_tokens"),
    ("chat", {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, 400, "max_tokens"),
    ("chat", {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": "ten"}, 400, "max_tokens"),
    ("chat", {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 100000}, 400, "max_tokens"),
    ("chat", {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "temperature": -3}, 400, "temperature"),
    ("chat", {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, 400, "temperature"),
    ("chat", {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "top_p": 0}, 400, "top_p"),
    ("chat", {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "n": 2}, 400, "n"),
    ("chat", {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "stream": "yes"}, 400, "stream"),
    ("chat", {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "stop": ["a"] * 5}, 400, "stop"),
    ("chat", {"model": "gpt-17", "messages": [{"role": "user", "content": "x"}]}, 400, "model"),
    ("chat", {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "ffnskip_policy": {"threshold": 5}},
     400, "ffnskip_policy.threshold"),
    ("chat", {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "ffnskip_policy": {"skip_budget": 99}},
     400, "ffnskip_policy.skip_budget"),
    ("chat", {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "ffnskip_policy": {"colour": "red"}},
     400, "ffnskip_policy.colour"),
    ("chat", {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "ffnskip_policy": "dense"},
     400, "ffnskip_policy"),
    ("completions", {"model": MODEL, "prompt": "hello " * 9000, "max_tokens": 4}, 400, "prompt"),
    ("completions", {"model": MODEL}, 400, "prompt"),
    ("completions", {"model": MODEL, "prompt": ["a", "b"]}, 400, "prompt"),
    ("completions", {"model": MODEL, "prompt": {"text": "a"}}, 400, "prompt"),
    ("completions", {"model": MODEL, "prompt": [1, 2, 10 ** 9]}, 400, "prompt"),
]


def test_bad_inputs_get_openai_errors_and_the_server_keeps_answering(server):
    with server.client() as c:
        for endpoint, body, status, param in BAD:
            path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
            if isinstance(body, bytes):
                r = c.post(path, content=body, headers={"Content-Type": "application/json"})
            else:
                r = c.post(path, json=body)
            err = _assert_error(r, status, param)
            assert err["type"] == "invalid_request_error", (body, err)
        long = c.post("/v1/completions", json={"model": MODEL, "prompt": "hello " * 9000, "max_tokens": 4}).json()
        assert long["error"]["code"] == "context_length_exceeded"
        assert _assert_error(c.get("/v1/nothing"), 404)["code"] == "not_found"
        assert _assert_error(c.delete("/v1/models"), 405)["code"] == "method_not_allowed"
        assert c.get("/healthz").json()["status"] == "ok"
        ok = c.post("/v1/completions", json={"model": MODEL, "prompt": "Hello", "max_tokens": 2, "temperature": 0})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] <= 2


def test_api_key_and_admin_key(server):
    with server.client(key=None) as c:
        assert _assert_error(c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]}),
                             401)["type"] == "authentication_error"
        assert _assert_error(c.get("/v1/models"), 401)["code"] == "invalid_api_key"
        assert c.get("/healthz").status_code == 200  # health and metrics stay open
        assert c.get("/metrics").status_code == 200
    with server.client(key="wrong") as c:
        _assert_error(c.get("/v1/models"), 401)
        _assert_error(c.put("/v1/policy", json={"policy": {"mode": "dense"}}), 401)
    with server.client() as c:  # the API key is not the admin key
        _assert_error(c.put("/v1/policy", json={"policy": {"mode": "dense"}}), 401)
        models = c.get("/v1/models").json()
        assert models["data"][0]["id"] == MODEL
        assert models["data"][0]["ffnskip"]["num_layers"] == 30


# ---------------------------------------------------------------------- policy management
def test_policy_hot_swap_while_a_request_runs(server):
    from serve.protocol import parse_sse

    with server.client() as c, server.client(key=ADMIN_KEY) as admin:
        view = c.get("/v1/policy").json()
        assert view["policy_id"] == server.policy_id
        assert view["policy"]["threshold"] == POLICY["threshold"]
        assert view["resolved"] == {"layer_start": 5, "layer_end": 25, "skip_budget": 6}

        result: dict = {}
        first_token = threading.Event()

        def long_request():
            body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 16,
                    "ignore_eos": True, "temperature": 0, "stream": True}
            with server.client() as c2, c2.stream("POST", "/v1/chat/completions", json=body) as r:
                result["status"] = r.status_code
                text = ""
                for line in r.iter_lines():
                    text += line + "\n\n"
                    if '"content":"' in line and '"content":""' not in line:
                        first_token.set()
                result["events"] = parse_sse(text)
            first_token.set()

        t = threading.Thread(target=long_request)
        t.start()
        assert first_token.wait(180)
        swapped = admin.put("/v1/policy", json={"policy": {"mode": "dense"}, "policy_id": "swapped-dense"})
        assert swapped.status_code == 200, swapped.text
        assert swapped.json()["policy_id"] == "swapped-dense"
        t.join(180)
        assert result["status"] == 200
        events = result["events"]
        assert events[-1] == "[DONE]"
        final = events[-2]  # no include_usage: the finish chunk is the last before [DONE]
        assert final["ffnskip"]["policy_id"] == server.policy_id  # the request kept its policy
        assert final["choices"][0]["finish_reason"] == "length" and final["ffnskip"]["skipped_ffn"] > 0

        after = c.post("/v1/completions", json={"model": MODEL, "prompt": "Hello", "max_tokens": 3}).json()
        assert after["ffnskip"]["policy_id"] == "swapped-dense" and after["ffnskip"]["skipped_ffn"] == 0
        assert c.get("/v1/policy").json()["policy"]["mode"] == "dense"

        # stored trials and the study's best rule
        r = admin.put("/v1/policy", json={"trial_id": server.store["trial"]})
        assert r.status_code == 200, r.text
        assert r.json()["policy_id"] == f"trial:{server.store['trial']}"
        assert r.json()["policy"]["skip_budget"] == 5
        r = admin.put("/v1/policy", json={"study": server.store["study"]})
        assert r.status_code == 200, r.text
        assert r.json()["policy_id"] == f"study:serve-study/trial:{server.store['best']}"
        assert r.json()["policy"]["skip_budget"] == 8

        # invalid swaps change nothing
        assert _assert_error(admin.put("/v1/policy", json={"trial_id": 99999}), 404, "trial_id")["code"] == \
            "trial_not_found"
        _assert_error(admin.put("/v1/policy", json={"study": "no-such-study"}), 404, "study")
        _assert_error(admin.put("/v1/policy", json={"policy": {"threshold": "high"}}), 400, "policy.threshold")
        _assert_error(admin.put("/v1/policy", json={"policy": {"mode": "dense"}, "trial_id": 1}), 400)
        _assert_error(admin.put("/v1/policy", content=b"nope"), 400)
        assert c.get("/v1/policy").json()["policy_id"] == f"study:serve-study/trial:{server.store['best']}"

        restore = admin.put("/v1/policy", json={"policy": POLICY, "policy_id": server.policy_id})
        assert restore.status_code == 200 and c.get("/v1/policy").json()["policy_id"] == server.policy_id


def test_dense_greedy_served_text_equals_ffnskip_generate(server):
    prompt = "What is the capital of France?"
    cli = subprocess.run(
        [sys.executable, "-m", "ffnskip.cli", "generate", "--policy-json", '{"mode": "dense"}', "--max-new-tokens",
         "12", "--json", prompt], capture_output=True, text=True, timeout=300, cwd=ROOT,
        env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert cli.returncode == 0, cli.stderr
    expected = json.loads(cli.stdout)["outputs"][0]["text"]
    assert expected.strip()
    with server.client() as c:
        r = c.post("/v1/chat/completions", json={
            "model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": 12, "temperature": 0,
            "ffnskip_policy": {"mode": "dense"}})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["choices"][0]["message"]["content"] == expected
    assert out["ffnskip"]["skipped_ffn"] == 0 and out["ffnskip"]["policy_id"].startswith("request:")


# ---------------------------------------------------------------------- concurrency
def _metric(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_overload_gives_429_and_disconnects_stop_generation(server):
    n = MAX_BATCH + MAX_QUEUED + 2
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Count to one hundred."}], "max_tokens": 64,
            "ignore_eos": True, "temperature": 0, "stream": True}
    with server.client() as c:
        before = c.get("/metrics").text
    statuses: list = [None] * n
    errors: list = [None] * n
    opened = threading.Barrier(n + 1)
    release = threading.Event()

    def one(i: int):
        with server.client() as cl, cl.stream("POST", "/v1/chat/completions", json=body) as r:
            try:
                statuses[i] = r.status_code
                if r.status_code != 200:
                    errors[i] = json.loads(r.read())
                else:
                    lines = r.iter_lines()  # (keep the iterator: dropping it closes the connection)
                    assert next(lines).startswith("data: ")  # admitted: the role chunk comes at once
            finally:
                opened.wait(180)  # every request is in, and the admitted ones stay connected...
                release.wait(180)  # ...until the counts are taken; leaving the block disconnects

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    opened.wait(180)
    accepted = statuses.count(200)
    rejected = [e for s, e in zip(statuses, errors) if s == 429]
    with server.client() as c:
        during = c.get("/healthz").json()
    release.set()
    for t in threads:
        t.join(180)
    assert accepted + len(rejected) == n, statuses
    assert rejected and MAX_QUEUED <= accepted <= MAX_BATCH + MAX_QUEUED, (statuses, during)
    for e in rejected:
        assert e["error"]["code"] == "server_overloaded" and e["error"]["type"] == "server_error"

    with server.client() as c:
        deadline = time.monotonic() + 120
        while True:  # the disconnected requests are cancelled: the engine goes idle
            h = c.get("/healthz").json()
            m = c.get("/metrics").text
            cancelled = _metric(m, 'ffnskip_requests_total{endpoint="/v1/chat/completions",status="cancelled"}') - \
                _metric(before, 'ffnskip_requests_total{endpoint="/v1/chat/completions",status="cancelled"}')
            if (h["running"], h["waiting"]) == (0, 0) and cancelled >= accepted:
                break
            assert time.monotonic() < deadline, (h, cancelled)
            time.sleep(0.5)
        generated = _metric(m, "ffnskip_generated_tokens_total") - _metric(before, "ffnskip_generated_tokens_total")
        assert generated < accepted * 64  # nobody got all 64 tokens
        assert _metric(m, 'ffnskip_requests_total{endpoint="/v1/chat/completions",status="429"}') >= len(rejected)
        assert c.get("/healthz").status_code == 200


def test_load_script_and_metrics(server, capsys):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import load
    finally:
        sys.path.pop(0)
    rc = load.main(["--url", server.url, "-n", str(MAX_BATCH), "-t", "3", "--max-tokens", "6", "--json",
                    "--api-key", API_KEY, "--fail-on-error"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["errors"] == 0, out["error_samples"]
    assert out["requests"] >= MAX_BATCH and out["completion_tokens"] > 0
    assert out["ttft_ms_p50"] > 0 and out["itl_ms_p99"] >= out["itl_ms_p50"] > 0
    with server.client() as c:
        _assert_error(c.post("/v1/chat/completions", json={"messages": []}), 400, "messages")
        m = c.get("/metrics").text
    for name in ("ffnskip_time_to_first_token_seconds_count", "ffnskip_inter_token_latency_seconds_count",
                 "ffnskip_skip_ratio_count", "ffnskip_batch_size_count", "ffnskip_generated_tokens_total"):
        assert _metric(m, name) > 0, name
    assert _metric(m, 'ffnskip_requests_total{endpoint="/v1/chat/completions",status="200"}') >= out["requests"]
    assert _metric(m, 'ffnskip_requests_total{endpoint="/v1/chat/completions",status="400"}') > 0
    # the batches really held several sequences
    assert _metric(m, "ffnskip_batch_size_sum") > _metric(m, "ffnskip_batch_size_count")


# ---------------------------------------------------------------------- shutdown (keep last)
def test_sigterm_shuts_down_and_leaves_no_ray_process(server):
    procs = server.descendants()
    names = set()
    for pid, _ in procs:
        try:
            names.add(psutil.Process(pid).name())
        except psutil.NoSuchProcess:
            pass
    assert any("raylet" in n for n in names) and any("gcs_server" in n for n in names), names
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(120) == 0, server.log_tail()
    deadline = time.monotonic() + 60
    while True:
        alive = [proctrack.describe(p) for p in proctrack.alive(procs)]
        if not alive:
            break
        assert time.monotonic() < deadline, f"left behind: {alive}"
        time.sleep(0.5)
    assert "shutting down" in server.log.read_text(errors="replace")
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{server.url}/healthz", timeout=5)
