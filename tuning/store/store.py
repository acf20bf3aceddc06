"""The results store: queries over the ORM models, one session scope, migrations on open.

Shaped like Optuna's ``storages/_rdb``: the models (:mod:`.models`) are apart from the queries
(here); every query runs inside :meth:`Store.session_scope`, which commits or rolls back; the
schema is created and upgraded by the Alembic migrations shipped in :mod:`.migrations` (version
table ``ffnskip_alembic_version``) when a store is opened with ``migrate=True``.

One code path for SQLite and PostgreSQL:

* SQLite (default ``sqlite:///ffnskip.db``): WAL journal, foreign keys on, a 30 s busy timeout,
  and write transactions that take the write lock up front (``BEGIN IMMEDIATE``), so concurrent
  writers queue instead of failing on a lock upgrade.
* PostgreSQL (``postgresql+psycopg://user:pw@host/db``): migrations serialised by an advisory
  lock; serialization failures and deadlocks are retried.

Every public method returns plain dataclasses (detached from any session).
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence, TypeVar

from sqlalchemy import create_engine, delete, event, func, inspect, select, text, update
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, IntegrityError, NoSuchModuleError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from ffnskip.errors import FFNSkipError

from .models import TRIAL_STATUSES, BaselineModel, SampleModel, StudyModel, TrialModel

log = logging.getLogger(__name__)

#: The store used when neither ``--db`` nor ``$FFNSKIP_DB`` names one.
DEFAULT_URL = "sqlite:///ffnskip.db"
ENV_DB = "FFNSKIP_DB"
VERSION_TABLE = "ffnskip_alembic_version"
#: Key of the PostgreSQL advisory lock held while migrating.
_MIGRATION_LOCK = 0x0FF5C1B

#: Metric columns of ``ffnskip_trials`` (everything else is in its ``metrics`` JSON): the values,
#: the 95% intervals of the quality drop and the speed-up, and ``n`` (samples compared).
METRIC_COLUMNS = ("quality", "quality_drop", "skip_ratio", "skip_ratio_post_warmup", "tokens_per_s", "speedup",
                  "quality_drop_low", "quality_drop_high", "speedup_low", "speedup_high", "n")
_INT_COLUMNS = ("n",)
#: Per-sample keys stored as ``ffnskip_samples`` columns (``index`` becomes ``idx``).
SAMPLE_FIELDS = ("prompt", "reference", "dense_output", "output", "scores", "generated_tokens", "skipped_ffn", "skip_ratio")

T = TypeVar("T")


class StoreError(FFNSkipError, RuntimeError):
    """A store could not be opened or a request cannot be met (one line for the user)."""


class StudyExists(StoreError):
    pass


class StudyNotFound(StoreError):
    pass


#: The cluster-wide name of the same setting (docker-compose, KubeRay); either is honoured.
ENV_DB_URL = "FFNSKIP_DB_URL"
#: Seconds a write waits for a database that went away before the store gives up.
ENV_OUTAGE = "FFNSKIP_DB_OUTAGE_S"


def default_url() -> str:
    return os.environ.get(ENV_DB) or os.environ.get(ENV_DB_URL) or DEFAULT_URL


def utcnow() -> datetime:
    """Naive UTC, the store's time convention."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


# ------------------------------------------------------------------------------ records
class _Record:
    """A plain copy of an ORM row (usable after its session closed): one field per column."""

    @classmethod
    def of(cls, m: Any):
        return cls(**{f: getattr(m, f) for f in cls.__dataclass_fields__})


@dataclass
class StudyRecord(_Record):
    id: int
    name: str
    model: str
    model_hash: str | None
    task: str
    data_fingerprint: str | None
    search_space: dict[str, Any]
    config: dict[str, Any]
    hardware: dict[str, Any] | None
    library_versions: dict[str, Any] | None
    git_commit: str | None
    created_at: datetime


@dataclass
class StudySummary:
    study: StudyRecord
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


