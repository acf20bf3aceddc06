"""ORM models of the ffnskip results store (SQLAlchemy 2.x declarative).

Every table is prefixed ``ffnskip_`` so that the store can share a database with Optuna's own
tables (``studies``, ``trials``, ...; Optuna RDBStorage on the same URL). The schema is owned by
the Alembic migrations in :mod:`tuning.store.migrations`; these classes must match them.

Timestamps are naive UTC. JSON columns are ``JSONB`` on PostgreSQL (queryable with ``->>``) and
JSON text on SQLite (queryable with ``json_extract`` / ``->>``).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

#: JSON on SQLite, JSONB on PostgreSQL.
JSONType = JSON().with_variant(JSONB(), "postgresql")

#: Values of ``ffnskip_trials.status``. ``pruned``: stopped early by successive halving after a
#: rung on part of the samples (its values are that rung's; ``stop_reason`` says why); never
#: recommended.
TRIAL_STATUSES = ("running", "completed", "failed", "pruned")
#: The CHECK constraint on ``ffnskip_trials.status`` (migration 0002 added ``pruned``).
STATUS_CHECK = "status IN ('running', 'completed', 'failed', 'pruned')"

NAME_LENGTH = 255


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSONType, list[Any]: JSONType, Any: JSONType}


class StudyModel(Base):
    """One tuning study: what was searched, on which model, data, code and hardware."""

    __tablename__ = "ffnskip_studies"
    __table_args__ = (UniqueConstraint("name", name="ffnskip_studies_name_key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(NAME_LENGTH), nullable=False)
    model: Mapped[str] = mapped_column(String(1024), nullable=False)
    model_hash: Mapped[str | None] = mapped_column(String(128))
    task: Mapped[str] = mapped_column(String(128), nullable=False)
    data_fingerprint: Mapped[str | None] = mapped_column(String(128))
    search_space: Mapped[dict[str, Any]] = mapped_column(JSONType, nullable=False)
    config: Mapped[dict[str, Any]] = mapped_column(JSONType, nullable=False)
    hardware: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    library_versions: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    git_commit: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime, nullable=False)

    trials: Mapped[list["TrialModel"]] = relationship(
        back_populates="study", cascade="all, delete-orphan", passive_deletes=True
    )
    baseline: Mapped["BaselineModel | None"] = relationship(
        back_populates="study", cascade="all, delete-orphan", passive_deletes=True, uselist=False
    )


class TrialModel(Base):
    """One evaluated skip policy. Objective metrics are columns; the whole report is JSON."""

    __tablename__ = "ffnskip_trials"
    __table_args__ = (
        CheckConstraint(STATUS_CHECK, name="ffnskip_trials_status"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    study_id: Mapped[int] = mapped_column(
        ForeignKey("ffnskip_studies.id", ondelete="CASCADE"), nullable=False, index=True
    )
    status: Mapped[str] = mapped_column(String(16), nullable=False)
    policy: Mapped[dict[str, Any]] = mapped_column(JSONType, nullable=False)
    optuna_number: Mapped[int | None] = mapped_column(Integer)
    ray_trial_id: Mapped[str | None] = mapped_column(String(128), index=True)
    quality: Mapped[float | None] = mapped_column(Float)
    quality_drop: Mapped[float | None] = mapped_column(Float)
    skip_ratio: Mapped[float | None] = mapped_column(Float)
    skip_ratio_post_warmup: Mapped[float | None] = mapped_column(Float)
    tokens_per_s: Mapped[float | None] = mapped_column(Float)
    speedup: Mapped[float | None] = mapped_column(Float)
    # 95% intervals (paired bootstrap against dense) and the samples they rest on; NULL for trials
    # stored before migration 0002 and for reports without intervals.
    quality_drop_low: Mapped[float | None] = mapped_column(Float)
    quality_drop_high: Mapped[float | None] = mapped_column(Float)
    speedup_low: Mapped[float | None] = mapped_column(Float)
    speedup_high: Mapped[float | None] = mapped_column(Float)
    n: Mapped[int | None] = mapped_column(Integer)
    stop_reason: Mapped[str | None] = mapped_column(Text)
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    error: Mapped[str | None] = mapped_column(Text)
    started_at: Mapped[datetime | None] = mapped_column(DateTime)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime)
    node: Mapped[str | None] = mapped_column(String(255))

    study: Mapped[StudyModel] = relationship(back_populates="trials")
    samples: Mapped[list["SampleModel"]] = relationship(
        back_populates="trial", cascade="all, delete-orphan", passive_deletes=True, order_by="SampleModel.idx"
    )


class SampleModel(Base):
    """Per-prompt output of one trial, with its scores and skip statistics."""

    __tablename__ = "ffnskip_samples"
    __table_args__ = (UniqueConstraint("trial_id", "idx", name="ffnskip_samples_trial_idx"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    trial_id: Mapped[int] = mapped_column(
        ForeignKey("ffnskip_trials.id", ondelete="CASCADE"), nullable=False, index=True
    )
    idx: Mapped[int] = mapped_column(Integer, nullable=False)
    prompt: Mapped[str | None] = mapped_column(Text)
    reference: Mapped[Any] = mapped_column(JSONType)
    dense_output: Mapped[str | None] = mapped_column(Text)
    output: Mapped[str | None] = mapped_column(Text)
    scores: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    generated_tokens: Mapped[int | None] = mapped_column(Integer)
    skipped_ffn: Mapped[int | None] = mapped_column(Integer)
    skip_ratio: Mapped[float | None] = mapped_column(Float)

    trial: Mapped[TrialModel] = relationship(back_populates="samples")


class BaselineModel(Base):
    """The dense model measured once at the start of a study, on the study's data."""

    __tablename__ = "ffnskip_baselines"
    __table_args__ = (UniqueConstraint("study_id", name="ffnskip_baselines_study_id_key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    study_id: Mapped[int] = mapped_column(
        ForeignKey("ffnskip_studies.id", ondelete="CASCADE"), nullable=False
    )
    quality: Mapped[float | None] = mapped_column(Float)
    tokens_per_s: Mapped[float | None] = mapped_column(Float)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSONType, nullable=False)
    outputs: Mapped[list[Any] | None] = mapped_column(JSONType)
    n: Mapped[int | None] = mapped_column(Integer)
    node: Mapped[str | None] = mapped_column(String(255))
    duration_s: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(DateTime, nullable=False)

    study: Mapped[StudyModel] = relationship(back_populates="baseline")
