"""Alembic migrations of torchyard's database (plain Alembic; run through ``migrations.apply.upgrade``)."""
