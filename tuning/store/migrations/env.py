"""Alembic environment: runs on the connection that :class:`tuning.store.Store` hands over."""

from alembic import context
from sqlalchemy import create_engine

from tuning.store.models import Base

VERSION_TABLE = "ffnskip_alembic_version"

config = context.config


def _include_object(obj, name, type_, reflected, compare_to):
    # Autogenerate must never touch Optuna's tables (or anything else) in a shared database.
    if type_ == "table":
        return name.startswith("ffnskip_")
    return True


def _configure(connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        version_table=VERSION_TABLE,
        include_object=_include_object,
        render_as_batch=connection.dialect.name == "sqlite",
    )


connection = config.attributes.get("connection")
if connection is not None:
    _configure(connection)
    with context.begin_transaction():
        context.run_migrations()
else:  # the alembic command line (``-x url=...`` or sqlalchemy.url in the ini file)
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option("sqlalchemy.url")
    with create_engine(url).connect() as conn:
        _configure(conn)
        with context.begin_transaction():
            context.run_migrations()