@dataclass
class TrialRecord(_Record):
    id: int
    study_id: int
    status: str
    policy: dict[str, Any]
    optuna_number: int | None
    ray_trial_id: str | None
    quality: float | None
    quality_drop: float | None
    skip_ratio: float | None
    skip_ratio_post_warmup: float | None
    tokens_per_s: float | None
    speedup: float | None
    metrics: dict[str, Any] | None
    error: str | None
    started_at: datetime | None
    finished_at: datetime | None
    node: str | None
    quality_drop_low: float | None = None
    quality_drop_high: float | None = None
    speedup_low: float | None = None
    speedup_high: float | None = None
    n: int | None = None
    stop_reason: str | None = None

    @property
    def duration_s(self) -> float | None:
        if self.started_at and self.finished_at:
            return (self.finished_at - self.started_at).total_seconds()
        return None


@dataclass
class SampleRecord(_Record):
    id: int
    trial_id: int
    idx: int
    prompt: str | None
    reference: Any
    dense_output: str | None
    output: str | None
    scores: dict[str, Any] | None
    generated_tokens: int | None
    skipped_ffn: int | None
    skip_ratio: float | None


@dataclass
class BaselineRecord(_Record):
    id: int
    study_id: int
    quality: float | None
    tokens_per_s: float | None
    metrics: dict[str, Any]
    outputs: list[Any] | None
    n: int | None
    node: str | None
    duration_s: float | None
    created_at: datetime


# ------------------------------------------------------------------------------ engine
def _sqlite_path(url) -> Path | None:
    db = url.database
    if not db or db == ":memory:" or db.startswith("file:"):
        return None
    return Path(db).expanduser().resolve()


def display_url(url: str) -> str:
    """The URL without its password; SQLite files as absolute paths."""
    try:
        u = make_url(url)
    except ArgumentError:
        return url
    if u.get_backend_name() == "sqlite":
        p = _sqlite_path(u)
        return f"sqlite:///{p}" if p else str(u)
    return u.render_as_string(hide_password=True)


def _is_transient(exc: BaseException) -> bool:
    """Lock contention or a serialization conflict: the same transaction may succeed if retried."""
    orig = getattr(exc, "orig", None)
    if getattr(orig, "sqlstate", None) in ("40001", "40P01"):  # serialization failure, deadlock
        return True
    msg = str(orig or exc).lower()
    return isinstance(exc, OperationalError) and ("database is locked" in msg or "database is busy" in msg)


#: SQLSTATEs of a lost or refused connection: class 08 (connection exception) and the server
#: shutting down / starting up (57P01 admin shutdown, 57P02 crash shutdown, 57P03 cannot connect now).
_DISCONNECT_STATES = ("57P01", "57P02", "57P03")
_DISCONNECT_TEXT = ("connection refused", "server closed the connection", "connection failed", "could not connect",
                    "terminating connection", "the database system is", "connection is closed", "connection reset",
                    "no connection to the server", "consuming input failed", "ssl connection has been closed")


def is_disconnect(exc: BaseException) -> bool:
    """The database went away (restarted, failed over, network cut): the same work may succeed
    once it is back. SQLAlchemy's own disconnect detection, the PostgreSQL SQLSTATEs, and the
    drivers' messages (a refused *new* connection is not flagged by SQLAlchemy)."""
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    if not isinstance(exc, (OperationalError, DBAPIError)):
        return False
    orig = getattr(exc, "orig", None)
    state = getattr(orig, "sqlstate", None) or ""
    if state.startswith("08") or state in _DISCONNECT_STATES:
        return True
    msg = str(orig or exc).lower()
    return isinstance(exc, OperationalError) and any(t in msg for t in _DISCONNECT_TEXT)


@dataclass
class RetryStats:
    """What the store's retries survived (for logs, tests and the reliability drills)."""

    retries: int = 0
    """Attempts repeated after a transient error or a lost database."""
    outages: int = 0
    """Times the database was unreachable and came back."""
    outage_s: float = 0.0
    """Seconds spent waiting for the database, in total."""
    longest_outage_s: float = 0.0


