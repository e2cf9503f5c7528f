"""The audit log (models.audit) for admins: who did what, newest first, a page at a time."""

from __future__ import annotations

from flask import Blueprint, request
from sqlalchemy import select

from api.auth import require_admin, require_user
from api.db import get_session
from api.errors import validation_error
from api.pagination import MAX_LIMIT, after_cursor, encode_cursor, int_arg, one_arg, time_arg
from api.schemas import API_PREFIX, AuditEventOut, AuditList, as_utc, json_response
from models.audit import ACTIONS
from models.spec import Problem, unknown_name_message
from models.tables import AuditEvent
from models.text import label_problem

bp = Blueprint("audit", __name__, url_prefix=f"{API_PREFIX}/audit")
bp.before_request(require_user)
bp.before_request(require_admin)

DEFAULT_LIMIT = 50


@bp.get("")
def list_events():
    """Who did what, newest first, a page at a time (admins only).

    ``?user=NAME`` keeps one user's events (``cli:…`` for the command line's), ``?action=`` one action's,
    ``?since=`` (ISO 8601) those at or after a time."""
    args = request.args
    limit = int_arg(args, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
    query = select(AuditEvent)
    user = one_arg(args, "user")
    if user is not None:
        _check("user", label_problem(user))
        query = query.where(AuditEvent.user_name == user)
    action = one_arg(args, "action")
    if action is not None:
        _check("action", None if action in ACTIONS else unknown_name_message(action, "audit action", ACTIONS))
        query = query.where(AuditEvent.action == action)
    since = time_arg(args, "since")
    if since is not None:
        query = query.where(AuditEvent.at >= since)
    cursor = one_arg(args, "cursor")
    if cursor:
        query = query.where(after_cursor(cursor, AuditEvent.at, AuditEvent.id))
    # One row more than the page tells whether a next page exists.
    rows = get_session().scalars(query.order_by(AuditEvent.at.desc(), AuditEvent.id.desc()).limit(limit + 1)).all()
    page = rows[:limit]
    next_cursor = encode_cursor(page[-1].at, page[-1].id) if len(rows) > limit else None
    return json_response(AuditList(events=[_event_out(event) for event in page], next_cursor=next_cursor))


def _check(name: str, problem: str | None) -> None:
    if problem:
        raise validation_error([Problem(name, problem)], "Invalid query argument")


def _event_out(event: AuditEvent) -> AuditEventOut:
    return AuditEventOut(id=event.id, at=as_utc(event.at), user_id=event.user_id, user_name=event.user_name,
                         action=event.action, target=event.target, detail=event.detail)
