"""Serving a study (``ffnskip serve --study``, ``PUT /v1/policy {"study"}``) follows the same rule as
``ffnskip results best``: the fastest trial that is faster than dense within the quality drop (both
at 95%), else dense, with the reason logged and kept in the policy's source. No Ray, no model."""

from __future__ import annotations

import logging

import pytest

from ffnskip import SkipPolicy
from serve import policies
from serve.cli import register
from tuning.results import best_policy
from tuning.store import Store


def _store(tmp_path, trials) -> str:
    url = f"sqlite:///{tmp_path / 's.db'}"
    with Store(url) as store:
        st = store.create_study("st", model="m", task="factoid_qa", search_space={}, config={"max_quality_drop": 0.05})
        store.save_baseline(st.id, metrics={"quality": {"metric": "output_identity", "higher_is_better": True}},
                            quality=1.0, tokens_per_s=10.0, n=30)
        for policy, values, status in trials:
            store.add_trial(st.id, status, policy, values=values)
    return url


FAST = {"threshold": 0.9, "skip_budget": 4}
FASTER_BUT_NOISY = {"threshold": 0.8, "skip_budget": 8}


def test_study_source_serves_the_recommended_trial(tmp_path):
    url = _store(tmp_path, [
        (FAST, {"quality_drop": 0.0, "quality_drop_low": 0.0, "quality_drop_high": 0.03, "speedup": 1.2,
                "speedup_low": 1.1, "speedup_high": 1.3, "n": 30, "skip_ratio": 0.1}, "completed"),
        (FASTER_BUT_NOISY, {"quality_drop": 0.0, "quality_drop_low": 0.0, "quality_drop_high": 0.03, "speedup": 1.4,
                            "speedup_low": 0.9, "speedup_high": 1.9, "n": 30, "skip_ratio": 0.3}, "completed"),
        ({"threshold": 0.5}, {"quality_drop": 0.0, "speedup": 3.0, "speedup_low": 2.9, "n": 4}, "pruned"),
    ])
    e = policies.from_study(url, "st")
    assert e.policy == SkipPolicy.from_dict(FAST) and e.policy_id == "study:st/trial:1"
    assert e.source["verdict"] == "policy" and e.source["speedup_ci95"] == [1.1, 1.3]
    assert e.source["quality_drop_ci95"] == [0.0, 0.03] and e.source["n"] == 30 and "trial 1" in e.source["reason"]
    assert best_policy(url, "st") == e.policy  # the same rule as `ffnskip results best`
    # Another objective among the qualifying trials (the one ServeArgs may pass).
    assert policies.from_study(url, "st", objective="skip_ratio").policy_id == "study:st/trial:1"
    with pytest.raises(policies.PolicySourceError) as err:
        policies.from_study(url, "st", objective="quality")
    assert err.value.param == "objective"
    with pytest.raises(policies.PolicySourceError) as err:
        policies.from_study(url, "nope")
    assert err.value.status == 404 and err.value.code == "study_not_found"


def test_study_source_serves_dense_with_the_reason(tmp_path, caplog):
    url = _store(tmp_path, [
        (FAST, {"quality_drop": 0.0, "quality_drop_low": 0.0, "quality_drop_high": 0.0, "speedup": 0.99,
                "speedup_low": 0.93, "speedup_high": 1.04, "n": 30}, "completed"),
        (FASTER_BUT_NOISY, {"quality_drop": 0.1, "quality_drop_low": 0.03, "quality_drop_high": 0.2, "speedup": 1.3,
                            "speedup_low": 1.2, "speedup_high": 1.4, "n": 30}, "completed"),
    ])
    with caplog.at_level(logging.WARNING, logger="serve.policies"):
        e = policies.from_study(url, "st")
    assert e.policy.mode == "dense" and e.policy_id == "study:st/dense"
    assert e.source["verdict"] == "dense" and e.source["trial_id"] is None
    assert e.source["reason"].startswith("no policy faster than dense within a 0.05 output_identity drop")
    assert "serving the dense policy" in caplog.text and "trial 1" in caplog.text
    # A looser drop admits trial 2.
    assert policies.from_study(url, "st", max_quality_drop=0.25).policy_id == "study:st/trial:2"


def test_serve_cli_defaults_to_the_speedup_rule():
    import argparse

    p = argparse.ArgumentParser()
    register(p.add_subparsers())
    args = p.parse_args(["serve", "--study", "st"])
    assert args.objective == "speedup"
    with pytest.raises(SystemExit):
        p.parse_args(["serve", "--study", "st", "--objective", "quality"])
