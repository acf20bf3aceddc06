"""The results store on SQLite and on a real PostgreSQL (tests/conftest.py starts one)."""

from __future__ import annotations

import multiprocessing

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from tuning.store import Store, StoreError, StudyExists, StudyNotFound, optuna_storage
from tuning.store.store import VERSION_TABLE

OUR_TABLES = {"ffnskip_studies", "ffnskip_trials", "ffnskip_samples", "ffnskip_baselines", VERSION_TABLE}


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    return request.getfixturevalue("postgresql_url")


def _study(store: Store, name: str = "s1"):
    return store.create_study(
        name, model="tiny", task="factoid_qa", search_space={"num_layers": 4, "bounds": {"threshold": [0.8, 0.99]}},
        config={"objectives": ["quality", "skip_ratio"], "max_quality_drop": 0.05}, model_hash="abc",
        data_fingerprint="fp", hardware={"cpu_count": 2}, library_versions={"torch": "x"}, git_commit="deadbeef",
    )


SAMPLES = [
    {"index": 0, "prompt": "q0", "reference": ["a"], "dense_output": "a", "output": "a", "scores": {"accuracy": 1.0},
     "generated_tokens": 3, "skipped_ffn": 2, "skip_ratio": 0.16},
    {"index": 1, "prompt": "q1", "reference": ["b"], "dense_output": "b", "output": "c", "scores": {"accuracy": 0.0},
     "generated_tokens": 4, "skipped_ffn": 0, "skip_ratio": 0.0},
]


HEAD = "0002"


def test_migrations_create_our_tables_next_to_optunas(db_url):
    with Store(db_url) as store:
        assert store.revision() == HEAD
        tables = set(sa.inspect(store.engine).get_table_names())
    assert OUR_TABLES <= tables
    # Optuna's storage on the same database keeps its own tables and version table.
    optuna_storage(db_url)
    with Store(db_url) as store:  # re-opening migrates nothing and keeps working
        assert store.revision() == HEAD
        tables = set(sa.inspect(store.engine).get_table_names())
        with store.engine.connect() as conn:
            assert conn.execute(sa.text(f"SELECT version_num FROM {VERSION_TABLE}")).scalar() == HEAD
    assert {"studies", "trials", "alembic_version"} <= tables


def test_migrations_downgrade_and_upgrade_again(db_url):
    with Store(db_url) as store:
        _study(store)
        store.downgrade("base")
        assert not (OUR_TABLES - {VERSION_TABLE}) & set(sa.inspect(store.engine).get_table_names())
        store.migrate()
        assert store.revision() == HEAD
        assert store.list_studies() == []


NEW_COLUMNS = {"quality_drop_low", "quality_drop_high", "speedup_low", "speedup_high", "n", "stop_reason"}


def test_migration_0002_upgrades_a_database_with_old_rows(db_url):
    """A store written by the previous release (revision 0001) keeps every row, samples included;
    the interval columns are NULL on the old trials, and the rule judges those on point values."""
    from tuning.objectives import recommend

    store = Store(db_url)
    store.downgrade("0001")
    assert store.revision() == "0001"
    assert not NEW_COLUMNS & {c["name"] for c in sa.inspect(store.engine).get_columns("ffnskip_trials")}
    with store.engine.begin() as conn:  # rows as the previous release wrote them
        conn.execute(sa.text("INSERT INTO ffnskip_studies (name, model, task, search_space, config, created_at) "
                             "VALUES ('old', 'm', 't', '{}', '{\"max_quality_drop\": 0.05}', '2026-01-01 00:00:00')"))
        sid = conn.execute(sa.text("SELECT id FROM ffnskip_studies WHERE name = 'old'")).scalar()
        for i, (drop, speedup) in enumerate([(0.02, 1.2), (0.0, 0.97), (0.2, 1.5)]):
            conn.execute(sa.text("INSERT INTO ffnskip_trials (study_id, status, policy, quality_drop, speedup, skip_ratio) "
                                 "VALUES (:s, 'completed', '{}', :d, :sp, 0.1)"), {"s": sid, "d": drop, "sp": speedup})
        tid = conn.execute(sa.text("SELECT min(id) FROM ffnskip_trials")).scalar()
        conn.execute(sa.text("INSERT INTO ffnskip_samples (trial_id, idx, output) VALUES (:t, 0, 'a'), (:t, 1, 'b')"),
                     {"t": tid})
        with pytest.raises(IntegrityError):  # 0001 knows no 'pruned'
            with conn.begin_nested():
                conn.execute(sa.text("INSERT INTO ffnskip_trials (study_id, status, policy) VALUES (:s, 'pruned', '{}')"),
                             {"s": sid})
    store.close()

    with Store(db_url) as store:  # opening migrates
        assert store.revision() == HEAD
        assert NEW_COLUMNS <= {c["name"] for c in sa.inspect(store.engine).get_columns("ffnskip_trials")}
        trials = store.trials(sid)
        assert len(trials) == 3 and all(t.quality_drop_high is None and t.speedup_low is None and t.n is None
                                        and t.stop_reason is None for t in trials)
        assert [s.output for s in store.samples(tid)] == ["a", "b"]  # the table copy did not cascade
        assert {i["name"] for i in sa.inspect(store.engine).get_indexes("ffnskip_trials")} >= {
            "ix_ffnskip_trials_study_id", "ix_ffnskip_trials_ray_trial_id"}
        if store.dialect == "sqlite":
            with store.engine.connect() as conn:
                assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        v = recommend(trials, max_quality_drop=0.05)
        assert v.trial.id == tid and v.approximate
        pruned = store.add_trial(sid, "pruned", {}, values={"quality_drop": 0.5, "n": 4}, stop_reason="stopped early")
        assert store.get_trial(pruned).status == "pruned" and store.get_trial(pruned).n == 4
        with pytest.raises(IntegrityError):
            with store.engine.begin() as conn:
                conn.execute(sa.text("INSERT INTO ffnskip_trials (study_id, status, policy) VALUES (:s, 'done', '{}')"),
                             {"s": sid})
        # And back: a pruned trial becomes failed with its reason, the columns go.
        store.downgrade("0001")
        with store.engine.connect() as conn:
            row = conn.execute(sa.text("SELECT status, error FROM ffnskip_trials WHERE id = :t"), {"t": pruned}).one()
        assert tuple(row) == ("failed", "stopped early")
        store.migrate()
        assert store.revision() == HEAD


