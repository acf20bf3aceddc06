"""The ffnskip CLI as a user runs it: real processes, real model."""

import json
import os
import subprocess
import sys

import pytest

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def ffnskip(*args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "ffnskip.cli", *args], capture_output=True, text=True, timeout=timeout, env=ENV
    )


@pytest.mark.slow
def test_generate_json_fields():
    policy = '{"mode": "adaptive", "threshold": -1, "layer_start": 5, "layer_end": 25, "warmup_tokens": 4, "skip_budget": 9, "dense_every": 0}'
    p = ffnskip("generate", "--json", "--ignore-eos", "--max-new-tokens", "10", "--policy-json", policy, "Hello there", "Why is the sky blue?")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["model"] == "smollm2-135m" and out["policy"]["skip_budget"] == 9 and out["tokens_per_s"] > 0
    assert [o["prompt"] for o in out["outputs"]] == ["Hello there", "Why is the sky blue?"]
    for o in out["outputs"]:
        assert {"prompt", "text", "generated_tokens", "skipped_ffn", "skip_ratio", "skip_ratio_post_warmup", "skipped_per_layer"} <= set(o)
        assert o["generated_tokens"] == 10 and o["skipped_ffn"] == 6 * 9
        assert len(o["skipped_per_layer"]) == 30


@pytest.mark.slow
def test_generate_streams_text_and_a_summary_line(tmp_path):
    pol = tmp_path / "p.json"
    pol.write_text('{"mode": "dense"}')
    p = ffnskip("generate", "--policy", str(pol), "--max-new-tokens", "8", "--raw", "The capital of France is")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.strip().splitlines()
    assert "tok/s" in lines[-1] and "skip_ratio 0.000" in lines[-1]
    assert "Paris" in p.stdout


@pytest.mark.slow
def test_profile_json_and_plot(tmp_path):
    png = tmp_path / "sat.png"
    p = ffnskip("profile", "--tokens", "64", "--json", "--plot", str(png))
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert len(out["layers"]) == 30
    means = [lp["mean_cos"] for lp in out["layers"]]
    p10 = [lp["p10_cos"] for lp in out["layers"]]
    # the paper's saturation picture on this model: layer 0 rewrites the residual, the middle saturates
    assert means[0] < 0.5 and min(means[1:-1]) > 0.9 > means[-1]
    s = out["suggested"]
    from ffnskip.saturation import suggest

    start, end, tau = suggest(means, p10)  # the documented rule, on the printed (rounded) numbers
    assert (s["layer_start"], s["layer_end"]) == (start, end) and s["threshold"] == pytest.approx(tau, abs=1e-4)
    assert 0 < s["layer_start"] < s["layer_end"] < 30
    assert png.stat().st_size > 1000


@pytest.mark.parametrize(
    "args, message",
    [
        (["generate", "--model", "no-such-model", "hi"], "no-such-model"),
        (["generate", "--policy-json", "{mode: dense", "hi"], "malformed JSON"),
        (["generate", "--policy-json", '{"threshold": 9}', "hi"], "'threshold'"),
        (["generate", "--policy-json", '{"layer_start": 50}', "hi"], "'layer_start'"),
        (["generate", "--policy", "/nonexistent/p.json", "hi"], "cannot read"),
        (["generate", "   "], "empty"),
        (["generate", "--max-new-tokens", "0", "hi"], "--max-new-tokens must be positive"),
        (["generate", "--max-new-tokens", "-3", "hi"], "--max-new-tokens must be positive"),
        (["profile", "--tokens", "0"], "--tokens must be positive"),
        (["profile", "--text-file", "/nonexistent.txt"], "--text-file"),
    ],
)
def test_bad_input_exits_nonzero_with_one_clear_message(args, message):
    p = ffnskip(*args)
    assert p.returncode != 0
    assert message in p.stderr
    assert "Traceback" not in p.stderr


# ---------------------------------------------------------------------- the verb table
def test_one_table_of_verbs_without_entry_point_metadata(monkeypatch):
    import importlib.metadata

    from ffnskip import cli

    def no_entry_points(*args, **kwargs):
        raise AssertionError("the CLI must not read entry-point metadata")

    monkeypatch.setattr(importlib.metadata, "entry_points", no_entry_points)
    assert [v.name for v in cli.VERBS] == ["generate", "profile", "bench", "evaluate", "tune", "results", "serve", "models"]
    parser = cli.build_parser()
    args = parser.parse_args(["evaluate", "--task", "perplexity", "--limit", "8"])
    assert args.func.__module__ == "ffnskip.eval.cli" and args.limit == 8
    assert parser.parse_args(["tune", "--config", "x.yaml"]).func.__module__ == "tuning.cli"
    assert parser.parse_args(["results", "studies"]).func.__module__ == "tuning.cli"
    assert parser.parse_args(["serve"]).func.__module__ == "serve.cli"


BLOCKED_RUN = (
    "import sys\n"
    "class Block:\n"
    "    def find_spec(self, name, path=None, target=None):\n"
    "        if name.split('.')[0] == 'tuning':\n"
    "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
    "sys.meta_path.insert(0, Block())\n"
    "from ffnskip.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def test_a_verb_whose_package_is_missing_is_one_line_with_the_install_hint():
    p = subprocess.run([sys.executable, "-c", BLOCKED_RUN, "tune", "--config", "x.yaml", "--trials", "3"],
                       capture_output=True, text=True, timeout=120, env=ENV)
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip().splitlines() == [
        "ffnskip tune: error: the module 'tuning' is not installed; install it with: pip install 'ffnskip[tune]'"]
    p = subprocess.run([sys.executable, "-c", BLOCKED_RUN, "--help"], capture_output=True, text=True, timeout=120, env=ENV)
    assert p.returncode == 0 and "evaluate" in p.stdout and "(unavailable: No module named 'tuning')" in p.stdout


def test_a_missing_third_party_module_at_run_time_is_one_line(capsys):
    import argparse

    from ffnskip.cli import run_entry_point

    def needs_ray(args):
        raise ModuleNotFoundError("No module named 'ray'", name="ray")

    assert run_entry_point("ffnskip serve", needs_ray, argparse.Namespace(verbose=False), extra="serve") == 2
    assert capsys.readouterr().err == (
        "ffnskip serve: error: the module 'ray' is not installed; install it with: pip install 'ffnskip[serve]'\n")

    def bug(args):  # a first-party module that does not exist is a bug: the traceback stays
        raise ModuleNotFoundError("No module named 'ffnskip.nope'", name="ffnskip.nope")

    with pytest.raises(ModuleNotFoundError):
        run_entry_point("ffnskip generate", bug, argparse.Namespace(verbose=False))
