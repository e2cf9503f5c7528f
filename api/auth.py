"""Bearer API keys: ``Authorization: Bearer ty_…``, looked up by SHA-256 (only the hash is stored)."""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
from typing import TypeVar

from flask import g
from flask import request as flask_request
from sqlalchemy import select
from sqlalchemy.orm import Session, joinedload

from api.db import get_session
from api.errors import ApiError, not_found
from api.schemas import as_utc
from models.tables import ApiKey, User, utcnow
from models.text import quoted, text_problem

TOKEN_PREFIX = "ty_"
# Recording last use on every request would turn each read into a write; once a minute is enough.
LAST_USED_RESOLUTION = dt.timedelta(minutes=1)
T = TypeVar("T")


def hash_token(token: str) -> str:
    """The stored form of a token."""
    return hashlib.sha256(token.encode()).hexdigest()


def create_api_key(session: Session, user_name: str, key_name: str) -> str:
    """Make an API key for ``user_name`` (creating the user if missing), commit, return the token once;
    ValueError when a name isn't stored text (models.text's rule)."""
    for what, value in (("user name", user_name), ("key name", key_name)):
        problem = text_problem(value) if value else "empty"
        if problem:
            raise ValueError(f"{what} {quoted(value)}: {problem}")
    user = session.scalar(select(User).where(User.name == user_name))
    if user is None:
        user = User(name=user_name)
        session.add(user)
        session.flush()
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    session.add(ApiKey(user_id=user.id, name=key_name, key_hash=hash_token(token)))
    session.commit()
    return token


def _unauthorized(detail: str) -> ApiError:
    return ApiError(
        401,
        "Unauthorized",
        detail,
        kind="unauthorized",
        headers={"WWW-Authenticate": 'Bearer realm="torchyard"'},
    )


def require_user() -> None:
    """``before_request`` hook: resolve the bearer token to ``g.user`` or answer 401."""
    header = flask_request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise _unauthorized("send an API key as 'Authorization: Bearer ty_…'")
    session = get_session()
    key = session.scalar(
        select(ApiKey)
        .where(ApiKey.key_hash == hash_token(token.strip()), ApiKey.revoked_at.is_(None))
        .options(joinedload(ApiKey.user))  # one query for the key and its user: every request pays it
    )
    if key is None:
        raise _unauthorized("the API key is not valid")
    now = utcnow()
    if key.last_used_at is None or as_utc(key.last_used_at) < now - LAST_USED_RESOLUTION:
        key.last_used_at = now
        session.commit()
    g.user = key.user


def current_user() -> User:
    """The authenticated caller of this request."""
    return g.user


def owned(session: Session, model: type[T], ident: str, what: str) -> T:
    """The caller's row of ``model`` with this id; another user's row is the same 404 as a missing one.
    An id that isn't stored text (a NUL, 10 KB) names no row: 404 without asking the database, which
    may refuse it (PostgreSQL and NUL) rather than find nothing."""
    if text_problem(ident):
        raise not_found(what, ident)
    row = session.scalar(select(model).where(model.id == ident, model.user_id == current_user().id))
    if row is None:
        raise not_found(what, ident)
    return row
