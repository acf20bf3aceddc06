"""``ffnskip results`` and ``python -m tuning`` argument handling on a hand-made store (no Ray)."""

from __future__ import annotations

import csv
import io
import json

import pytest

from ffnskip import SkipPolicy
from ffnskip.cli import main as ffnskip_main
from tuning.cli import main as tuning_main
from tuning.results import best_policy
from tuning.store import Store

# (quality, skip_ratio, tokens_per_s, speedup, speedup 95% CI, drop 95% CI); dense quality 0.60,
# max_quality_drop 0.05.
POINTS = {
    1: (0.59, 0.00, 10.0, 1.00, (0.97, 1.03), (0.00, 0.03)),   # nearly dense, not faster
    2: (0.58, 0.10, 10.5, 1.05, (1.01, 1.09), (0.00, 0.04)),   # qualifies
    3: (0.56, 0.20, 11.0, 1.10, (1.04, 1.16), (0.01, 0.07)),   # point drop 0.04, upper end 0.07: out
    4: (0.50, 0.35, 12.0, 1.20, (1.12, 1.28), (0.05, 0.15)),   # infeasible (drop 0.10), on the front
    5: (0.55, 0.10, 10.2, 1.02, (0.98, 1.06), (0.02, 0.08)),   # dominated by 2
    6: (0.57, 0.15, 12.5, 1.08, (1.03, 1.13), (0.00, 0.05)),   # qualifies, the fastest that does
}


def policy(i: int) -> dict:
    return SkipPolicy(threshold=0.9 + i / 100, warmup_tokens=2, layer_start=4, layer_end=24, skip_budget=i,
                      dense_every=6).to_dict()


@pytest.fixture
def db(tmp_path):
    url = f"sqlite:///{tmp_path / 'r.db'}"
    with Store(url) as store:
        st = store.create_study("demo", model="smollm2-135m", task="factoid_qa",
                                search_space={"num_layers": 30, "bounds": {}},
                                config={"objectives": ["quality", "skip_ratio", "tokens_per_s"], "max_quality_drop": 0.05})
        store.save_baseline(st.id, metrics={"quality": {"metric": "accuracy", "higher_is_better": True}},
                            quality=0.60, tokens_per_s=10.0, n=30)
        for i, (q, s, t, sp, sp_ci, d_ci) in POINTS.items():
            store.add_trial(st.id, "completed", policy(i), values={
                "quality": q, "quality_drop": 0.60 - q, "skip_ratio": s, "tokens_per_s": t, "speedup": sp,
                "speedup_low": sp_ci[0], "speedup_high": sp_ci[1], "quality_drop_low": d_ci[0],
                "quality_drop_high": d_ci[1], "n": 30})
        store.add_trial(st.id, "failed", policy(7), error="RuntimeError: boom\nTraceback ...")
        store.add_trial(st.id, "pruned", policy(8), values={"quality": 0.60, "quality_drop": 0.0, "speedup": 2.0,
                                                            "speedup_low": 1.9, "speedup_high": 2.1, "n": 4},
                        stop_reason="stopped early by successive halving after rung 1 of 4 (4 samples)")
    return url


