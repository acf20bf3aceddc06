"""Study configs, the search space, objectives, the Pareto front and the best-policy rule
(plain Python: no Ray, no model)."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest

from ffnskip import SkipPolicy
from tuning.config import ConfigError, SearchSpace, TuningConfig, load_config
from tuning.objectives import (
    NoFeasibleTrial,
    QualitySpec,
    baseline_values,
    choose_best,
    constraint_value,
    directions,
    dominates,
    pareto_front,
    quality_spec,
    trial_values,
)
from tuning.space import default_bounds, policy_from_params, resolve_space, suggest

CONFIGS = Path(__file__).resolve().parents[1] / "tuning" / "configs"


# ------------------------------------------------------------------------------ configs
def write(tmp_path, text: str) -> Path:
    p = tmp_path / "study.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_are_valid(path):
    cfg = load_config(path)
    assert cfg.study and cfg.trials > 0 and cfg.objectives


def test_demo_config_is_the_readme_study():
    cfg = load_config(CONFIGS / "smollm2-factoid.yaml")
    assert (cfg.model, cfg.task, cfg.limit, cfg.trials, cfg.concurrency) == ("smollm2-135m", "factoid_qa", 30, 12, 2)
    # The shipped start point must be a valid policy for the 30-layer model it targets.
    bounds = resolve_space(cfg.search_space, 30, max_new_tokens=24)
    assert bounds["warmup_tokens"] == [0, 4]
    for point in cfg.start_points:
        SkipPolicy(**point).resolve(30)
        for k, v in point.items():
            lo_hi = bounds[k]
            assert lo_hi[0] <= v <= lo_hi[1], k


def test_command_line_overrides_the_file(tmp_path):
    p = write(tmp_path, "trials: 5\nlimit: 7\nconcurrency: 1\n")
    cfg = load_config(p, trials=3, limit=None, concurrency=2, study="S")
    assert (cfg.trials, cfg.limit, cfg.concurrency, cfg.study) == (3, 7, 2, "S")
    assert load_config(p).study == "study"  # default name: the file's stem


@pytest.mark.parametrize(
    "text, key, fragment",
    [
        ("trails: 3\n", "trails", "unknown key"),
        ("resources: {cpu: 1, gpus: 1}\n", "resources.gpus", "unknown key"),
        ("resources: {gpu: -0.5}\n", "resources.gpu", ">= 0"),
        ("resources: {cpu: 0}\n", "resources.cpu", "> 0"),
        ("resources: {gpu: 1.5}\n", "resources.gpu", "whole number"),
        ("search_space: {treshold: [0.8, 0.9]}\n", "search_space.treshold", "unknown key"),
        ("search_space: {threshold: [0.99, 0.8]}\n", "search_space.threshold", "above high"),
        ("search_space: {threshold: [0.8, 3]}\n", "search_space.threshold", "[-1, 2]"),
        ("search_space: {layer_start: [1, 2, 3]}\n", "search_space.layer_start", "[low, high]"),
        ("search_space: {layer_start: 1.5}\n", "search_space.layer_start", "integers"),
        ("search_space: {skip_budget: [0, 4]}\n", "search_space.skip_budget", ">= 1"),
        ("search_space: {layer_start: [10, 12], layer_end: [4, 10]}\n", "search_space.layer_end", "above layer_start"),
        ("trials: 0\n", "trials", "positive integer"),
        ("concurrency: two\n", "concurrency", "positive integer"),
        ("limit: -1\n", "limit", "positive integer"),
        ("sampler: random\n", "sampler", "tpe, nsga2"),
        ("objectives: [quality, speed]\n", "objectives", "distinct names"),
        ("objectives: []\n", "objectives", "non-empty"),
        ("quality_metric: bleu\n", "quality_metric", "primary"),
        ("max_quality_drop: -0.1\n", "max_quality_drop", ">= 0"),
        ("chat: maybe\n", "chat", "true or false"),
        ("start_points: [{threshold: 0.9, budget: 3}]\n", "start_points[0].budget", "unknown field"),
        ("evaluator: nocolon\n", "evaluator", "module:function"),
        ("model: ''\n", "model", "non-empty"),
    ],
)
def test_bad_values_name_their_key(tmp_path, text, key, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text))
    assert err.value.key == key
    assert f"config key '{key}'" in str(err.value) and fragment in str(err.value)


def test_unreadable_or_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "trials: [1\n"))
    with pytest.raises(ConfigError, match="mapping"):
        load_config(write(tmp_path, "- 1\n- 2\n"))


def test_config_round_trips_through_a_dict():
    cfg = TuningConfig(resources={"cpu": 2, "gpu": 0.5}, search_space={"threshold": [0.9, 0.95], "dense_every": 4})
    again = TuningConfig.from_dict(cfg.to_dict())
    assert again == cfg and again.resources.gpu == 0.5 and again.search_space.dense_every == 4


def test_a_study_stored_under_the_evaluators_former_name_still_resumes():
    import ffnskip
    from tuning.study import check_resumable
    from tuning.trial import load_evaluator

    assert TuningConfig().evaluator == "ffnskip.eval:evaluate"
    assert load_evaluator(TuningConfig().evaluator) is ffnskip.evaluate
    old = TuningConfig(evaluator="ffnskip.evaluate:evaluate")  # before the harness moved to ffnskip.eval
    assert old.evaluator == "ffnskip.eval:evaluate"
    stored = {**TuningConfig().to_dict(), "evaluator": "ffnskip.evaluate:evaluate"}
    check_resumable(stored, TuningConfig())  # no ConfigError
    with pytest.raises(ConfigError, match="evaluator"):
        check_resumable({**stored, "evaluator": "mine:evaluate"}, TuningConfig())


# ------------------------------------------------------------------------------ search space
def test_default_bounds_follow_the_depth():
    assert default_bounds(30)["layer_start"] == [1, 10]
    assert default_bounds(30)["layer_end"] == [20, 29]
    assert default_bounds(30)["skip_budget"] == [1, 15]
    assert default_bounds(18)["layer_end"] == [12, 17]


def test_resolve_checks_bounds_against_the_model():
    with pytest.raises(ConfigError, match="search_space.layer_end") as err:
        resolve_space(SearchSpace(layer_end=[20, 31]), 30)
    assert "at most the model's 30 layers" in str(err.value)
    with pytest.raises(ConfigError, match="search_space.layer_start"):
        resolve_space(SearchSpace(layer_start=[1, 30]), 30)
    with pytest.raises(ConfigError, match="search_space.skip_budget"):
        resolve_space(SearchSpace(layer_start=5, layer_end=8, skip_budget=[4, 6]), 30)
    with pytest.raises(ConfigError, match="at least 3"):
        resolve_space(SearchSpace(), 2)
    # A start range reaching past the highest end is capped instead of producing dead draws.
    assert resolve_space(SearchSpace(layer_start=[2, 9], layer_end=6), 12)["layer_start"] == [2, 5]


@pytest.mark.parametrize("layers", [4, 18, 30])
def test_every_suggestion_is_a_valid_policy(layers):
    bounds = resolve_space(SearchSpace(dense_every=0), layers)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(60):
        trial = study.ask()
        fixed = suggest(trial, bounds)
        params = {**trial.params, **fixed}
        policy = policy_from_params(params, seed=3)
        resolved = policy.resolve(layers)
        assert policy.mode == "adaptive" and policy.seed == 3 and policy.dense_every == 0
        assert 0 <= resolved.start < resolved.end <= layers and 1 <= resolved.budget <= resolved.end - resolved.start
        assert 0.80 <= policy.threshold <= 0.99
        study.tell(trial, 0.0)


# ------------------------------------------------------------------------------ objectives
REPORT = {
    "primary": {"name": "accuracy", "higher_is_better": True},
    "dense": {"accuracy": 0.60, "tokens_per_s": 10.0},
    "skip": {"accuracy": 0.55, "answer_agreement": 0.8, "rouge_l_vs_dense": 0.9, "skip_ratio": 0.2,
             "skip_ratio_post_warmup": 0.25, "tokens_per_s": 11.0},
    "speedup": 1.08,
}


def test_trial_values_against_the_stored_baseline():
    spec = quality_spec(REPORT, "primary")
    assert spec == QualitySpec("accuracy", True)
    base = baseline_values(REPORT, spec)
    assert base == {"quality": 0.60, "tokens_per_s": 10.0}
    v = trial_values(REPORT, spec, base["quality"], base["tokens_per_s"])
    assert v["quality"] == 0.55 and v["quality_drop"] == pytest.approx(0.05)
    assert v["skip_ratio"] == 0.2 and v["tokens_per_s"] == 11.0 and v["speedup"] == 1.08
    # Fidelity metrics: dense agrees with itself.
    fid = quality_spec(REPORT, "answer_agreement")
    assert baseline_values(REPORT, fid)["quality"] == 1.0
    assert trial_values(REPORT, fid, 1.0, 10.0)["quality_drop"] == pytest.approx(0.2)
    # Lower-is-better metrics (perplexity) drop the other way and are minimised.
    ppl = {"primary": {"name": "perplexity", "higher_is_better": False}, "dense": {"perplexity": 10.0},
           "skip": {"perplexity": 12.5, "skip_ratio": 0.1, "tokens_per_s": 1.0}}
    pspec = quality_spec(ppl, "primary")
    assert trial_values(ppl, pspec, 10.0, None)["quality_drop"] == pytest.approx(2.5)
    assert directions(["quality", "skip_ratio"], pspec) == ["min", "max"]
    with pytest.raises(KeyError, match="no metric 'accuracy'"):
        trial_values({"skip": {"skip_ratio": 0.1}}, spec, 0.5, 1.0)


def test_constraint_sign_follows_optuna():
    assert constraint_value(0.03, 0.05) < 0 < constraint_value(0.08, 0.05)
    assert constraint_value(None, 0.05) == math.inf and constraint_value(0.5, None) == 0.0


def test_pareto_front_on_hand_made_points():
    # (quality, skip_ratio), both maximised.
    pts = [(0.60, 0.00), (0.58, 0.10), (0.55, 0.10), (0.50, 0.30), (0.50, 0.20), (0.40, 0.30), (0.58, 0.10)]
    assert pareto_front(pts, ["max", "max"]) == [0, 1, 3, 6]  # equal points both stay
    assert dominates(pts[1], pts[2], ["max", "max"]) and not dominates(pts[1], pts[6], ["max", "max"])
    # Minimising the first objective flips the front.
    assert pareto_front([(1, 1), (2, 2), (0, 0)], ["min", "max"]) == [0, 1, 2]
    assert pareto_front([(1, 1), (2, 1), (0, 2)], ["min", "max"]) == [2]
    # A missing value is worst.
    assert pareto_front([(None, 0.5), (0.1, 0.5)], ["max", "max"]) == [1]
    assert pareto_front([], ["max"]) == []
    with pytest.raises(ValueError):
        pareto_front([(1, 2)], ["max"])


def T(id, drop, skip, tps, quality=0.5):
    return SimpleNamespace(id=id, quality_drop=drop, skip_ratio=skip, tokens_per_s=tps, quality=quality)


def test_best_policy_is_constrained():
    trials = [T(1, 0.00, 0.05, 12.0), T(2, 0.03, 0.20, 10.0), T(3, 0.10, 0.35, 13.0), T(4, 0.02, 0.20, 9.0),
              T(5, -0.01, 0.10, 14.0)]
    assert choose_best(trials, max_quality_drop=0.05).id == 4  # tie on skip 0.20: smaller drop wins
    assert choose_best(trials, max_quality_drop=0.2).id == 3
    assert choose_best(trials, max_quality_drop=0.05, objective="tokens_per_s").id == 5
    assert choose_best(trials, max_quality_drop=None).id == 3
    assert choose_best([T(7, 0.0, 0.1, 1.0), T(6, 0.0, 0.1, 1.0)], max_quality_drop=0.0).id == 6
    with pytest.raises(NoFeasibleTrial, match=r"smallest drop: 0\.1.*trial 3"):
        choose_best([T(3, 0.1, 0.3, 1.0), T(8, 0.2, 0.4, 1.0)], max_quality_drop=0.05)
    with pytest.raises(NoFeasibleTrial, match="no completed trial"):
        choose_best([], max_quality_drop=0.05)
    with pytest.raises(ValueError, match="objective"):
        choose_best(trials, max_quality_drop=0.05, objective="quality")


def test_relative_sqlite_in_a_ray_job_is_flagged(monkeypatch):
    from tuning.study import job_database_warning

    assert job_database_warning("sqlite:///ffnskip.db") is None  # not in a job
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    assert "temporary copy" in job_database_warning("sqlite:///ffnskip.db")
    assert job_database_warning("sqlite:////abs/ffnskip.db") is None
    assert job_database_warning("postgresql+psycopg://u@h/db") is None


@pytest.mark.parametrize("sampler", ["tpe", "nsga2"])
def test_samplers_respect_the_quality_constraint(sampler):
    """The constraint as the search sets it (Trial.set_constraint before tell): Optuna's Pareto
    front keeps only trials within the allowed drop."""
    from tuning.ray_runner import make_sampler

    cfg = TuningConfig(sampler=sampler, trials=12, max_quality_drop=0.05, population_size=4 if sampler == "nsga2" else None)
    s = make_sampler(cfg, seed=0)
    assert type(s).__name__ == ("TPESampler" if sampler == "tpe" else "NSGAIISampler")
    study = optuna.create_study(directions=["maximize", "maximize"], sampler=s)
    bounds = resolve_space(cfg.search_space, 30, 24)
    for _ in range(12):
        trial = study.ask()
        fixed = suggest(trial, bounds)
        params = {**trial.params, **fixed}
        drop = (params["layer_end"] - params["layer_start"] - 10) / 100  # wider bands lose more quality
        trial.set_constraint("quality_drop", constraint_value(drop, cfg.max_quality_drop))
        study.tell(trial, [1.0 - drop, params["skip_budget"] / 30])
    feasible_ = [t for t in study.trials if t.constraints["quality_drop"] <= 0]
    assert feasible_ and len(feasible_) < len(study.trials)
    assert study.best_trials and all(t.constraints["quality_drop"] <= 0 for t in study.best_trials)
