"""Alembic's entry point: which database, which models, and how to compare them.

The URL comes, in order, from ``config.attributes["database_url"]`` (migrations.apply.upgrade),
``-x url=...`` on the command line, ``sqlalchemy.url`` in the ini file, then the TORCHYARD_* settings.
"""

from __future__ import annotations

from logging.config import fileConfig

from alembic import context

from models.db import make_engine
from models.settings import get_settings
from models.tables import Base

config = context.config
target_metadata = Base.metadata

# A program that migrates on start (torchyard serve) keeps its own logging setup.
if config.config_file_name is not None and config.attributes.get("configure_logger", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)


def database_url() -> str:
    """The URL to migrate, by the precedence in this module's docstring."""
    return (
        config.attributes.get("database_url")
        or context.get_x_argument(as_dictionary=True).get("url")
        or config.get_main_option("sqlalchemy.url")
        or get_settings().database_url
    )


def configure(**kwargs) -> None:
    url = kwargs.get("url") or kwargs["connection"].engine.url
    context.configure(
        target_metadata=target_metadata,
        # SQLite can't ALTER most things; batch mode rebuilds the table instead.
        render_as_batch=str(url).startswith("sqlite"),
        compare_type=True,
        **kwargs,
    )


def run_migrations_offline() -> None:
    configure(url=database_url(), literal_binds=True, dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:  # a caller (a test) lends its own connection
        configure(connection=connection)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = make_engine(database_url())
    try:
        with engine.connect() as connection:
            configure(connection=connection)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