def _make_engine(url: str) -> Engine:
    try:
        u = make_url(url)
    except ArgumentError:
        raise StoreError(
            f"malformed database URL {url!r}: use sqlite:///FILE.db or postgresql+psycopg://USER:PW@HOST/DB"
        ) from None
    backend = u.get_backend_name()
    if backend not in ("sqlite", "postgresql"):
        raise StoreError(f"unsupported database {backend!r} in {display_url(url)}: use SQLite or PostgreSQL")
    try:
        if backend == "sqlite":
            engine = create_engine(u, connect_args={"timeout": 30, "check_same_thread": False})
            memory = _sqlite_path(u) is None

            @event.listens_for(engine, "connect")
            def _on_connect(dbapi_conn, _record):
                # The driver must not open transactions on its own: we emit BEGIN IMMEDIATE below.
                dbapi_conn.isolation_level = None
                cur = dbapi_conn.cursor()
                if not memory:
                    cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA foreign_keys=ON")
                cur.execute("PRAGMA busy_timeout=30000")
                cur.close()

            @event.listens_for(engine, "begin")
            def _on_begin(conn):
                conn.exec_driver_sql("BEGIN IMMEDIATE")

        else:
            engine = create_engine(u, pool_pre_ping=True)
    except (NoSuchModuleError, ImportError) as exc:
        raise StoreError(f"no database driver for {display_url(url)}: {exc}") from None
    return engine


def _first_line(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None) or exc
    lines = str(orig).strip().splitlines()
    return lines[0] if lines else type(orig).__name__