def test_study_crud_and_cascade(db_url):
    with Store(db_url) as store:
        st = _study(store)
        assert st.id > 0 and st.name == "s1" and st.search_space["num_layers"] == 4
        with pytest.raises(StudyExists, match="already exists"):
            _study(store)
        got = store.get_study("s1")
        assert got.config == {"objectives": ["quality", "skip_ratio"], "max_quality_drop": 0.05}
        assert got.model_hash == "abc" and got.git_commit == "deadbeef"
        assert store.get_study("nope") is None
        with pytest.raises(StudyNotFound, match="studies: s1"):
            store.require_study("nope")

        b = store.save_baseline(st.id, metrics={"dense": {"accuracy": 0.5}}, quality=0.5, tokens_per_s=10.0,
                                outputs={"k": {"text": "a"}}, n=2, node="n1", duration_s=1.5)
        assert store.get_baseline(st.id).quality == 0.5 and b.outputs == {"k": {"text": "a"}}
        with pytest.raises(IntegrityError):  # one baseline per study
            store.save_baseline(st.id, metrics={}, quality=0.1, tokens_per_s=1.0)

        tid = store.add_trial(st.id, "completed", {"threshold": 0.9}, values={"quality": 0.5}, samples=SAMPLES)
        _study(store, "s2")
        summaries = {s.study.name: s for s in store.list_studies()}
        assert summaries["s1"].counts == {"completed": 1} and summaries["s2"].total == 0

        assert store.delete_study("s1") is True
        assert store.delete_study("s1") is False
        assert store.get_baseline(st.id) is None
        with store.engine.connect() as conn:
            assert conn.execute(sa.text("SELECT count(*) FROM ffnskip_trials")).scalar() == 0
            assert conn.execute(sa.text("SELECT count(*) FROM ffnskip_samples WHERE trial_id = :t"), {"t": tid}).scalar() == 0


