"""Bearer API keys: ``Authorization: Bearer ty_…``, looked up by SHA-256 (only the hash is stored)."""

from __future__ import annotations

import datetime as dt
import functools
from typing import TypeVar

from flask import g
from flask import request as flask_request
from sqlalchemy import ColumnElement, Select, bindparam, select, true
from sqlalchemy.orm import Session

from api.db import get_session
from api.errors import ApiError, not_found
from api.schemas import as_utc
from models.accounts import create_api_key as create_api_key  # re-exported: tests and benches make keys here
from models.accounts import hash_token as hash_token
from models.accounts import key_for_token, refusal
from models.roles import is_admin
from models.tables import ApiKey, User, utcnow
from models.text import text_problem

# Recording last use on every request would turn each read into a write; once a minute is enough.
LAST_USED_RESOLUTION = dt.timedelta(minutes=1)
T = TypeVar("T")


def _unauthorized(detail: str) -> ApiError:
    return ApiError(
        401,
        "Unauthorized",
        detail,
        kind="unauthorized",
        headers={"WWW-Authenticate": 'Bearer realm="torchyard"'},
    )


def require_user() -> None:
    """``before_request`` hook: resolve the bearer token to ``g.user`` or answer 401 (not for OPTIONS, which
    only tells the methods a route takes, as a CORS preflight asks it without credentials)."""
    if flask_request.method == "OPTIONS":
        return
    header = flask_request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise _unauthorized("send an API key as 'Authorization: Bearer ty_…'")
    session = get_session()
    key = bearer_key()
    if key is None:
        raise _unauthorized("the API key is not valid")
    now = utcnow()
    refused = refusal(key, now)
    if refused:
        raise _unauthorized(refused)
    # At most one write a minute per key: a request finding last_used_at younger than that only reads.
    if key.last_used_at is None or as_utc(key.last_used_at) < now - LAST_USED_RESOLUTION:
        key.last_used_at = now
        session.commit()
    g.user = key.user


def bearer_key() -> ApiKey | None:
    """The key this request's bearer token names (revoked and expired ones too: ``refusal`` says so), or None;
    looked up once a request, though the rate limiter (api/rate_limits.py) asks before ``require_user`` does."""
    if "bearer_key" not in g:
        scheme, _, token = flask_request.headers.get("Authorization", "").partition(" ")
        named = scheme.lower() == "bearer" and token.strip()
        g.bearer_key = key_for_token(get_session(), token.strip()) if named else None
    return g.bearer_key


def current_user() -> User:
    """The authenticated caller of this request."""
    return g.user


def require_admin() -> None:
    """``before_request`` hook after ``require_user``: 403 unless the caller is an admin."""
    if not is_admin(current_user()):
        raise ApiError(403, "Forbidden", "admins only", kind="forbidden")


def visible(model: type) -> ColumnElement[bool]:
    """The condition on ``model``'s rows that the caller may see: every row for an admin, their own for a
    user (models.roles)."""
    user = current_user()
    return true() if is_admin(user) else model.user_id == user.id


def owned(session: Session, model: type[T], ident: str, what: str) -> T:
    """The row of ``model`` with this id that the caller may see (``visible``); another user's row is the
    same 404 as a missing one. An id that isn't stored text (a NUL, 10 KB) names no row: 404 without asking
    the database, which may refuse it (PostgreSQL and NUL) rather than find nothing."""
    if text_problem(ident):
        raise not_found(what, ident)
    user = current_user()
    if is_admin(user):
        row = session.scalar(_by_id(model, False), {"ident": ident})
    else:
        row = session.scalar(_by_id(model, True), {"ident": ident, "user_id": user.id})
    if row is None:
        raise not_found(what, ident)
    return row


@functools.cache
def _by_id(model: type, own: bool) -> Select:
    # Built once a model, with bound parameters (as models.accounts' key query): building a statement and its
    # cache key on each request cost about as much as the primary-key lookup it runs. ``own``: ``visible``'s
    # condition for a user who is no admin.
    statement = select(model).where(model.id == bindparam("ident"))
    return statement.where(model.user_id == bindparam("user_id")) if own else statement
