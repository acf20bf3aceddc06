"""Study configs, the search space, objectives, the Pareto front and the best-policy rule
(plain Python: no Ray, no model)."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest

from ffnskip import SkipPolicy
from tuning.config import ConfigError, Scheduler, SearchSpace, TuningConfig, load_config
from tuning.objectives import (
    QualitySpec,
    asha_score,
    baseline_values,
    constraint_value,
    directions,
    dominates,
    pareto_front,
    quality_spec,
    recommend,
    trial_values,
)
from tuning.space import default_bounds, paper_points, policy_from_params, resolve_space, suggest

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


@pytest.mark.parametrize("name, layers", [("smollm2-factoid.yaml", 30), ("qwen2.5-coder-1.5b-factoid.yaml", 28)])
def test_shipped_start_points_fit_their_model(name, layers):
    """Every point the study evaluates first (the config's and the paper's) is a valid policy
    inside the search space of the model the config targets."""
    from tuning.study import start_points_for

    cfg = load_config(CONFIGS / name)
    bounds = resolve_space(cfg.search_space, layers, max_new_tokens=24)
    points = start_points_for(cfg, bounds, layers, 24)
    assert len(points) >= 3 and len({tuple(sorted(p.items())) for p in points}) == len(points)
    for point in points:
        policy = SkipPolicy(**point)
        resolved = policy.resolve(layers)
        assert resolved.budget <= resolved.end - resolved.start
        for k, v in point.items():
            lo_hi = bounds[k]
            assert lo_hi[0] <= v <= lo_hi[1], k


def test_demo_config_is_the_readme_study():
    cfg = load_config(CONFIGS / "smollm2-factoid.yaml")
    assert (cfg.model, cfg.task, cfg.limit, cfg.concurrency) == ("smollm2-135m", "factoid_qa", 30, 2)
    assert cfg.quality_metric == "output_identity" and cfg.warm_start
    assert cfg.scheduler is not None and cfg.scheduler.kind == "asha"
    bounds = resolve_space(cfg.search_space, 30, max_new_tokens=24)
    assert bounds["warmup_tokens"] == [0, 4]


def test_the_qwen_config_targets_the_alias():
    cfg = load_config(CONFIGS / "qwen2.5-coder-1.5b-factoid.yaml")
    assert cfg.model == "qwen2.5-coder-1.5b" and cfg.study == "qwen2.5-coder-1.5b-factoid"
    assert cfg.scheduler is not None and cfg.scheduler.rungs(cfg.limit)[-1] == (float(cfg.limit), cfg.limit)
    # Its bounds fit the 28-layer model.
    resolve_space(cfg.search_space, 28, max_new_tokens=24)


def test_former_quality_metric_name_is_read_as_output_identity(tmp_path):
    from tuning.study import check_resumable

    assert load_config(write(tmp_path, "quality_metric: answer_agreement\n")).quality_metric == "output_identity"
    stored = {**TuningConfig(quality_metric="answer_agreement").to_dict(), "quality_metric": "answer_agreement"}
    check_resumable(stored, TuningConfig(quality_metric="output_identity"))  # an old study keeps resuming
    with pytest.raises(ConfigError, match="former name of output_identity"):
        TuningConfig(quality_metric="agreement")


def test_scheduler_config_and_rungs(tmp_path):
    cfg = load_config(write(tmp_path, "scheduler: {kind: asha, min_samples: 4, reduction_factor: 2}\n"))
    assert cfg.scheduler == Scheduler("asha", 4, 2.0)
    assert cfg.scheduler.rungs(30) == [(4.0, 4), (8.0, 8), (16.0, 16), (30.0, 30)]
    assert Scheduler(min_samples=4, reduction_factor=3).rungs(30) == [(4.0, 4), (12.0, 12), (30.0, 30)]
    assert Scheduler(min_samples=8).rungs(8) == [(8.0, 8)]  # nothing to halve
    assert Scheduler(min_samples=4).rungs(9) == [(4.0, 4), (8.0, 8), (9.0, 9)]
    # Every intermediate rung is one of ASHA's milestones (min_t * rf ** k), in growing sample counts.
    rungs = Scheduler(min_samples=3, reduction_factor=1.7).rungs(20)
    assert [t for t, _ in rungs[:-1]] == [3 * 1.7 ** k for k in range(len(rungs) - 1)]
    assert [n for _, n in rungs] == sorted({n for _, n in rungs}) and rungs[-1] == (20.0, 20)
    assert load_config(write(tmp_path, "scheduler: {kind: none}\n")).scheduler is None
    assert TuningConfig().scheduler is None  # default: off
    for text, key in [("scheduler: {kind: hyperband}\n", "scheduler.kind"),
                      ("scheduler: {min_samples: 0}\n", "scheduler.min_samples"),
                      ("scheduler: {reduction_factor: 1}\n", "scheduler.reduction_factor"),
                      ("scheduler: {grace: 1}\n", "scheduler.grace"),
                      ("scheduler: asha\n", "scheduler"),
                      ("warm_start: maybe\n", "warm_start")]:
        with pytest.raises(ConfigError) as err:
            load_config(write(tmp_path, text))
        assert err.value.key == key


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
        ("objectives: [quality, speed_up]\n", "objectives", "speedup"),
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
    "n": 30,
    "dense": {"accuracy": 0.60, "tokens_per_s": 10.0},
    "skip": {"accuracy": 0.55, "output_identity": 0.8, "answer_agreement": 0.8, "answer_agreement_short": 0.9,
             "rouge_l_vs_dense": 0.9, "skip_ratio": 0.2, "skip_ratio_post_warmup": 0.25, "tokens_per_s": 11.0},
    "speedup": 1.08,
    "speedup_ci95": [1.02, 1.15],
    "speed": {"pairs": 6},
    "vs_dense": {
        "accuracy": {"value": -0.05, "low": -0.12, "high": 0.01, "n": 30, "level": 0.95},
        "output_identity": {"value": -0.2, "low": -0.35, "high": -0.08, "n": 30, "level": 0.95},
    },
}


def test_trial_values_against_the_stored_baseline():
    spec = quality_spec(REPORT, "primary")
    assert spec == QualitySpec("accuracy", True)
    base = baseline_values(REPORT, spec)
    assert base == {"quality": 0.60, "tokens_per_s": 10.0}
    v = trial_values(REPORT, spec, base["quality"], base["tokens_per_s"])
    assert v["quality"] == 0.55 and v["quality_drop"] == pytest.approx(0.05)
    assert v["skip_ratio"] == 0.2 and v["tokens_per_s"] == 11.0 and v["speedup"] == 1.08
    # The drop of a higher-is-better metric is dense - policy: its interval is [-high, -low].
    assert (v["quality_drop_low"], v["quality_drop_high"], v["n"]) == (-0.01, 0.12, 30)
    assert (v["speedup_low"], v["speedup_high"]) == (1.02, 1.15)
    # Fidelity metrics: dense agrees with itself.
    fid = quality_spec(REPORT, "output_identity")
    assert baseline_values(REPORT, fid)["quality"] == 1.0
    fv = trial_values(REPORT, fid, 1.0, 10.0)
    assert fv["quality_drop"] == pytest.approx(0.2) and (fv["quality_drop_low"], fv["quality_drop_high"]) == (0.08, 0.35)
    # A study stored under the former name reads the new report (and the other way round).
    old = trial_values(REPORT, QualitySpec("answer_agreement"), 1.0, 10.0)
    assert old["quality"] == 0.8 and old["quality_drop_high"] == 0.35
    legacy = {k: v for k, v in REPORT.items() if k not in ("vs_dense", "speedup_ci95")}
    legacy["skip"] = {k: v for k, v in REPORT["skip"].items() if k != "output_identity"}
    lv = trial_values(legacy, fid, 1.0, 10.0)
    assert lv["quality"] == 0.8 and lv["quality_drop_high"] is None and lv["speedup_low"] is None and lv["n"] == 30
    # Lower-is-better metrics (perplexity) drop the other way and are minimised: [low, high].
    ppl = {"primary": {"name": "perplexity", "higher_is_better": False}, "dense": {"perplexity": 10.0},
           "skip": {"perplexity": 12.5, "skip_ratio": 0.1, "tokens_per_s": 1.0},
           "vs_dense": {"perplexity": {"value": 2.5, "low": 1.0, "high": 4.0, "n": 5}}}
    pspec = quality_spec(ppl, "primary")
    pv = trial_values(ppl, pspec, 10.0, None)
    assert pv["quality_drop"] == pytest.approx(2.5) and (pv["quality_drop_low"], pv["quality_drop_high"]) == (1.0, 4.0)
    assert directions(["quality", "skip_ratio"], pspec) == ["min", "max"]
    with pytest.raises(KeyError, match="no metric 'accuracy'"):
        trial_values({"skip": {"skip_ratio": 0.1}}, spec, 0.5, 1.0)


def test_a_rung_on_fewer_samples_compares_with_dense_on_those_samples():
    # Dense accuracy on the rung's 4 samples is 0.75, not the stored baseline's 0.60.
    report = {"primary": {"name": "accuracy"}, "n": 4, "dense": {"accuracy": 0.75},
              "skip": {"accuracy": 0.5, "skip_ratio": 0.1, "tokens_per_s": 1.0}}
    v = trial_values(report, QualitySpec("accuracy"), 0.60, 1.0)
    assert v["quality_drop"] == pytest.approx(0.25) and v["n"] == 4


def test_asha_score_ranks_trials_within_the_drop_first():
    assert asha_score({"quality_drop": 0.0, "skip_ratio": 0.2}, 0.1) == 0.2
    assert asha_score({"quality_drop": 0.1, "skip_ratio": 0.05}, 0.1) == 0.05
    assert asha_score({"quality_drop": 0.0, "skip_ratio": None}, 0.1) == 0.0
    worse = asha_score({"quality_drop": 0.5, "skip_ratio": 0.4}, 0.1)
    assert worse < asha_score({"quality_drop": 0.2, "skip_ratio": 0.0}, 0.1) < 0.0
    assert asha_score({"quality_drop": 0.5, "skip_ratio": 0.3}, None) == 0.3
    assert asha_score({"quality_drop": None, "skip_ratio": 0.3}, 0.1) == -math.inf


def test_paper_points_are_clamped_into_the_space():
    bounds = resolve_space(SearchSpace(threshold=[0.94, 0.995], dense_every=[2, 8]), 30, 24)
    points = paper_points(bounds, 30, 24)
    assert points[0] == {"threshold": 0.95, "warmup_tokens": 0, "layer_start": 5, "layer_end": 25, "skip_budget": 4,
                         "dense_every": 6}
    assert points[2]["threshold"] == 0.94  # the paper's 0.91 is below this space's range
    # A fixed field is not part of the points; a 6-layer model still gets valid bands.
    small = resolve_space(SearchSpace(threshold=[-1.0, 0.6], dense_every=4), 6, 6)
    for p in paper_points(small, 6, 6):
        assert "dense_every" not in p and -1.0 <= p["threshold"] <= 0.6
        assert p["layer_start"] < p["layer_end"] <= 6 and 1 <= p["skip_budget"] <= p["layer_end"] - p["layer_start"]


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


def T(id, drop, speedup, ci=None, speed_ci=None, skip=0.1, status="completed", n=30):
    """A hand-made trial row: point values and (optionally) the 95% intervals."""
    d_lo, d_hi = ci or (None, None)
    s_lo, s_hi = speed_ci or (None, None)
    return SimpleNamespace(id=id, status=status, quality_drop=drop, quality_drop_low=d_lo, quality_drop_high=d_hi,
                           speedup=speedup, speedup_low=s_lo, speedup_high=s_hi, skip_ratio=skip, tokens_per_s=10.0,
                           n=n, policy={"mode": "adaptive", "threshold": 0.9 + id / 100})


def test_rule_recommends_the_fastest_trial_within_the_drop():
    trials = [
        T(1, 0.00, 1.10, (0.00, 0.02), (1.04, 1.16)),
        T(2, 0.02, 1.25, (0.00, 0.04), (1.12, 1.38)),   # the fastest that qualifies
        T(3, 0.03, 1.60, (0.00, 0.09), (1.40, 1.80)),   # faster, but the drop's upper end is above 0.05
        T(4, 0.00, 1.30, (0.00, 0.01), (0.95, 1.70)),   # faster point, but its interval reaches below 1
        T(5, 0.00, 2.00, (0.00, 0.00), (1.90, 2.10), status="pruned"),  # stopped early: never
        T(6, 0.00, 2.00, None, None, status="failed"),
    ]
    v = recommend(trials, max_quality_drop=0.05, metric="output_identity")
    assert not v.dense and v.trial.id == 2 and not v.approximate
    assert "trial 2" in v.reason and "1.25 [1.12, 1.38]" in v.reason and "output_identity drop 0.020" in v.reason
    # A looser drop lets trial 3 in.
    assert recommend(trials, max_quality_drop=0.1).trial.id == 3
    assert recommend(trials, max_quality_drop=None).trial.id == 3
    # Another objective among the qualifying trials.
    trials[0].skip_ratio = 0.4
    assert recommend(trials, max_quality_drop=0.05, objective="skip_ratio").trial.id == 1
    with pytest.raises(ValueError, match="objective"):
        recommend(trials, max_quality_drop=0.05, objective="quality")


def test_rule_gates_on_the_drops_upper_end_not_its_point_value():
    # Point drop 0.01 is well within 0.05, but the interval reaches 0.08: not recommended.
    v = recommend([T(1, 0.01, 1.5, (0.00, 0.08), (1.3, 1.7))], max_quality_drop=0.05)
    assert v.dense and v.candidate.trial.id == 1
    assert "no policy keeps the upper end of the quality drop's 95% interval within 0.05" in v.reason
    assert "trial 1" in v.reason and "0.010 [0.000, 0.080]" in v.reason


def test_rule_says_dense_when_no_speedup_interval_is_above_one():
    trials = [T(1, 0.0, 0.99, (0.0, 0.0), (0.93, 1.04)), T(2, 0.0, 1.08, (0.0, 0.03), (0.97, 1.2)),
              T(3, 0.3, 1.5, (0.2, 0.4), (1.3, 1.7))]
    v = recommend(trials, max_quality_drop=0.05, metric="output_identity")
    assert v.dense and v.trial is None and v.candidate.trial.id == 2
    assert v.reason.startswith("no policy faster than dense within a 0.05 output_identity drop: the fastest candidate, trial 2")
    assert "1.08 [0.97, 1.20]" in v.reason and "lower end is not above 1" in v.reason
    assert recommend([], max_quality_drop=0.05).dense
    assert "no completed trial" in recommend([T(1, 0, 2.0, status="pruned")], max_quality_drop=0.05).reason


def test_rule_judges_rows_without_intervals_on_point_values_and_flags_them():
    old = [T(1, 0.02, 1.2), T(2, 0.0, 0.98)]  # stored before intervals existed
    v = recommend(old, max_quality_drop=0.05)
    assert v.trial.id == 1 and v.approximate and "judged on point values" in v.reason
    v = recommend([T(2, 0.0, 0.98), T(3, 0.0, None)], max_quality_drop=0.05)
    assert v.dense and "not above 1" in v.reason
    # A trial with intervals beats an old row only on its own numbers: both qualify, the faster wins.
    v = recommend([T(1, 0.02, 1.2), T(4, 0.0, 1.3, (0.0, 0.0), (1.1, 1.5))], max_quality_drop=0.05)
    assert v.trial.id == 4 and not v.approximate
    # Ties: the smaller drop bound, then the older trial.
    v = recommend([T(7, 0.0, 1.2, (0.0, 0.02), (1.1, 1.3)), T(6, 0.0, 1.2, (0.0, 0.02), (1.1, 1.3)),
                   T(5, 0.0, 1.2, (0.0, 0.04), (1.1, 1.3))], max_quality_drop=0.05)
    assert v.trial.id == 6


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
