"""Alembic migrations of the ffnskip store, applied programmatically by :class:`tuning.store.Store`.

Version table: ``ffnskip_alembic_version`` (Optuna keeps its own ``alembic_version`` in the same
database). New revision, from the repository root::

    alembic -c tuning/store/migrations/alembic.ini revision -m "what changed"
"""