# ------------------------------------------------------------------------------ the store
class Store:
    """The ffnskip results store on one database URL.

    ``migrate``: create / upgrade the schema on open (the study driver and the CLI do; short-lived
    readers may skip it). ``must_exist``: a SQLite file that does not exist is an error instead of
    being created (for read-only commands, so a typo in ``--db`` does not create an empty file).
    """

    def __init__(self, url: str | None = None, *, migrate: bool = True, must_exist: bool = False,
                 max_retries: int = 8, outage_s: float | None = None):
        self.url = url or default_url()
        self.max_retries = max_retries
        #: How long a write waits for a database that went away (restart, fail-over) before it
        #: gives up: ``outage_s``, else ``$FFNSKIP_DB_OUTAGE_S``, else 120 s.
        self.outage_window_s = float(outage_s if outage_s is not None else os.environ.get(ENV_OUTAGE, 120.0))
        self.retry_stats = RetryStats()
        u = make_url(self.url) if _valid(self.url) else None
        if must_exist and u is not None and u.get_backend_name() == "sqlite":
            p = _sqlite_path(u)
            if p is not None and not p.is_file():
                raise StoreError(f"no results database at {p}: run a study first, or pass --db")
        self.engine = _make_engine(self.url)
        self.dialect = self.engine.dialect.name
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        try:
            if migrate:
                self.migrate()
            elif not inspect(self.engine).has_table("ffnskip_studies"):
                raise StoreError(f"{self.location} has no ffnskip tables: run a study first, or pass --db")
        except (OperationalError, DBAPIError) as exc:
            self.engine.dispose()
            raise StoreError(f"cannot open {self.location}: {_first_line(exc)}") from None
        except BaseException:
            self.engine.dispose()
            raise

    @property
    def location(self) -> str:
        return display_url(self.url)

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -------------------------------------------------------------------------- plumbing
    @contextmanager
    def session_scope(self) -> Iterator[Session]:
        """A session whose work is committed on success and rolled back on any exception."""
        session = self._sessions()
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()

    def _run(self, work: Callable[[Session], T]) -> T:
        """``work`` in one transaction, retried from scratch with exponential backoff: on lock
        contention / conflicts (``max_retries`` times), and while the database is unreachable
        (restarted, failed over: for up to ``outage_window_s``; the pool is emptied so that the
        next attempt opens a fresh connection). Each wait for the database is logged."""
        return retrying(self._attempt(work), self.max_retries, self.outage_window_s, self.retry_stats,
                        on_disconnect=self.engine.dispose, what=f"store {self.location}")

    def _attempt(self, work: Callable[[Session], T]) -> Callable[[], T]:
        def once() -> T:
            with self.session_scope() as session:
                return work(session)

        return once

    def migrate(self, revision: str = "head") -> None:
        """Create or upgrade the ffnskip tables to ``revision`` (default: the newest; idempotent,
        concurrent-safe)."""
        from alembic import command

        self._alembic(lambda cfg: command.upgrade(cfg, revision))

    def downgrade(self, revision: str) -> None:
        """Downgrade the ffnskip tables to ``revision`` (``base``: none), e.g. to go back a release."""
        from alembic import command

        self._alembic(lambda cfg: command.downgrade(cfg, revision))

    def _alembic(self, action: Callable[[Any], None]) -> None:
        """Run an Alembic command in one transaction on a connection of this store."""
        from alembic.config import Config

        cfg = Config()
        cfg.set_main_option("script_location", "tuning.store:migrations")
        cfg.set_main_option("path_separator", "os")
        sqlite = self.dialect == "sqlite"
        with self.engine.connect() as conn:
            # SQLite changes a CHECK constraint by copying the table (Alembic batch mode): with
            # foreign keys on, dropping the old copy would cascade to every sample row. The pragma
            # only takes effect outside a transaction, so it is set on the driver's connection
            # (autocommit) before the migration's BEGIN IMMEDIATE, and restored after it.
            driver = conn.connection.driver_connection if sqlite else None
            if driver is not None:
                driver.execute("PRAGMA foreign_keys=OFF")
            try:
                with conn.begin():  # SQLite: BEGIN IMMEDIATE serialises concurrent openers
                    if self.dialect == "postgresql":
                        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK})
                    cfg.attributes["connection"] = conn
                    action(cfg)
                    if driver is not None:
                        broken = conn.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                        if broken:
                            raise StoreError(f"migrating {self.location} broke {len(broken)} foreign key(s); rolled back")
            finally:
                if driver is not None:
                    driver.execute("PRAGMA foreign_keys=ON")

    def revision(self) -> str | None:
        """The schema revision recorded in ``ffnskip_alembic_version``."""
        from alembic.runtime.migration import MigrationContext

        with self.engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE})
            return ctx.get_current_revision()

    # -------------------------------------------------------------------------- studies
    def create_study(self, name: str, *, model: str, task: str, search_space: dict[str, Any],
                     config: dict[str, Any], model_hash: str | None = None,
                     data_fingerprint: str | None = None, hardware: dict[str, Any] | None = None,
                     library_versions: dict[str, Any] | None = None, git_commit: str | None = None,
                     created_at: datetime | None = None) -> StudyRecord:
        def work(s: Session) -> StudyRecord:
            m = StudyModel(
                name=name, model=model, model_hash=model_hash, task=task,
                data_fingerprint=data_fingerprint, search_space=search_space, config=config,
                hardware=hardware, library_versions=library_versions, git_commit=git_commit,
                created_at=created_at or utcnow(),
            )
            s.add(m)
            s.flush()
            return StudyRecord.of(m)

        try:
            return self._run(work)
        except IntegrityError:
            raise StudyExists(f"study '{name}' already exists in {self.location}") from None

    def get_study(self, name: str) -> StudyRecord | None:
        def work(s: Session) -> StudyRecord | None:
            m = s.scalar(select(StudyModel).where(StudyModel.name == name))
            return StudyRecord.of(m) if m else None

        return self._run(work)

    def require_study(self, name: str) -> StudyRecord:
        study = self.get_study(name)
        if study is None:
            names = [st.study.name for st in self.list_studies()]
            known = f"studies: {', '.join(names)}" if names else "it has no studies yet"
            raise StudyNotFound(f"no study '{name}' in {self.location} ({known})")
        return study

    def list_studies(self) -> list[StudySummary]:
        def work(s: Session) -> list[StudySummary]:
            studies = s.scalars(select(StudyModel).order_by(StudyModel.id)).all()
            rows = s.execute(
                select(TrialModel.study_id, TrialModel.status, func.count()).group_by(
                    TrialModel.study_id, TrialModel.status
                )
            ).all()
            counts: dict[int, dict[str, int]] = {}
            for sid, status, n in rows:
                counts.setdefault(sid, {})[status] = n
            return [StudySummary(StudyRecord.of(m), counts.get(m.id, {})) for m in studies]

        return self._run(work)

    def delete_study(self, name: str) -> bool:
        def work(s: Session) -> bool:
            m = s.scalar(select(StudyModel).where(StudyModel.name == name))
            if m is None:
                return False
            s.delete(m)
            return True

        return self._run(work)

    # -------------------------------------------------------------------------- baselines
    def save_baseline(self, study_id: int, *, metrics: dict[str, Any], quality: float | None,
                      tokens_per_s: float | None, outputs: list[Any] | None = None, n: int | None = None,
                      node: str | None = None, duration_s: float | None = None) -> BaselineRecord:
        def work(s: Session) -> BaselineRecord:
            m = BaselineModel(
                study_id=study_id, metrics=metrics, quality=quality, tokens_per_s=tokens_per_s,
                outputs=outputs, n=n, node=node, duration_s=duration_s, created_at=utcnow(),
            )
            s.add(m)
            s.flush()
            return BaselineRecord.of(m)

        return self._run(work)

    def get_baseline(self, study_id: int) -> BaselineRecord | None:
        def work(s: Session) -> BaselineRecord | None:
            m = s.scalar(select(BaselineModel).where(BaselineModel.study_id == study_id))
            return BaselineRecord.of(m) if m else None

        return self._run(work)

    # -------------------------------------------------------------------------- trials
    def start_trial(self, study_id: int, policy: dict[str, Any], *, ray_trial_id: str | None = None,
                    optuna_number: int | None = None, node: str | None = None,
                    started_at: datetime | None = None) -> int:
        """A new ``running`` trial; returns its id."""
        return self.add_trial(study_id, "running", policy, ray_trial_id=ray_trial_id,
                              optuna_number=optuna_number, node=node, started_at=started_at or utcnow())

    def add_trial(self, study_id: int, status: str, policy: dict[str, Any], *,
                  values: Mapping[str, float | None] | None = None, metrics: dict[str, Any] | None = None,
                  samples: Sequence[Mapping[str, Any]] = (), error: str | None = None,
                  ray_trial_id: str | None = None, optuna_number: int | None = None,
                  node: str | None = None, started_at: datetime | None = None,
                  finished_at: datetime | None = None, stop_reason: str | None = None) -> int:
        """One trial row (and its samples) in one transaction; returns its id."""
        _check_status(status)

        def work(s: Session) -> int:
            m = TrialModel(study_id=study_id, status=status, policy=policy, ray_trial_id=ray_trial_id,
                           optuna_number=optuna_number, node=node, started_at=started_at,
                           finished_at=finished_at, error=error, metrics=metrics, stop_reason=stop_reason)
            _set_values(m, values or {})
            s.add(m)
            s.flush()
            _add_samples(s, m.id, samples)
            return m.id

        return self._run(work)

    def complete_trial(self, trial_id: int, *, values: Mapping[str, float | None], metrics: dict[str, Any],
                       samples: Sequence[Mapping[str, Any]] = (), node: str | None = None,
                       started_at: datetime | None = None, finished_at: datetime | None = None) -> None:
        """Mark a trial ``completed`` with its metrics and per-sample rows (all or nothing)."""

        def work(s: Session) -> None:
            m = _get_trial(s, trial_id)
            m.status = "completed"
            m.metrics = metrics
            m.error = None
            _set_values(m, values)
            if node:
                m.node = node
            if started_at:
                m.started_at = started_at
            m.finished_at = finished_at or utcnow()
            s.execute(delete(SampleModel).where(SampleModel.trial_id == trial_id))
            _add_samples(s, trial_id, samples)

        self._run(work)

    def update_trial(self, trial_id: int, *, values: Mapping[str, float | None], metrics: dict[str, Any] | None = None,
                     node: str | None = None) -> None:
        """A ``running`` trial's values so far (a successive-halving rung on part of the samples)."""

        def work(s: Session) -> None:
            m = _get_trial(s, trial_id)
            _set_values(m, values)
            if metrics is not None:
                m.metrics = metrics
            if node:
                m.node = node

        self._run(work)

    def prune_trial(self, trial_id: int, reason: str, *, values: Mapping[str, float | None] | None = None,
                    metrics: dict[str, Any] | None = None, samples: Sequence[Mapping[str, Any]] | None = None,
                    node: str | None = None, started_at: datetime | None = None,
                    finished_at: datetime | None = None) -> None:
        """Mark a trial ``pruned`` (stopped early): the values and samples of its last rung, and why."""

        def work(s: Session) -> None:
            m = _get_trial(s, trial_id)
            m.status = "pruned"
            m.stop_reason = reason
            m.error = None
            if values is not None:
                _set_values(m, values)
            if metrics is not None:
                m.metrics = metrics
            if node:
                m.node = node
            if started_at:
                m.started_at = started_at
            m.finished_at = finished_at or utcnow()
            if samples is not None:
                s.execute(delete(SampleModel).where(SampleModel.trial_id == trial_id))
                _add_samples(s, trial_id, samples)

        self._run(work)

    def fail_trial(self, trial_id: int, error: str, *, node: str | None = None,
                   finished_at: datetime | None = None) -> None:
        def work(s: Session) -> None:
            m = _get_trial(s, trial_id)
            m.status = "failed"
            m.error = error
            if node and not m.node:
                m.node = node
            m.finished_at = finished_at or utcnow()

        self._run(work)

    def fail_running_trials(self, study_id: int, error: str, *, ids: Sequence[int] | None = None) -> int:
        """Mark the study's ``running`` trials (or only ``ids`` among them) failed; returns how many."""

        def work(s: Session) -> int:
            q = (
                update(TrialModel)
                .where(TrialModel.study_id == study_id, TrialModel.status == "running")
                .values(status="failed", error=error, finished_at=utcnow())
            )
            if ids is not None:
                q = q.where(TrialModel.id.in_(list(ids)))
            return s.execute(q).rowcount or 0

        return self._run(work)

    def get_trial(self, trial_id: int) -> TrialRecord:
        return self._run(lambda s: TrialRecord.of(_get_trial(s, trial_id)))

    def trials(self, study_id: int, status: str | None = None) -> list[TrialRecord]:
        if status is not None:
            _check_status(status)

        def work(s: Session) -> list[TrialRecord]:
            q = select(TrialModel).where(TrialModel.study_id == study_id).order_by(TrialModel.id)
            if status is not None:
                q = q.where(TrialModel.status == status)
            return [TrialRecord.of(m) for m in s.scalars(q)]

        return self._run(work)

    def count_trials(self, study_id: int) -> dict[str, int]:
        def work(s: Session) -> dict[str, int]:
            rows = s.execute(
                select(TrialModel.status, func.count()).where(TrialModel.study_id == study_id).group_by(TrialModel.status)
            ).all()
            counts = {st: 0 for st in TRIAL_STATUSES}
            counts.update({st: n for st, n in rows})
            return counts

        return self._run(work)

    def samples(self, trial_id: int) -> list[SampleRecord]:
        def work(s: Session) -> list[SampleRecord]:
            q = select(SampleModel).where(SampleModel.trial_id == trial_id).order_by(SampleModel.idx)
            return [SampleRecord.of(m) for m in s.scalars(q)]

        return self._run(work)


