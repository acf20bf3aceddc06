import json

import pytest

from ffnskip import PolicyError, SkipPolicy


def test_defaults_follow_method_md():
    p = SkipPolicy()
    assert (p.mode, p.threshold, p.warmup_tokens, p.dense_every) == ("adaptive", 0.95, 32, 6)
    r = p.resolve(30)
    assert (r.start, r.end, r.budget) == (5, 25, 9)  # 5 cold layers each end, ~30% budget


def test_defaults_clamped_for_shallow_models():
    r = SkipPolicy().resolve(8)
    assert 0 < r.start < r.end < 8 and r.end - r.start >= r.budget >= 1
    r = SkipPolicy().resolve(2)
    assert (r.start, r.end) == (0, 2)


def test_negative_indices_count_from_end():
    r = SkipPolicy(layer_start=-20, layer_end=-5, skip_budget=3).resolve(30)
    assert (r.start, r.end, r.budget) == (10, 25, 3)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"mode": "fast"}, "mode"),
        ({"threshold": "high"}, "threshold"),
        ({"threshold": float("nan")}, "threshold"),
        ({"threshold": 7}, "threshold"),
        ({"warmup_tokens": -1}, "warmup_tokens"),
        ({"dense_every": -2}, "dense_every"),
        ({"skip_budget": -1}, "skip_budget"),
        ({"layer_start": 1.5}, "layer_start"),
        ({"layer_start": 10, "layer_end": 4}, "layer_end"),
        ({"layers": [3, 3], "mode": "shortgpt"}, "layers"),
        ({"layers": [], "mode": "shortgpt"}, "layers"),
        ({"layers": [3], "mode": "static"}, "layers"),
        ({"lagged": "yes"}, "lagged"),
        ({"lagged": True, "mode": "random"}, "lagged"),
    ],
)
def test_validation_names_the_field(kwargs, field):
    with pytest.raises(PolicyError) as err:
        SkipPolicy(**kwargs)
    assert err.value.field == field and f"'{field}'" in str(err.value)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"layer_start": 40}, "layer_start"),
        ({"layer_end": 31}, "layer_end"),
        ({"layer_start": 5, "layer_end": 8, "skip_budget": 4}, "skip_budget"),
        ({"mode": "shortgpt", "layers": [30]}, "layers"),
        ({"mode": "shortgpt"}, "layers"),  # unmeasured: runs only once measured
    ],
)
def test_resolve_errors_name_the_field(kwargs, field):
    with pytest.raises(PolicyError) as err:
        SkipPolicy(**kwargs).resolve(30)
    assert err.value.field == field


def test_json_round_trip(tmp_path):
    p = SkipPolicy(mode="random", threshold=0.9, layer_start=4, layer_end=-4, warmup_tokens=8, skip_budget=5, dense_every=0, seed=3)
    assert SkipPolicy.from_dict(json.loads(p.to_json())) == p
    path = tmp_path / "p.json"
    p.save(path)
    assert SkipPolicy.load(path) == p


def test_unknown_field_and_malformed_json():
    with pytest.raises(PolicyError, match="'tau'"):
        SkipPolicy.from_dict({"tau": 0.9})
    with pytest.raises(PolicyError, match="malformed JSON"):
        SkipPolicy.from_json("{mode: adaptive")
    with pytest.raises(PolicyError, match="JSON object"):
        SkipPolicy.from_json("[1, 2]")


def test_token_budget_schedule():
    r = SkipPolicy(warmup_tokens=4, skip_budget=3, dense_every=3, layer_start=2, layer_end=8).resolve(10)
    budgets = [r.token_budget(t) for t in range(12)]
    # t < 4 warm-up; then (t - 4) % 3 == 2 is dense: t = 6, 9
    assert budgets == [0, 0, 0, 0, 3, 3, 0, 3, 3, 0, 3, 3]
    assert SkipPolicy(warmup_tokens=0, skip_budget=2, dense_every=0).resolve(10).token_budget(0) == 0  # prefill
    assert SkipPolicy(mode="dense").resolve(10).token_budget(50) == 0


def test_one_parser_for_every_input(tmp_path):
    from ffnskip.policy import parse_policy

    pol = SkipPolicy(threshold=0.9, warmup_tokens=3)
    f = tmp_path / "p.json"
    pol.save(f)
    assert parse_policy(pol) is pol
    assert parse_policy(pol.to_dict()) == parse_policy(pol.to_json()) == parse_policy(path=f) == pol
    assert parse_policy() == SkipPolicy()
    short = parse_policy({"mode": "shortgpt", "skip_budget": 2})
    assert short.unmeasured and short.skip_budget == 2
    assert SkipPolicy.shortgpt(skip_budget=2).skip_budget == 2 and not SkipPolicy.shortgpt(layers=[3]).unmeasured
    for bad, field in (("{nope", "<policy>"), ({"mode": "sideways"}, "mode"), (3, "<policy>")):
        with pytest.raises(PolicyError) as err:
            parse_policy(bad)
        assert err.value.field == field
    with pytest.raises(PolicyError, match="cannot read"):
        parse_policy(path=tmp_path / "missing.json")


def test_every_project_error_has_one_root():
    from ffnskip import FFNSkipError, GenerationError, UnsupportedArchitecture
    from ffnskip.eval import EvalError
    from ffnskip.loading import ModelError

    for cls in (PolicyError, GenerationError, UnsupportedArchitecture, EvalError, ModelError):
        assert issubclass(cls, FFNSkipError)
    assert issubclass(PolicyError, ValueError)  # and keeps its built-in base
