"""The ffnskip results store (SQLAlchemy 2.x ORM + Alembic): studies, trials, samples, baselines."""

from .models import TRIAL_STATUSES
from .store import (
    DEFAULT_URL,
    ENV_DB,
    METRIC_COLUMNS,
    BaselineRecord,
    SampleRecord,
    Store,
    StoreError,
    StudyExists,
    StudyNotFound,
    StudyRecord,
    StudySummary,
    TrialRecord,
    default_url,
    display_url,
    optuna_storage,
    utcnow,
)

__all__ = [
    "DEFAULT_URL",
    "ENV_DB",
    "METRIC_COLUMNS",
    "TRIAL_STATUSES",
    "BaselineRecord",
    "SampleRecord",
    "Store",
    "StoreError",
    "StudyExists",
    "StudyNotFound",
    "StudyRecord",
    "StudySummary",
    "TrialRecord",
    "default_url",
    "display_url",
    "optuna_storage",
    "utcnow",
]