# ------------------------------------------------------------------------------ retries
def retrying(fn: Callable[[], T], max_retries: int, outage_window_s: float, stats: RetryStats, *,
             on_disconnect: Callable[[], None] | None = None, what: str = "store",
             classify: Callable[[BaseException], BaseException | None] = lambda e: e) -> T:
    """``fn()`` retried with exponential backoff and jitter (0.05 s doubling to at most 2 s):
    up to ``max_retries`` times on lock contention / conflicts, and for up to ``outage_window_s``
    seconds while the database is unreachable. ``classify`` maps an exception to the SQLAlchemy
    error behind it (``None``: not a database error, raised at once)."""
    delay, attempt, down_since = 0.05, 0, None
    while True:
        try:
            out = fn()
        except Exception as exc:
            err = classify(exc)
            if err is None:
                raise
            now = time.monotonic()
            if is_disconnect(err):
                if down_since is None:
                    down_since = now
                    log.warning("%s: the database is unreachable (%s): retrying for up to %.0f s", what,
                                _first_line(err), outage_window_s)
                if now - down_since >= outage_window_s:
                    stats.outage_s += now - down_since
                    log.error("%s: the database stayed unreachable for %.1f s: giving up", what, now - down_since)
                    raise
                if on_disconnect is not None:
                    on_disconnect()  # stale pooled connections: the next attempt opens a new one
            elif not _is_transient(err) or attempt >= max_retries - 1:
                raise
            attempt += 1
            stats.retries += 1
            wait = delay * (1 + random.random())
            log.warning("%s: retry %d in %.2f s after %s", what, attempt, wait, _first_line(err))
            time.sleep(wait)
            delay = min(delay * 2, 2.0)
            continue
        if down_since is not None:
            down = time.monotonic() - down_since
            stats.outages += 1
            stats.outage_s += down
            stats.longest_outage_s = max(stats.longest_outage_s, down)
            log.warning("%s: the database is back after %.1f s (%d retries)", what, down, attempt)
        return out


