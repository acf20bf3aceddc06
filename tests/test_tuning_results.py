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

# (quality, skip_ratio, tokens_per_s); dense quality 0.60, max_quality_drop 0.05.
POINTS = {
    1: (0.59, 0.00, 10.0),   # nearly dense
    2: (0.58, 0.10, 10.5),   # feasible
    3: (0.56, 0.20, 11.0),   # feasible, best skip within 0.05
    4: (0.50, 0.35, 12.0),   # infeasible (drop 0.10), on the front
    5: (0.55, 0.10, 10.2),   # dominated by 2
    6: (0.57, 0.15, 12.5),   # feasible, fastest
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
        for i, (q, s, t) in POINTS.items():
            store.add_trial(st.id, "completed", policy(i), values={"quality": q, "quality_drop": 0.60 - q,
                                                                    "skip_ratio": s, "tokens_per_s": t})
        store.add_trial(st.id, "failed", policy(7), error="RuntimeError: boom\nTraceback ...")
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

    rc, out, _ = results(capsys, "best", "--study", "demo", "--db", db, "--json")
    assert rc == 0 and SkipPolicy.from_json(out).to_dict() == policy(3)
    rc, out, _ = results(capsys, "best", "--study", "demo", "--db", db, "--json", "--objective", "tokens_per_s")
    assert SkipPolicy.from_json(out).to_dict() == policy(6)
    rc, out, _ = results(capsys, "best", "--study", "demo", "--db", db, "--json", "--max-quality-drop", "0.2")
    assert SkipPolicy.from_json(out).to_dict() == policy(4)
    rc, out, err = results(capsys, "best", "--study", "demo", "--db", db, "--out", str(tmp_path / "p.json"))
    assert rc == 0 and "trial 3" in err and SkipPolicy.load(tmp_path / "p.json").to_dict() == policy(3)
    assert best_policy(db, "demo").to_dict() == policy(3)

    # No trial within the limit: the dense baseline is the only measured policy that is.
    rc, out, err = results(capsys, "best", "--study", "demo", "--db", db, "--max-quality-drop", "0.001")
    assert rc == 0 and SkipPolicy.from_json(out).mode == "dense"
    assert "no completed trial keeps the quality drop within 0.001" in err and "dense policy" in err


def test_listing_export_and_plot(db, capsys, tmp_path):
    rc, out, _ = results(capsys, "studies", "--db", db, "--json")
    assert rc == 0 and json.loads(out) == [{
        "id": 1, "name": "demo", "model": "smollm2-135m", "task": "factoid_qa", "completed": 6, "failed": 1,
        "running": 0, "dense_quality": 0.6, "created_at": json.loads(out)[0]["created_at"]}]
    rc, out, _ = results(capsys, "studies", "--db", db)
    assert "demo" in out

    rc, out, _ = results(capsys, "trials", "--study", "demo", "--db", db, "--sort", "tokens_per_s", "--json")
    rows = json.loads(out)
    assert [r["id"] for r in rows][:3] == [6, 4, 3] and rows[-1]["status"] == "failed"
    assert rows[-1]["error"] == "RuntimeError: boom"
    rc, out, _ = results(capsys, "trials", "--study", "demo", "--db", db, "--sort", "quality_drop")
    assert rc == 0 and "trial 7 failed: RuntimeError: boom" in out
    rc, _, err = results(capsys, "trials", "--study", "demo", "--db", db, "--sort", "bogus")
    assert rc == 2 and "unknown column 'bogus'" in err

    rc, out, _ = results(capsys, "export", "--study", "demo", "--db", db, "--format", "csv")
    table = list(csv.DictReader(io.StringIO(out)))
    assert len(table) == 7 and table[2]["skip_ratio"] == "0.2" and table[2]["feasible"] == "True"
    rc, out, _ = results(capsys, "export", "--study", "demo", "--db", db, "--json")
    doc = json.loads(out)
    assert doc["study"]["name"] == "demo" and doc["baseline"]["quality"] == 0.6 and len(doc["trials"]) == 7

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
