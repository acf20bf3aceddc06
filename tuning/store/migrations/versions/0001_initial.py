"""Initial schema: studies, trials, samples, baselines.

Revision ID: 0001
Revises:
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "ffnskip_studies",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("model", sa.String(1024), nullable=False),
        sa.Column("model_hash", sa.String(128)),
        sa.Column("task", sa.String(128), nullable=False),
        sa.Column("data_fingerprint", sa.String(128)),
        sa.Column("search_space", JSON, nullable=False),
        sa.Column("config", JSON, nullable=False),
        sa.Column("hardware", JSON),
        sa.Column("library_versions", JSON),
        sa.Column("git_commit", sa.String(64)),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.UniqueConstraint("name", name="ffnskip_studies_name_key"),
    )
    op.create_table(
        "ffnskip_trials",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("study_id", sa.Integer, sa.ForeignKey("ffnskip_studies.id", ondelete="CASCADE"), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("policy", JSON, nullable=False),
        sa.Column("optuna_number", sa.Integer),
        sa.Column("ray_trial_id", sa.String(128)),
        sa.Column("quality", sa.Float),
        sa.Column("quality_drop", sa.Float),
        sa.Column("skip_ratio", sa.Float),
        sa.Column("skip_ratio_post_warmup", sa.Float),
        sa.Column("tokens_per_s", sa.Float),
        sa.Column("speedup", sa.Float),
        sa.Column("metrics", JSON),
        sa.Column("error", sa.Text),
        sa.Column("started_at", sa.DateTime),
        sa.Column("finished_at", sa.DateTime),
        sa.Column("node", sa.String(255)),
        sa.CheckConstraint("status IN ('running', 'completed', 'failed')", name="ffnskip_trials_status"),
    )
    op.create_index("ix_ffnskip_trials_study_id", "ffnskip_trials", ["study_id"])
    op.create_index("ix_ffnskip_trials_ray_trial_id", "ffnskip_trials", ["ray_trial_id"])
    op.create_table(
        "ffnskip_samples",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("trial_id", sa.Integer, sa.ForeignKey("ffnskip_trials.id", ondelete="CASCADE"), nullable=False),
        sa.Column("idx", sa.Integer, nullable=False),
        sa.Column("prompt", sa.Text),
        sa.Column("reference", JSON),
        sa.Column("dense_output", sa.Text),
        sa.Column("output", sa.Text),
        sa.Column("scores", JSON),
        sa.Column("generated_tokens", sa.Integer),
        sa.Column("skipped_ffn", sa.Integer),
        sa.Column("skip_ratio", sa.Float),
        sa.UniqueConstraint("trial_id", "idx", name="ffnskip_samples_trial_idx"),
    )
    op.create_index("ix_ffnskip_samples_trial_id", "ffnskip_samples", ["trial_id"])
    op.create_table(
        "ffnskip_baselines",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("study_id", sa.Integer, sa.ForeignKey("ffnskip_studies.id", ondelete="CASCADE"), nullable=False),
        sa.Column("quality", sa.Float),
        sa.Column("tokens_per_s", sa.Float),
        sa.Column("metrics", JSON, nullable=False),
        sa.Column("outputs", JSON),
        sa.Column("n", sa.Integer),
        sa.Column("node", sa.String(255)),
        sa.Column("duration_s", sa.Float),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.UniqueConstraint("study_id", name="ffnskip_baselines_study_id_key"),
    )


def downgrade() -> None:
    op.drop_table("ffnskip_baselines")
    op.drop_index("ix_ffnskip_samples_trial_id", "ffnskip_samples")
    op.drop_table("ffnskip_samples")
    op.drop_index("ix_ffnskip_trials_ray_trial_id", "ffnskip_trials")
    op.drop_index("ix_ffnskip_trials_study_id", "ffnskip_trials")
    op.drop_table("ffnskip_trials")
    op.drop_table("ffnskip_studies")