def test_trial_lifecycle(db_url):
    with Store(db_url) as store:
        st = _study(store)
        t1 = store.start_trial(st.id, {"threshold": 0.9}, ray_trial_id="r1", optuna_number=0)
        t2 = store.start_trial(st.id, {"threshold": 0.8}, ray_trial_id="r2", optuna_number=1)
        t3 = store.start_trial(st.id, {"threshold": 0.7})
        assert store.count_trials(st.id) == {"running": 3, "completed": 0, "failed": 0, "pruned": 0}

        values = {"quality": 0.5, "quality_drop": 0.0, "skip_ratio": 0.12, "skip_ratio_post_warmup": 0.2,
                  "tokens_per_s": 9.5, "speedup": 1.1}
        store.complete_trial(t1, values=values, metrics={"skip": {"accuracy": 0.5}}, samples=SAMPLES, node="n1")
        store.fail_trial(t2, "RuntimeError: boom\ntraceback...", node="n2")
        assert store.fail_running_trials(st.id, "interrupted") == 1

        rows = {t.id: t for t in store.trials(st.id)}
        assert rows[t1].status == "completed" and rows[t1].skip_ratio == 0.12 and rows[t1].tokens_per_s == 9.5
        assert rows[t1].metrics == {"skip": {"accuracy": 0.5}} and rows[t1].node == "n1"
        assert rows[t1].finished_at >= rows[t1].started_at and rows[t1].duration_s >= 0
        assert rows[t2].status == "failed" and rows[t2].error.startswith("RuntimeError: boom")
        assert rows[t3].status == "failed" and rows[t3].error == "interrupted"
        assert [t.id for t in store.trials(st.id, status="completed")] == [t1]
        assert store.count_trials(st.id) == {"running": 0, "completed": 1, "failed": 2, "pruned": 0}

        # A successive-halving trial: values after a rung, then stopped early.
        t4 = store.start_trial(st.id, {"threshold": 0.6})
        rung = {"quality": 0.25, "quality_drop": 0.75, "quality_drop_low": 0.25, "quality_drop_high": 1.0, "n": 4,
                "speedup": 1.3, "speedup_low": 1.1, "speedup_high": 1.5}
        store.update_trial(t4, values=rung, metrics={"rung": {"rung_samples": 4}})
        assert store.get_trial(t4).status == "running" and store.get_trial(t4).quality_drop_high == 1.0
        store.prune_trial(t4, "stopped early after 4 samples", values=rung, samples=SAMPLES[:1])
        p = store.get_trial(t4)
        assert p.status == "pruned" and p.stop_reason.startswith("stopped early") and p.n == 4 and p.finished_at
        assert p.metrics == {"rung": {"rung_samples": 4}} and len(store.samples(t4)) == 1
        assert store.count_trials(st.id) == {"running": 0, "completed": 1, "failed": 2, "pruned": 1}

        samples = store.samples(t1)
        assert [s.idx for s in samples] == [0, 1]
        assert samples[1].output == "c" and samples[1].reference == ["b"] and samples[0].scores == {"accuracy": 1.0}
        # Completing again replaces the samples instead of duplicating them.
        store.complete_trial(t1, values=values, metrics={}, samples=SAMPLES[:1])
        assert len(store.samples(t1)) == 1
        with pytest.raises(ValueError, match="unknown metric columns"):
            store.complete_trial(t1, values={"accuracy": 1.0}, metrics={})
        with pytest.raises(StoreError, match="no trial"):
            store.fail_trial(10_000, "x")


def test_database_rejects_unknown_status(db_url):
    with Store(db_url) as store:
        st = _study(store)
        with pytest.raises(IntegrityError):
            with store.engine.begin() as conn:
                conn.execute(sa.text("INSERT INTO ffnskip_trials (study_id, status, policy) VALUES (:s, 'done', '{}')"),
                             {"s": st.id})
        with pytest.raises(ValueError, match="status"):
            store.add_trial(st.id, "done", {})


def _writer(url: str, study_id: int, n: int) -> None:
    store = Store(url, migrate=False)
    for i in range(n):
        tid = store.start_trial(study_id, {"threshold": i / n})
        store.complete_trial(tid, values={"quality": 1.0, "skip_ratio": i / n}, metrics={"i": i}, samples=SAMPLES)
    store.close()


def test_concurrent_writers_lose_no_rows(db_url):
    with Store(db_url) as store:
        st = _study(store)
    writers, per_writer = 4, 15
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(db_url, st.id, per_writer)) for _ in range(writers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0] * writers
    with Store(db_url) as store:
        assert store.count_trials(st.id) == {"running": 0, "completed": writers * per_writer, "failed": 0, "pruned": 0}
        with store.engine.connect() as conn:
            assert conn.execute(sa.text("SELECT count(*) FROM ffnskip_samples")).scalar() == writers * per_writer * 2


def test_sqlite_uses_wal_and_foreign_keys(tmp_path):
    with Store(f"sqlite:///{tmp_path / 'w.db'}") as store:
        with store.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1


def test_open_errors_are_one_line(tmp_path):
    missing = tmp_path / "missing.db"
    with pytest.raises(StoreError, match="no results database"):
        Store(f"sqlite:///{missing}", must_exist=True)
    assert not missing.exists()
    with pytest.raises(StoreError, match="malformed database URL"):
        Store("not a url")
    with pytest.raises(StoreError, match="unsupported database"):
        Store("mysql://u@h/db")
    with pytest.raises(StoreError, match="cannot open"):
        Store(f"sqlite:///{tmp_path / 'no' / 'such' / 'dir.db'}")
    with pytest.raises(StoreError, match="cannot open postgresql"):
        Store("postgresql+psycopg://postgres@127.0.0.1:1/x")
    empty = tmp_path / "empty.db"
    sa.create_engine(f"sqlite:///{empty}").connect().close()
    with pytest.raises(StoreError, match="no ffnskip tables"):
        Store(f"sqlite:///{empty}", migrate=False)