# ------------------------------------------------------------------------------ helpers
def _valid(url: str) -> bool:
    try:
        make_url(url)
        return True
    except ArgumentError:
        return False


def _check_status(status: str) -> None:
    if status not in TRIAL_STATUSES:
        raise ValueError(f"trial status must be one of {', '.join(TRIAL_STATUSES)}; got {status!r}")


def _get_trial(s: Session, trial_id: int) -> TrialModel:
    m = s.get(TrialModel, trial_id)
    if m is None:
        raise StoreError(f"no trial with id {trial_id}")
    return m


def _set_values(m: TrialModel, values: Mapping[str, float | None]) -> None:
    unknown = set(values) - set(METRIC_COLUMNS)
    if unknown:
        raise ValueError(f"unknown metric columns {sorted(unknown)}; known: {', '.join(METRIC_COLUMNS)}")
    for name, value in values.items():
        setattr(m, name, None if value is None else int(value) if name in _INT_COLUMNS else float(value))


_TEXT_FIELDS = ("prompt", "dense_output", "output")


def _sample_value(key: str, value: Any) -> Any:
    # Multi-turn tasks give lists of turns: text columns hold them as JSON text.
    if key in _TEXT_FIELDS and value is not None and not isinstance(value, str):
        return json.dumps(value)
    return value


