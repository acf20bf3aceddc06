"""Studies end to end on a local Ray with a tiny random model: rows in every table, the Pareto
front, failed trials (a raising trial, a dying worker), successive halving (a trial stopped early
is stored as pruned and never recommended), the paper's warm-start points, resume after an
interrupted run, and the ``ffnskip results`` commands. No Ray process outlives the module."""

from __future__ import annotations

import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("FFNSKIP_DENSE_CACHE", "off")  # the workers inherit it: no writes to ~/.cache
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import optuna
import pytest
import sqlalchemy as sa

from ffnskip import SkipPolicy
from ffnskip.cli import main as ffnskip_main
from tuning.config import ConfigError, TuningConfig
from tuning.store import Store, StudyExists

ray = pytest.importorskip("ray")

QUESTIONS = [("What is two plus two?", "4"), ("Capital of France?", "Paris"), ("Color of the sky?", "blue"),
             ("How many legs has a cat?", "4"), ("Opposite of hot?", "cold"), ("First letter?", "a")]


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def ray_local():
    # The workers import this module for flaky_evaluate.
    here = os.path.dirname(os.path.abspath(__file__))
    pythonpath = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"PYTHONPATH": pythonpath}})
    node = ray._private.worker._global_node
    pids = [info.process.pid for infos in node.all_processes.values() for info in infos if info.process]
    yield
    ray.shutdown()
    deadline = time.monotonic() + 20
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if _alive(p)]
        time.sleep(0.2)
    assert not alive, f"Ray processes outlived the tests: {alive}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purposes
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A 6-layer random LLaMA with a byte-level tokenizer, as a Hugging Face directory."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<|endoftext|>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    d = tmp_path_factory.mktemp("tiny-llama")
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(d)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      initializer_range=0.2, eos_token_id=len(vocab) - 1)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def qa_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("data") / "qa.jsonl"
    p.write_text("\n".join(json.dumps({"question": q, "answer": a}) for q, a in QUESTIONS) + "\n")
    return p


def make_config(tiny_dir, qa_file, **overrides) -> TuningConfig:
    base = dict(
        study="S", model=str(tiny_dir), task="factoid_qa", data_file=str(qa_file), limit=4, max_new_tokens=6,
        # answer_agreement: the former name of output_identity, still read as it.
        trials=3, concurrency=2, resources={"cpu": 1, "gpu": 0}, quality_metric="answer_agreement",
        max_quality_drop=1.0, progress=False, warm_start=False,
        # A random model's cosines are low: thresholds that actually trigger skipping.
        search_space={"threshold": [-1.0, 0.6], "warmup_tokens": [0, 2], "dense_every": [0, 3]},
    )
    base.update(overrides)
    return TuningConfig(**base)


def run(cfg, url, tmp_path, **kw):
    from tuning.study import run_study

    lines: list[str] = []
    outcome = run_study(cfg, db=url, echo=lines.append, storage_path=str(tmp_path / "ray_results"), **kw)
    return outcome, "\n".join(lines)


def count(url: str, sql: str, **params) -> int:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return conn.execute(sa.text(sql), params).scalar()
    finally:
        engine.dispose()


def store_samples(url: str, trial_id: int):
    with Store(url) as store:
        return store.samples(trial_id)


def flaky_evaluate(model, tokenizer, policy, task, **kwargs):
    """The real evaluator, except for two marked policies: one raises, one kills its worker."""
    from ffnskip.eval import evaluate

    if policy.threshold == -0.75:
        raise RuntimeError("injected failure")
    if policy.threshold == -0.5:
        os._exit(3)
    return evaluate(model, tokenizer, policy, task, **kwargs)


