"""The audit log: who did what, when. An event is added in the transaction of the action it records, so it
commits with the action or not at all; a refused request leaves none. Events are only ever inserted, and
deleted once older than ``audit_retention_days`` (``prune``, from the maintenance loop)."""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass
from typing import Any, Protocol

from sqlalchemy import delete
from sqlalchemy.orm import Session

from models.settings import Settings
from models.tables import AuditEvent, utcnow

# What an event's action may be, and what its target names.
ACTIONS = {
    "submit": "a job or a sweep submitted (target: its id)",
    "cancel": "a job or a sweep cancelled, or asked to stop (target: its id)",
    "delete": "a job, a sweep or a dataset deleted (target: its id)",
    "download": "weights, a bundle or a checkpoint downloaded (target: the job)",
    "upload": "a dataset uploaded (target: the dataset)",
    "user_create": "a user created (target: the user)",
    "user_set_quota": "a user's quota overridden, or its override dropped (target: the user)",
    "user_set_share": "a user's fair share changed (target: the user)",
    "user_set_role": "a user's role changed (target: the user)",
    "token_create": "an API key created (target: the key)",
    "token_revoke": "an API key revoked (target: the key)",
}
# The user id of events done at the command line: no user row has it (theirs begin with usr_).
CLI_ID = "cli"


class Someone(Protocol):
    """Whoever acted: a User of the API, or an Actor at the command line."""

    id: str
    name: str


@dataclass(frozen=True)
class Actor:
    """Someone who acts outside the API, and so has no user row."""

    id: str
    name: str


def cli_actor() -> Actor:
    """The person at the command line, by their account on this machine: ``cli:root``."""
    try:
        import pwd

        account = pwd.getpwuid(os.getuid()).pw_name
    except (ImportError, KeyError):  # not POSIX, or a container's uid without a passwd entry
        account = f"uid {os.getuid()}" if hasattr(os, "getuid") else "unknown"
    return Actor(CLI_ID, f"cli:{account}")


def record(session: Session, user: Someone, action: str, target: str | None = None, /,
           **detail: Any) -> AuditEvent:
    """Add an event to the caller's transaction (it commits with the action, or not at all); ``detail``
    holds JSON values (its names are free: the other parameters are positional only)."""
    if action not in ACTIONS:
        raise ValueError(f"no audit action {action!r}; actions: {', '.join(ACTIONS)}")
    event = AuditEvent(at=utcnow(), user_id=user.id, user_name=user.name, action=action, target=target,
                       detail=detail or None)
    session.add(event)
    return event


def prune(session: Session, settings: Settings, now: dt.datetime) -> int:
    """Delete the events older than ``audit_retention_days`` before ``now``, in the caller's transaction
    (the caller commits); how many were deleted."""
    cutoff = now - dt.timedelta(days=settings.audit_retention_days)
    return session.execute(delete(AuditEvent).where(AuditEvent.at < cutoff)).rowcount
