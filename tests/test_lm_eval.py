"""lm-evaluation-harness, as users run it, against our OpenAI-compatible endpoint: a real HTTP
server on loopback (uvicorn, no Ray) serving SmolLM2, lm-eval's ``local-completions`` client with
its remote tokenizer (``/tokenizer_info``, ``/tokenize``, ``/detokenize``: no tokenizer argument,
no hub), one ``multiple_choice`` task (loglikelihood: ``echo`` + ``logprobs``) and one
``generate_until`` task, both on small local files."""

from __future__ import annotations

import json
import threading
import time

import proctrack
import pytest

pytestmark = pytest.mark.slow

QUESTIONS = [
    {"question": "What is the capital of France?", "choices": ["Paris", "Berlin", "Madrid"], "answer": 0},
    {"question": "How many legs does a spider have?", "choices": ["Six", "Eight", "Ten"], "answer": 1},
    {"question": "Which planet is known as the Red Planet?", "choices": ["Venus", "Jupiter", "Mars"], "answer": 2},
    {"question": "What colour is the sky on a clear day?", "choices": ["Green", "Blue", "Red"], "answer": 1},
]

MC_TASK = """task: ffnskip_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
"""

GEN_TASK = """task: ffnskip_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{choices[answer]}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
metric_list:
  - metric: exact_match
"""


@pytest.fixture(scope="module")
def endpoint():
    import uvicorn

    import ffnskip
    from ffnskip import SkipPolicy
    from serve import policies
    from serve.config import ServeArgs
    from serve.http import build_app
    from serve.service import Service

    model, tok = ffnskip.load_model("smollm2-135m")
    pol = SkipPolicy(threshold=0.95, warmup_tokens=2, skip_budget=8, dense_every=0)
    svc = Service(ServeArgs(model="smollm2-135m", batch_wait_ms=1), model, tok, policies.from_dict(pol.to_dict(), "lm-eval"))
    port = proctrack.free_port()
    server = uvicorn.Server(uvicorn.Config(build_app(svc), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}", model, tok
    finally:
        server.should_exit = True
        thread.join(30)
        svc.close()


def test_tokenizer_endpoints_round_trip(endpoint):
    import httpx

    url, _, tok = endpoint
    info = httpx.get(f"{url}/tokenizer_info").json()
    assert info["eos_token"] == tok.eos_token and info["chat_template"]
    ids = httpx.post(f"{url}/tokenize", json={"prompt": "Hello world", "add_special_tokens": False}).json()["tokens"]
    assert ids == tok("Hello world", add_special_tokens=False)["input_ids"]
    assert httpx.post(f"{url}/detokenize", json={"tokens": ids}).json()["prompt"] == "Hello world"
    bad = httpx.post(f"{url}/detokenize", json={"tokens": ["x"]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"


def test_echo_logprobs_score_the_prompt_densely(endpoint):
    """OpenAI's legacy echo + logprobs: every prompt token's log-probability (the first: None),
    the top alternatives, and with max_tokens 1 the greedy next token; the numbers are the dense
    model's (one forward pass), equal to teacher forcing."""
    import httpx

    from ffnskip import SkipPolicy
    from ffnskip.eval import score_continuation

    url, model, tok = endpoint
    ids = tok("The capital of France is Paris", add_special_tokens=False)["input_ids"]
    r = httpx.post(f"{url}/v1/completions", json={"prompt": ids, "max_tokens": 1, "echo": True, "logprobs": 2,
                                                   "temperature": 0}, timeout=60)
    assert r.status_code == 200, r.text
    lp = r.json()["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(ids) + 1 and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    tf = score_continuation(model, SkipPolicy.dense(), ids[:1], ids[1:])
    assert lp["token_logprobs"][1 : len(ids)] == pytest.approx([-x for x in tf.nll], abs=1e-4)
    assert all(len(t) <= 2 and max(t.values()) >= v - 1e-6 for t, v in zip(lp["top_logprobs"][1:], lp["token_logprobs"][1:]))
    assert r.json()["choices"][0]["text"].startswith("The capital of France is Paris")
    refused = httpx.post(f"{url}/v1/completions", json={"prompt": "Hi", "max_tokens": 5, "logprobs": 1})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "logprobs"


def test_lm_eval_runs_a_multiple_choice_and_a_generation_task(endpoint, tmp_path):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from ffnskip.eval import prompt_logprobs

    url, model, tok = endpoint
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    (tmp_path / "mc.yaml").write_text(MC_TASK.format(data=data))
    (tmp_path / "gen.yaml").write_text(GEN_TASK.format(data=data))
    out = simple_evaluate(
        model="local-completions",
        model_args={"base_url": f"{url}/v1/completions", "model": "smollm2-135m", "num_concurrent": 1,
                    "max_retries": 1, "tokenized_requests": True},
        tasks=["ffnskip_mc", "ffnskip_gen"],
        task_manager=TaskManager(include_path=str(tmp_path)),
        log_samples=True,
    )
    mc, gen = out["results"]["ffnskip_mc"], out["results"]["ffnskip_gen"]
    assert "acc,none" in mc and "exact_match,none" in gen
    # every (context, continuation) lm-eval asked about, scored in this process without the server
    # (split as lm-eval splits a pair): lm-eval received and read our numbers right
    right = 0
    for sample in out["samples"]["ffnskip_mc"]:
        ours = []
        for (context, continuation), resp in zip(sample["arguments"], sample["resps"]):
            whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
            ctx = tok(context, add_special_tokens=False)["input_ids"]
            ours.append(sum(prompt_logprobs(model, whole, k=1).token_logprobs[len(ctx):]))
            assert resp[0][0] == pytest.approx(ours[-1], abs=1e-3)
        assert len(ours) == 3
        right += max(range(3), key=ours.__getitem__) == sample["target"]
    assert mc["acc,none"] == pytest.approx(right / len(QUESTIONS))
    assert len(out["samples"]["ffnskip_gen"]) == len(QUESTIONS)
    assert all(isinstance(s["resps"][0][0], str) for s in out["samples"]["ffnskip_gen"])  # generations came back
