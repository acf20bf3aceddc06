"""``ffnskip evaluate``: every bad input gives one error line (exit 2, before any model loads),
and a user's own question file with mapped fields runs end to end on the real model."""

from __future__ import annotations

import json

import pytest
import torch

from ffnskip.cli import main


def run_cli(capsys, *argv):
    code = main(["evaluate", *argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def qa_file(tmp_path):
    p = tmp_path / "mine.jsonl"
    rows = [
        {"q": "What is the capital of France?", "gold": ["Paris"]},
        {"q": "Which planet is known as the Red Planet?", "gold": "Mars"},
        {"q": "Who wrote Romeo and Juliet?", "gold": ["William Shakespeare", "Shakespeare"]},
    ]
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return p


def bad_inputs(tmp_path, qa_file):
    malformed = tmp_path / "broken.jsonl"
    malformed.write_text('{"question": "x", "answer": \n')
    empty_answer = tmp_path / "empty.jsonl"
    empty_answer.write_text(json.dumps({"question": "Q?", "answer": ""}) + "\n")
    csv = tmp_path / "qa.csv"
    csv.write_text("prompt,gold\nQ?,A\n")
    return [
        (["--task", "translation"], "unknown task 'translation'"),
        (["--data", str(tmp_path / "missing.jsonl")], "does not exist"),
        (["--data", str(malformed)], "cannot parse"),
        (["--data", str(csv)], "has no field 'question'"),
        (["--data", str(qa_file), "--field", "question=q", "--field", "answer=answers"], "has no field 'answers'"),
        (["--data", str(qa_file), "--field", "colour=q"], "has no field 'colour'"),
        (["--data", str(qa_file), "--field", "question"], "NAME=COLUMN"),
        (["--data", str(empty_answer)], "row 1: field 'answer' is empty"),
        (["--data", str(tmp_path / "notes.txt")], "does not exist"),
        (["--field", "answer=gold"], "only applies to a --data file"),
        (["--policy-json", "{not json"], "malformed JSON"),
        (["--policy-json", '{"mode": "sideways"}'], "policy field 'mode'"),
        (["--policy-json", '{"threshold": 0.9, "warmup": 3}'], "policy field 'warmup'"),
        (["--policy", str(tmp_path / "nope.json")], "cannot read"),
        (["--judge-model", "gpt"], "--judge-model needs --judge-url"),
        (["--judge-url", "http://127.0.0.1:9/v1", "--judge-model", "m"], "conversation and summarization only"),
        (["--task", "conversation", "--judge-url", "ftp://x", "--judge-model", "m"], "http(s) URL"),
        (["--data-dir", str(tmp_path / "nowhere")], "does not exist (--data-dir)"),
        (["--output", str(tmp_path / "no" / "dir" / "r.json")], "does not exist"),
    ]


def test_each_bad_input_gives_one_error_line(tmp_path, qa_file, capsys):
    (tmp_path / "notes.txt").unlink(missing_ok=True)
    for argv, expected in bad_inputs(tmp_path, qa_file):
        code, out, err = run_cli(capsys, *argv)
        lines = err.strip().splitlines()
        assert code == 2, (argv, err)
        assert len(lines) == 1 and lines[0].startswith("ffnskip evaluate: error: "), (argv, err)
        assert expected in lines[0], (argv, lines[0])
        assert out == ""


def test_wrong_file_type_is_named(tmp_path, capsys):
    p = tmp_path / "notes.txt"
    p.write_text("What? | that\n")
    code, _, err = run_cli(capsys, "--data", str(p))
    assert code == 2 and "must be a .jsonl, .json (array) or .csv file" in err


@pytest.mark.slow
def test_user_question_file_with_mapped_fields_end_to_end(qa_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FFNSKIP_DENSE_CACHE", "off")
    threads = torch.get_num_threads()
    out_file = tmp_path / "report.json"
    policy = {"mode": "random", "warmup_tokens": 1, "skip_budget": 6, "dense_every": 0}
    try:
        code, out, err = run_cli(
            capsys, "--data", str(qa_file), "--field", "question=q", "--field", "answer=gold", "--limit", "2",
            "--max-new-tokens", "8", "--policy-json", json.dumps(policy), "--speed-items", "1", "--threads", "1",
            "--json", "--samples", "--output", str(out_file),
        )
    finally:
        torch.set_num_threads(threads)
    assert code == 0, err
    data = json.loads(out)
    assert json.loads(out_file.read_text()) == data
    assert data["task"] == "factoid_qa" and data["model"] == "smollm2-135m" and data["n"] == 2
    assert data["policy"]["mode"] == "random" and data["policy"]["skip_budget"] == 6
    assert data["primary"] == {"name": "accuracy", "higher_is_better": True}
    for k in ("accuracy", "exact_match", "tokens_per_s", "repetition"):
        assert data["dense"][k] is not None, k
    for k in ("accuracy", "exact_match", "tokens_per_s", "repetition", "skip_ratio", "skip_ratio_post_warmup",
              "answer_agreement", "rouge_l_vs_dense", "first_divergence", "nll_vs_dense"):
        assert data["skip"][k] is not None, k
    assert data["speedup"] > 0 and data["speed"]["method"] == "alternating"
    assert data["skip"]["skip_ratio"] > 0
    assert data["settings"]["data"] == str(qa_file)
    questions = {s["prompt"].split("question: ")[1].split("\n")[0] for s in data["samples"]}
    rows = [json.loads(line) for line in qa_file.read_text().splitlines()]
    assert questions <= {r["q"] for r in rows}
    refs = {r["q"]: (r["gold"] if isinstance(r["gold"], list) else [r["gold"]]) for r in rows}
    for s in data["samples"]:
        q = s["prompt"].split("question: ")[1].split("\n")[0]
        assert s["reference"] == refs[q]
    assert "Paris" in json.dumps(data["samples"]) or "Mars" in json.dumps(data["samples"])


@pytest.mark.slow
def test_table_output(qa_file, capsys, monkeypatch):
    monkeypatch.setenv("FFNSKIP_DENSE_CACHE", "off")
    threads = torch.get_num_threads()
    try:
        code, out, err = run_cli(capsys, "--data", str(qa_file), "--field", "question=q", "--field", "answer=gold",
                                 "--limit", "1", "--max-new-tokens", "4", "--no-speed", "--no-nll", "--threads", "1",
                                 "--policy-json", '{"mode": "static", "warmup_tokens": 1, "skip_budget": 3}')
    finally:
        torch.set_num_threads(threads)
    assert code == 0, err
    assert out.startswith("factoid_qa on smollm2-135m: 1 samples")
    assert "accuracy *" in out and "skip_ratio" in out and "speedup" in out
