"""The shipped demo study, shrunk: 4 trials on 8 FreebaseQA questions with SmolLM2-135M-Instruct,
run as a user runs it (``python -m tuning --config tuning/configs/smollm2-factoid.yaml``, an
embedded Ray in its own process). It must end with the recommendation's verdict, and
``ffnskip results best --explain --json`` must give every field a user deploys from (the values
may well say dense: 8 questions and a 135M model)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ffnskip import SkipPolicy
from ffnskip.cli import main as ffnskip_main
from tuning.store import Store

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "tuning" / "configs" / "smollm2-factoid.yaml"
FIELDS = {"policy", "reason", "quality_metric", "quality_drop", "quality_drop_ci95", "speedup", "speedup_ci95", "n"}


def test_demo_study_on_8_questions_ends_with_a_verdict(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'demo.db'}"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", "FFNSKIP_DENSE_CACHE": "off",
           "TOKENIZERS_PARALLELISM": "false", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "tuning", "--config", str(CONFIG), "--trials", "4", "--limit", "8", "--study", "smoke",
         "--db", url], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200,
    )
    out = proc.stdout
    assert proc.returncode == 0, (out[-3000:], proc.stderr[-3000:])
    lines = out.strip().splitlines()
    # The last lines: the policy file, the verdict, its reason.
    assert lines[-3].startswith("recommended policy (--policy file): {")
    assert lines[-2].startswith("verdict (quality drop <= 0.1 at the 95% upper end, speed-up > 1 at the 95% lower end): ")
    assert "dense (no skipping) is recommended" in lines[-1] or "faster than dense" in lines[-1]
    assert "trials/hour" in out and "successive halving over 4 -> 8 samples" in out

    with Store(url) as store:
        study = store.require_study("smoke")
        trials = store.trials(study.id)
        baseline = store.get_baseline(study.id)
    assert baseline.n == 8 and len(trials) == 4
    assert {t.status for t in trials} <= {"completed", "pruned"} and any(t.status == "completed" for t in trials)
    for t in trials:
        assert t.quality_drop is not None
        if t.status == "completed":  # the last rung: all 8 questions and the speed runs
            assert t.n == 8 and t.speedup is not None and t.metrics["rungs"][-1]["samples"] == 8
        else:  # stopped after the first rung: quality on 4 questions, no speed runs
            assert t.n == 4 and t.speedup is None and t.stop_reason.startswith("stopped early")
    # The first trials Optuna asked for are the config's start point and the paper's settings (warm
    # start); two run at once, so their rows may be stored in either order.
    by_number = sorted(trials, key=lambda t: t.optuna_number)
    assert [t.policy["threshold"] for t in by_number[:2]] == [0.985, 0.95]

    capsys.readouterr()
    assert ffnskip_main(["results", "best", "--study", "smoke", "--db", url, "--explain", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert FIELDS <= set(d), FIELDS - set(d)
    assert d["quality_metric"] == "output_identity" and d["n"] == 8 and d["reason"]
    assert d["verdict"] in ("dense", "policy") and d["candidate"] is not None
    policy = SkipPolicy.from_dict(d["policy"])
    if d["verdict"] == "dense":
        assert policy.mode == "dense" and d["speedup"] == 1.0 and d["quality_drop"] == 0.0
    else:
        assert d["speedup_ci95"][0] > 1 and d["quality_drop_ci95"][1] <= 0.1
    if trials[0].metrics.get("vs_dense"):  # the evaluator reports intervals: they are stored
        c = d["candidate"]
        assert c["quality_drop_ci95"] is not None and c["speedup_ci95"] is not None
    # What `results best --json` prints is the same policy, as a file `generate --policy` reads.
    assert ffnskip_main(["results", "best", "--study", "smoke", "--db", url, "--json"]) == 0
    assert SkipPolicy.from_json(capsys.readouterr().out).to_dict() == policy.to_dict()