def _add_samples(s: Session, trial_id: int, samples: Sequence[Mapping[str, Any]]) -> None:
    for i, sample in enumerate(samples):
        s.add(SampleModel(trial_id=trial_id, idx=int(sample.get("index", i)),
                          **{k: _sample_value(k, sample.get(k)) for k in SAMPLE_FIELDS}))


def _sqlalchemy_cause(exc: BaseException) -> BaseException | None:
    """The SQLAlchemy database error behind ``exc`` (Optuna wraps them in StorageInternalError)."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, (OperationalError, DBAPIError)):
            return exc
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return None


#: Optuna storage methods retried while the database is unreachable: every public one, and the
#: private ones that Optuna's _CachedStorage (which wraps every RDBStorage) calls directly.
_OPTUNA_METHODS = ("_create_new_trial", "_get_best_trial_id", "_get_stale_trial_ids", "_get_trials",
                   "_set_trial_param", "record_heartbeat", "create_new_study", "create_new_trial", "delete_study", "get_all_studies", "get_all_trials",
                   "get_best_trial", "get_n_trials", "get_study_directions", "get_study_id_from_name",
                   "get_study_name_from_id", "get_study_system_attrs", "get_study_user_attrs", "get_trial",
                   "get_trial_id_from_study_id_trial_number", "get_trial_number_from_id", "get_trial_param",
                   "get_trial_params", "get_trial_system_attrs", "get_trial_user_attrs", "set_study_system_attr",
                   "set_study_user_attr", "set_trial_intermediate_value", "set_trial_param", "set_trial_state_values",
                   "set_trial_system_attr", "set_trial_user_attr")
_optuna_storage_class = None


def _retrying_rdb_storage_class():
    """``optuna.storages.RDBStorage`` whose calls survive a database restart like the store's
    (same backoff, same outage window); built once, on first use (Optuna is imported lazily)."""
    global _optuna_storage_class
    if _optuna_storage_class is not None:
        return _optuna_storage_class
    import optuna

    def wrap(name: str):
        method = getattr(optuna.storages.RDBStorage, name)

        def call(self, *args, **kwargs):
            return retrying(lambda: method(self, *args, **kwargs), 8, self.outage_window_s, self.retry_stats,
                            on_disconnect=self._drop_connections, what="optuna storage", classify=_sqlalchemy_cause)

        call.__name__ = call.__qualname__ = name
        call.__doc__ = method.__doc__
        return call

    def __init__(self, url, *, outage_s: float | None = None, **kwargs):
        self.outage_window_s = float(outage_s if outage_s is not None else os.environ.get(ENV_OUTAGE, 120.0))
        self.retry_stats = RetryStats()
        optuna.storages.RDBStorage.__init__(self, url, **kwargs)

    def __setstate__(self, state):  # Tune pickles the search algorithm with its storage
        optuna.storages.RDBStorage.__setstate__(self, state)
        self.__dict__.setdefault("outage_window_s", float(os.environ.get(ENV_OUTAGE, 120.0)))
        self.__dict__.setdefault("retry_stats", RetryStats())

    def _drop_connections(self):
        self.scoped_session.remove()
        self.engine.dispose()

    ns: dict[str, Any] = {name: wrap(name) for name in _OPTUNA_METHODS if hasattr(optuna.storages.RDBStorage, name)}
    ns.update(__init__=__init__, __setstate__=__setstate__, _drop_connections=_drop_connections,
              __module__=__name__, __qualname__="RetryingRDBStorage")
    _optuna_storage_class = type("RetryingRDBStorage", (optuna.storages.RDBStorage,), ns)
    globals()["RetryingRDBStorage"] = _optuna_storage_class  # picklable by name
    return _optuna_storage_class


def optuna_storage(url: str, *, outage_s: float | None = None):
    """Optuna's RDBStorage on the same database (its own tables, its own ``alembic_version``),
    retrying every call while the database is unreachable, as the store does."""
    u = make_url(url)
    kwargs: dict[str, Any] = (
        {"connect_args": {"timeout": 30}} if u.get_backend_name() == "sqlite" else {"pool_pre_ping": True}
    )
    return _retrying_rdb_storage_class()(url, engine_kwargs=kwargs, outage_s=outage_s)


def __getattr__(name: str):  # unpickling a RetryingRDBStorage in a fresh process builds the class
    if name == "RetryingRDBStorage":
        return _retrying_rdb_storage_class()
    raise AttributeError(name)