def results(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = ffnskip_main(["results", *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_pareto_and_best_through_the_cli(db, capsys, tmp_path):
    rc, out, _ = results(capsys, "pareto", "--study", "demo", "--db", db, "--json")
    assert rc == 0
    assert sorted(t["id"] for t in json.loads(out)["trials"]) == [1, 2, 3, 4, 6]

    # The fastest trial faster than dense (speed-up CI above 1) within the drop (its CI's upper end).
    rc, out, err = results(capsys, "best", "--study", "demo", "--db", db, "--json")
    assert rc == 0 and SkipPolicy.from_json(out).to_dict() == policy(6)
    assert "trial 6" in err and "1.08 [1.03, 1.13]" in err
    rc, out, _ = results(capsys, "best", "--study", "demo", "--db", db, "--json", "--objective", "skip_ratio")
    assert SkipPolicy.from_json(out).to_dict() == policy(6)  # 2 and 6 qualify: 6 skips more too
    rc, out, _ = results(capsys, "best", "--study", "demo", "--db", db, "--json", "--max-quality-drop", "0.2")
    assert SkipPolicy.from_json(out).to_dict() == policy(4)  # the pruned trial 8 is faster, but never chosen
    rc, out, err = results(capsys, "best", "--study", "demo", "--db", db, "--out", str(tmp_path / "p.json"))
    assert rc == 0 and "trial 6" in err and SkipPolicy.load(tmp_path / "p.json").to_dict() == policy(6)
    assert best_policy(db, "demo").to_dict() == policy(6)

    # No trial within the limit: the dense policy, and the reason.
    rc, out, err = results(capsys, "best", "--study", "demo", "--db", db, "--max-quality-drop", "0.001")
    assert rc == 0 and SkipPolicy.from_json(out).mode == "dense"
    assert "no policy keeps the upper end of the quality drop's 95% interval within 0.001" in err and "dense" in err


EXPLAIN_FIELDS = {"policy", "reason", "quality_metric", "quality_drop", "quality_drop_ci95", "speedup", "speedup_ci95", "n"}


def test_best_explain(db, capsys, tmp_path):
    rc, out, _ = results(capsys, "best", "--study", "demo", "--db", db, "--explain", "--json")
    d = json.loads(out)
    assert rc == 0 and EXPLAIN_FIELDS <= set(d)
    assert d["verdict"] == "policy" and d["trial_id"] == 6 and d["policy"] == policy(6)
    assert (d["quality_metric"], d["quality_drop"], d["quality_drop_ci95"]) == ("accuracy", pytest.approx(0.03), [0.0, 0.05])
    assert (d["speedup"], d["speedup_ci95"], d["n"]) == (1.08, [1.03, 1.13], 30)
    assert d["intervals"] is True and d["trials"] == {"completed": 6, "pruned": 1, "failed": 1, "running": 0}

    # Dense: its own numbers (drop 0, speed-up 1) and the closest trial as the candidate.
    rc, out, _ = results(capsys, "best", "--study", "demo", "--db", db, "--explain", "--json", "--max-quality-drop", "0.001")
    d = json.loads(out)
    assert EXPLAIN_FIELDS <= set(d) and d["verdict"] == "dense" and d["trial_id"] is None
    assert SkipPolicy.from_dict(d["policy"]).mode == "dense"
    assert (d["quality_drop"], d["quality_drop_ci95"], d["speedup"], d["speedup_ci95"], d["n"]) == (0.0, [0.0, 0.0], 1.0, [1.0, 1.0], 30)
    assert d["reason"].startswith("no policy keeps") and d["candidate"]["trial_id"] in (1, 2, 6)

    rc, out, _ = results(capsys, "best", "--study", "demo", "--db", db, "--explain")
    assert rc == 0 and out.startswith("verdict: trial 6") and "reason: trial 6 is the fastest policy" in out
    assert '"mode": "adaptive"' in out.splitlines()[-1]
    rc, out, _ = results(capsys, "best", "--study", "demo", "--db", db, "--explain", "--max-quality-drop", "0")
    assert out.startswith("verdict: dense") and "closest trial:" in out


def test_listing_export_and_plot(db, capsys, tmp_path):
    rc, out, _ = results(capsys, "studies", "--db", db, "--json")
    assert rc == 0 and json.loads(out) == [{
        "id": 1, "name": "demo", "model": "smollm2-135m", "task": "factoid_qa", "completed": 6, "pruned": 1,
        "failed": 1, "running": 0, "dense_quality": 0.6, "created_at": json.loads(out)[0]["created_at"]}]
    rc, out, _ = results(capsys, "studies", "--db", db)
    assert "demo" in out

    rc, out, _ = results(capsys, "trials", "--study", "demo", "--db", db, "--sort", "tokens_per_s", "--json")
    rows = json.loads(out)
    assert [r["id"] for r in rows][:3] == [6, 4, 3] and rows[-1]["status"] in ("failed", "pruned")
    assert {r["id"]: r["error"] for r in rows}[7] == "RuntimeError: boom"
    rc, out, _ = results(capsys, "trials", "--study", "demo", "--db", db, "--sort", "quality_drop")
    assert rc == 0 and "trial 7 failed: RuntimeError: boom" in out and "trial 8 stopped early: stopped early by" in out
    rc, out, _ = results(capsys, "trials", "--study", "demo", "--db", db, "--status", "pruned", "--json")
    assert [(r["id"], r["n"], r["feasible"]) for r in json.loads(out)] == [(8, 4, None)]
    rc, _, err = results(capsys, "trials", "--study", "demo", "--db", db, "--sort", "bogus")
    assert rc == 2 and "unknown column 'bogus'" in err

    rc, out, _ = results(capsys, "export", "--study", "demo", "--db", db, "--format", "csv")
    table = list(csv.DictReader(io.StringIO(out)))
    assert len(table) == 8 and table[2]["skip_ratio"] == "0.2" and table[2]["feasible"] == "False"
    assert table[5]["feasible"] == "True" and table[5]["faster"] == "True" and table[5]["speedup_low"] == "1.03"
    rc, out, _ = results(capsys, "export", "--study", "demo", "--db", db, "--json")
    doc = json.loads(out)
    assert doc["study"]["name"] == "demo" and doc["baseline"]["quality"] == 0.6 and len(doc["trials"]) == 8

    png = tmp_path / "plot.png"
    rc, out, _ = results(capsys, "plot", "--study", "demo", "--db", db, "--out", str(png), "--json")
    info = json.loads(out)
    assert rc == 0 and png.read_bytes()[:4] == b"\x89PNG"
    assert sorted(info["pareto"]) == [1, 2, 3, 4, 6] and info["trials"] == 6


def test_missing_database_and_study(capsys, tmp_path, db):
    rc, _, err = results(capsys, "studies", "--db", f"sqlite:///{tmp_path / 'nope.db'}")
    assert rc == 2 and "no results database" in err and not (tmp_path / "nope.db").exists()
    rc, _, err = results(capsys, "pareto", "--study", "other", "--db", db)
    assert rc == 2 and "no study 'other'" in err and "studies: demo" in err


def test_tune_reports_config_errors_in_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trials: 3\nsearch_space: {layer_end: [30, 20]}\n")
    assert tuning_main(["--config", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "config key 'search_space.layer_end'" in err and str(bad) in err
    assert ffnskip_main(["tune", "--config", str(bad)]) == 2
    assert "config key 'search_space.layer_end'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tuning_main(["--config", str(bad), "--trials", "0"])
    assert "--trials must be positive" in capsys.readouterr().err
