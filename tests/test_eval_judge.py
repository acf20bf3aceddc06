"""The optional LLM judge against a fake OpenAI-compatible server on loopback (a real HTTP
server in a thread), with a tiny random model so that decoding is instant."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
import transformers

import ffnskip
from ffnskip import SkipPolicy
from ffnskip.eval import DenseCache, evaluate
from ffnskip.eval.judge import JudgeConfig, JudgeError

POLICY = SkipPolicy(mode="random", warmup_tokens=1, skip_budget=2, dense_every=0)


class FakeJudge:
    """Answers chat completions with ``reply(request_body) -> str`` and records every request."""

    def __init__(self, reply):
        self.reply = reply
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's naming
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                judge.requests.append({"path": self.path, **body})
                judge.headers.append(dict(self.headers))
                content = judge.reply(body)
                data = json.dumps({"id": "x", "object": "chat.completion", "model": body["model"],
                                   "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                                "finish_reason": "stop"}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


@pytest.fixture(scope="module")
def tiny():
    """A 4-layer random LLaMA with the real SmolLM2 tokenizer (real prompts, instant decoding)."""
    _, tok = ffnskip.load_model("smollm2-135m")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.generation_config.eos_token_id = None  # always the full max_new_tokens
    return model, tok


def test_conversation_judge_scores_turns_and_counts_unparseable(tiny, monkeypatch):
    model, tok = tiny
    monkeypatch.setenv("FFNSKIP_JUDGE_API_KEY", "sk-test-123")
    calls = {"n": 0}

    def reply(body):
        calls["n"] += 1
        if calls["n"] == 2:
            return "I cannot decide."  # the first conversation's dense turn 2: unparseable
        text = body["messages"][-1]["content"]
        return "Fine. Rating: [[6]]" if "Conversation with User|>" in text else "Good. Rating: [[8]]"

    with FakeJudge(reply) as fake:
        rep = evaluate(model, tok, POLICY, "conversation", limit=2, max_new_tokens=3, dense_cache=DenseCache(None),
                       measure_speed=False, progress=False, score_nll=False,
                       judge=JudgeConfig(url=fake.url, model="judge-1", retries=0))
    assert len(fake.requests) == 8  # 2 conversations x (dense, policy) x 2 turns
    assert all(r["path"] == "/v1/chat/completions" and r["model"] == "judge-1" for r in fake.requests)
    assert all(h.get("Authorization") == "Bearer sk-test-123" for h in fake.headers)
    first = fake.requests[0]["messages"][-1]["content"]
    assert "[The Start of Assistant's Answer]" in first  # MT-Bench single-answer template
    assert rep.primary == {"name": "judge_score", "higher_is_better": True}
    assert rep.dense["judge_score"] == pytest.approx((8 + 7) / 2)  # 8 (turn 2 unparseable), then (8 + 6) / 2
    assert rep.skip["judge_score"] == pytest.approx(7.0)
    assert (rep.dense["judge_unparseable"], rep.skip["judge_unparseable"]) == (1, 0)
    assert rep.judge["calls"] == 8 and rep.judge["unparseable"] == 1 and rep.judge["errors"] == 0
    assert rep.judge["unparseable_examples"] == ["I cannot decide."]
    assert rep.samples[0]["dense_scores"]["judge_score"] == 8.0


def test_summarization_judge_is_pairwise_against_dense(tiny):
    model, tok = tiny
    with FakeJudge(lambda body: "8 6\n7 5\n9 7\n8 6\nAssistant 1 is more coherent.") as fake:
        rep = evaluate(model, tok, POLICY, "summarization", limit=1, max_new_tokens=3, dense_cache=DenseCache(None),
                       measure_speed=False, progress=False, score_nll=False,
                       judge=JudgeConfig(url=fake.url + "/chat/completions", model="judge-2", retries=0))
    assert len(fake.requests) == 1
    req = fake.requests[0]
    assert req["temperature"] == 0.2  # the LLM-KICK reviewer setting from the data directory
    user = req["messages"][-1]["content"]
    s = rep.samples[0]
    assert f"[The Start of Assistant 1's Summary]\n{s['dense_output']}" in user
    assert f"[The Start of Assistant 2's Answer]\n{s['output']}" in user
    assert (rep.dense["judge_score"], rep.skip["judge_score"]) == (8.0, 6.0)
    assert rep.skip["judge_unparseable"] == 0


def test_unreachable_judge_is_one_clear_error(tiny):
    model, tok = tiny
    with FakeJudge(lambda body: "") as fake:
        url = fake.url
    # The server is shut down: every call is refused.
    with pytest.raises(JudgeError, match="failed 3 times"):
        evaluate(model, tok, POLICY, "conversation", limit=2, max_new_tokens=2, dense_cache=DenseCache(None),
                 measure_speed=False, progress=False, score_nll=False,
                 judge=JudgeConfig(url=url, model="m", retries=0, timeout=5))
