"""Trials: 95% intervals of the quality drop and the speed-up, the samples they rest on, and the
``pruned`` status (stopped early by successive halving) with its reason.

Every new column is nullable: trials stored before this revision keep NULL intervals (the
recommendation rule judges them on their point values and says so).

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-07
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

OLD_CHECK = "status IN ('running', 'completed', 'failed')"
NEW_CHECK = "status IN ('running', 'completed', 'failed', 'pruned')"
COLUMNS = (
    ("quality_drop_low", sa.Float),
    ("quality_drop_high", sa.Float),
    ("speedup_low", sa.Float),
    ("speedup_high", sa.Float),
    ("n", sa.Integer),
    ("stop_reason", sa.Text),
)


def _check_foreign_keys_off() -> None:
    """SQLite cannot alter a CHECK constraint: batch mode copies the table ("auto": only on
    SQLite) and drops the old one, which with foreign keys on would cascade to every row of
    ffnskip_samples. Store.migrate turns them off around the migration; refuse anything else."""
    bind = op.get_bind()
    if bind.dialect.name == "sqlite" and bind.exec_driver_sql("PRAGMA foreign_keys").scalar():
        raise RuntimeError("migration 0002 must run with SQLite foreign keys off (open the database with "
                           "tuning.store.Store, which migrates it safely)")


def upgrade() -> None:
    _check_foreign_keys_off()
    with op.batch_alter_table("ffnskip_trials", recreate="auto") as batch:
        for name, type_ in COLUMNS:
            batch.add_column(sa.Column(name, type_, nullable=True))
        batch.drop_constraint("ffnskip_trials_status", type_="check")
        batch.create_check_constraint("ffnskip_trials_status", NEW_CHECK)


def downgrade() -> None:
    _check_foreign_keys_off()
    op.execute("UPDATE ffnskip_trials SET status = 'failed', error = stop_reason WHERE status = 'pruned'")
    with op.batch_alter_table("ffnskip_trials", recreate="auto") as batch:
        batch.drop_constraint("ffnskip_trials_status", type_="check")
        batch.create_check_constraint("ffnskip_trials_status", OLD_CHECK)
        for name, _ in reversed(COLUMNS):
            batch.drop_column(name)
