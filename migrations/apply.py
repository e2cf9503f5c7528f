"""Bring a database to the newest schema with Alembic, from code (``torchyard db upgrade``, ``serve``)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy.engine import make_url

MIGRATIONS_DIR = Path(__file__).resolve().parent  # env.py, alembic.ini and versions/ lie beside this module


def alembic_config(database_url: str) -> Config:
    """Alembic's config for the packaged migrations, aimed at ``database_url``."""
    config = Config(str(MIGRATIONS_DIR / "alembic.ini"))
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["database_url"] = database_url
    config.attributes["configure_logger"] = False
    return config


def upgrade(database_url: str, revision: str = "head") -> None:
    """Run ``alembic upgrade head`` against ``database_url`` (a SQLite file's folder is created)."""
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        Path(url.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    command.upgrade(alembic_config(database_url), revision)


def downgrade(database_url: str, revision: str = "base") -> None:
    """Run ``alembic downgrade`` to ``revision`` (default: an empty database)."""
    command.downgrade(alembic_config(database_url), revision)
