"""Alembic migrations of torchyard's database (plain Alembic; run through ``models.migrate.upgrade``)."""