# ------------------------------------------------------------------------------ tests
def test_study_end_to_end(ray_local, tiny_dir, qa_file, tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'e2e.db'}"
    outcome, log = run(make_config(tiny_dir, qa_file), url, tmp_path)
    assert outcome.ran == {"completed": 3, "failed": 0, "pruned": 0} and outcome.seconds > 0
    assert "measuring the dense baseline" in log and "Pareto front" in log and "trials/hour" in log
    assert log.count(" completed: ") == 3
    # The report ends with the verdict.
    assert log.splitlines()[-2].startswith("verdict (quality drop <= 1 at the 95% upper end")
    assert log.splitlines()[-3].startswith("recommended policy (--policy file): {")

    # Rows in every table.
    assert count(url, "SELECT count(*) FROM ffnskip_studies") == 1
    assert count(url, "SELECT count(*) FROM ffnskip_baselines") == 1
    assert count(url, "SELECT count(*) FROM ffnskip_trials WHERE status = 'completed'") == 3
    assert count(url, "SELECT count(*) FROM ffnskip_samples") == 3 * 4
    with Store(url) as store:
        study = store.require_study("S")
        assert study.search_space["num_layers"] == 6 and study.model_hash and study.data_fingerprint
        assert study.library_versions["ray"] and study.hardware["cpu_count"]
        base = store.get_baseline(study.id)
        assert base.quality == 1.0 and base.n == 4 and base.tokens_per_s > 0 and base.outputs
        trials = store.trials(study.id)
        for t in trials:
            p = SkipPolicy.from_dict(t.policy)
            assert -1.0 <= p.threshold <= 0.6 and 0 <= p.layer_start < p.layer_end <= 6
            assert 0.0 <= t.quality <= 1.0 and t.quality_drop == pytest.approx(1.0 - t.quality) and t.n == 4
            if t.metrics.get("vs_dense"):  # the report's intervals land in their columns
                assert t.quality_drop_low <= t.quality_drop <= t.quality_drop_high
            assert t.tokens_per_s > 0 and t.skip_ratio is not None and t.node and t.finished_at >= t.started_at
            assert t.metrics["skip"]["skip_ratio"] == t.skip_ratio and t.optuna_number is not None
        assert any(t.skip_ratio > 0 for t in trials)
        # The model is loaded once per worker, not once per trial.
        workers = {t.metrics["worker"]["pid"] for t in trials}
        assert len(workers) < len(trials)
        assert all(t.metrics["worker"]["model_loads"] == 1 for t in trials)
        # The dense decodes came from the baseline: the trials decoded only their own policy.
        assert all(t.metrics["settings"]["dense_cache"]["misses"] == 0 for t in trials)

    # Optuna's study lives in the same database, with the constraint on every trial.
    ot = optuna.load_study(study_name="S", storage=url)
    assert [t.state.name for t in ot.trials] == ["COMPLETE"] * 3
    assert all(len(t.values) == 3 and set(t.constraints) == {"quality_drop"} for t in ot.trials)
    assert {t.number for t in ot.trials} == {t.optuna_number for t in trials}

    # ffnskip results ...
    capsys.readouterr()
    assert ffnskip_main(["results", "pareto", "--study", "S", "--db", url]) == 0
    assert "Pareto front of 'S'" in capsys.readouterr().out
    assert ffnskip_main(["results", "pareto", "--study", "S", "--db", url, "--json"]) == 0
    front = json.loads(capsys.readouterr().out)
    assert front["trials"] and front["objectives"] == ["quality", "skip_ratio", "tokens_per_s"]
    assert ffnskip_main(["results", "best", "--study", "S", "--db", url, "--json"]) == 0
    policy_text = capsys.readouterr().out
    best = SkipPolicy.from_json(policy_text)
    assert best.mode == "dense" or best.to_dict() in [t.policy for t in trials]
    assert ffnskip_main(["results", "best", "--study", "S", "--db", url, "--explain", "--json"]) == 0
    explained = json.loads(capsys.readouterr().out)
    assert explained["policy"] == best.to_dict() and explained["quality_metric"] == "output_identity"
    policy_file = tmp_path / "best.json"
    policy_file.write_text(policy_text)
    assert ffnskip_main(["generate", "--model", str(tiny_dir), "--policy", str(policy_file), "--max-new-tokens", "4",
                         "--json", "hello"]) == 0
    assert json.loads(capsys.readouterr().out)["policy"] == best.to_dict()
    assert ffnskip_main(["results", "studies", "--db", url, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["completed"] == 3
    assert ffnskip_main(["results", "trials", "--study", "S", "--db", url, "--sort", "skip_ratio", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["skip_ratio"] for r in rows] == sorted((r["skip_ratio"] for r in rows), reverse=True)
    assert ffnskip_main(["results", "export", "--study", "S", "--db", url, "--format", "csv"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 4
    png = tmp_path / "pareto.png"
    assert ffnskip_main(["results", "plot", "--study", "S", "--db", url, "--out", str(png)]) == 0
    assert png.stat().st_size > 1000
    assert ffnskip_main(["results", "best", "--study", "nope", "--db", url]) == 2
    assert "no study 'nope'" in capsys.readouterr().err


def test_failing_trials_are_recorded_and_the_study_goes_on(ray_local, tiny_dir, qa_file, tmp_path):
    url = f"sqlite:///{tmp_path / 'fail.db'}"
    cfg = make_config(tiny_dir, qa_file, study="F", trials=4, evaluator="test_tuning_e2e:flaky_evaluate",
                      start_points=[{"threshold": -0.75}, {"threshold": -0.5}])
    outcome, log = run(cfg, url, tmp_path)
    assert outcome.ran == {"completed": 2, "failed": 2, "pruned": 0}
    assert log.count("FAILED") == 2
    with Store(url) as store:
        trials = store.trials(store.require_study("F").id)
    by_threshold = {t.policy["threshold"]: t for t in trials}
    raised, died = by_threshold[-0.75], by_threshold[-0.5]
    assert raised.status == "failed" and raised.error.startswith("RuntimeError: injected failure")
    assert "Traceback" in raised.error or "flaky_evaluate" in raised.error
    assert died.status == "failed" and "died" in died.error.lower()
    assert sorted(t.status for t in trials) == ["completed", "completed", "failed", "failed"]
    states = sorted(t.state.name for t in optuna.load_study(study_name="F", storage=url).trials)
    assert states == ["COMPLETE", "COMPLETE", "FAIL", "FAIL"]


@pytest.mark.parametrize("backend", ["postgresql"])
def test_resume_after_an_interrupted_run(ray_local, tiny_dir, qa_file, tmp_path, backend, request):
    url = request.getfixturevalue("postgresql_url")
    cfg = make_config(tiny_dir, qa_file, study="R", trials=2)
    first, _ = run(cfg, url, tmp_path)
    assert first.ran["completed"] == 2

    # What a job killed mid-trial leaves behind: a running row and a RUNNING Optuna trial.
    with Store(url) as store:
        sid = store.require_study("R").id
        stale = store.start_trial(sid, {"threshold": 0.1}, ray_trial_id="killed")
    optuna.load_study(study_name="R", storage=url).ask()

    with pytest.raises(StudyExists, match="--resume"):
        run(cfg.replace(trials=4), url, tmp_path)
    with pytest.raises(ConfigError, match="'limit'"):
        run(cfg.replace(trials=4, limit=3), url, tmp_path, resume=True)

    second, log = run(cfg.replace(trials=4), url, tmp_path, resume=True)
    assert second.ran == {"completed": 2, "failed": 0, "pruned": 0}
    assert "marked 1 interrupted" in log
    assert count(url, "SELECT count(*) FROM ffnskip_trials t JOIN ffnskip_studies s ON s.id = t.study_id "
                      "WHERE s.name = 'R' AND t.status = 'completed'") == 4
    assert count(url, "SELECT count(*) FROM ffnskip_baselines") == 1  # measured once
    with Store(url) as store:
        assert store.get_trial(stale).status == "failed"
        assert "interrupted" in store.get_trial(stale).error
    states = [t.state.name for t in optuna.load_study(study_name="R", storage=url).trials]
    assert "RUNNING" not in states and states.count("COMPLETE") == 4

    third, log = run(cfg.replace(trials=4), url, tmp_path, resume=True)
    assert third.ran == {"completed": 0, "failed": 0, "pruned": 0} and "nothing to run" in log


def test_successive_halving_stops_a_bad_trial_and_never_recommends_it(ray_local, tiny_dir, qa_file, tmp_path, capsys):
    """Rungs of 2 then 4 samples, one trial at a time: a policy that never skips (identical to
    dense) reaches the second rung first; one that skips every FFN it may is far outside the
    allowed drop on its first rung, so ASHA stops it there."""
    url = f"sqlite:///{tmp_path / 'asha.db'}"
    never = {"threshold": 2.0, "warmup_tokens": 0, "layer_start": 1, "layer_end": 5, "skip_budget": 1, "dense_every": 0}
    always = {"threshold": -1.0, "warmup_tokens": 0, "layer_start": 1, "layer_end": 5, "skip_budget": 3, "dense_every": 0}
    cfg = make_config(tiny_dir, qa_file, study="H", trials=3, concurrency=1, max_quality_drop=0.0,
                      max_new_tokens=8, scheduler={"kind": "asha", "min_samples": 2, "reduction_factor": 2},
                      search_space={"threshold": [-1.0, 2.0], "warmup_tokens": [0, 2], "layer_start": [1, 2],
                                    "layer_end": [4, 5], "dense_every": [0, 3]},
                      start_points=[never, always])
    outcome, log = run(cfg, url, tmp_path)
    assert outcome.ran["pruned"] >= 1 and outcome.ran["completed"] >= 1 and outcome.ran["failed"] == 0
    assert "successive halving over 2 -> 4 samples" in log and "stopped early after 2 samples" in log
    assert "stopped early by successive halving" in log  # the trials/hour line counts them
    with Store(url) as store:
        trials = {t.policy["threshold"]: t for t in store.trials(store.require_study("H").id)}
    good, bad = trials[2.0], trials[-1.0]
    assert good.status == "completed" and good.n == 4 and good.quality_drop == 0.0
    assert good.metrics["rung"]["rung_index"] == 1 and good.metrics["rung"]["rungs"] == 2
    assert bad.status == "pruned" and bad.n == 2 and bad.quality_drop > 0
    assert bad.stop_reason.startswith("stopped early by successive halving after rung 1 of 2 (2 samples)")
    assert bad.finished_at and len(store_samples(url, bad.id)) == 2
    ot = {t.params.get("threshold"): t for t in optuna.load_study(study_name="H", storage=url).trials}
    assert ot[-1.0].state.name == "PRUNED" and ot[2.0].state.name == "COMPLETE"
    assert ot[-1.0].user_attrs["stopped_at_samples"] == 2

    # Never recommended, whatever the limit: pruned rows are not candidates.
    capsys.readouterr()
    for limit in ("0.0", "1.0"):
        assert ffnskip_main(["results", "best", "--study", "H", "--db", url, "--explain", "--json",
                             "--max-quality-drop", limit]) == 0
        d = json.loads(capsys.readouterr().out)
        assert d["trial_id"] != bad.id and (d["candidate"] or {}).get("trial_id") != bad.id
        assert d["trials"]["pruned"] == outcome.ran["pruned"]
    assert ffnskip_main(["results", "trials", "--study", "H", "--db", url, "--status", "pruned"]) == 0
    assert f"trial {bad.id} stopped early: stopped early by successive halving" in capsys.readouterr().out


def test_warm_start_evaluates_the_papers_points_first(ray_local, tiny_dir, qa_file, tmp_path):
    from tuning.space import paper_points, resolve_space

    url = f"sqlite:///{tmp_path / 'warm.db'}"
    cfg = make_config(tiny_dir, qa_file, study="W", trials=2, concurrency=1, warm_start=True)
    outcome, _ = run(cfg, url, tmp_path)
    assert outcome.ran["completed"] == 2
    expected = paper_points(resolve_space(cfg.search_space, 6, 6), 6, 6)
    with Store(url) as store:
        trials = store.trials(store.require_study("W").id)
    got = [{k: t.policy[k] for k in expected[0]} for t in sorted(trials, key=lambda t: t.optuna_number)]
    assert got == expected[:2]
