"""Roles: the one rule of who sees what. A ``user`` sees their own jobs and datasets and only counts of the
workers; an ``admin`` sees every user's jobs and datasets, each worker in detail, and the audit log."""

from __future__ import annotations

from models.tables import User

ROLES = ("user", "admin")
ADMIN = "admin"


def is_admin(user: User) -> bool:
    """Whether ``user`` may see every user's rows."""
    return user.role == ADMIN
