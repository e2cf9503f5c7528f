"""Users and their API keys: the one owner of creating, changing and listing them, for the CLI (which talks
to the database directly) and ``torchyard serve``; the API only looks keys up (``key_for_token``, ``refusal``).

Each change commits with its audit event (models.audit). Mistakes an operator can make (an unknown user or
key, a name that isn't stored text, a share of 0) are ``AccountError`` with a message to show as it is.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import math
import re
import secrets
from dataclasses import dataclass

from sqlalchemy import bindparam, func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, joinedload

from models import audit
from models.audit import Someone
from models.quotas import QUOTAS
from models.roles import ROLES
from models.spec import unknown_name_message
from models.tables import ApiKey, User, utcnow
from models.text import label_problem, quoted

TOKEN_PREFIX = "ty_"
# What a listing shows of a key: "ty_" and 7 random characters, enough to tell a user's keys apart, far
# too few to guess the other 36.
PREFIX_LENGTH = 10
# A quota override is a whole number; storage quotas go past 2**31, so the bound is a 64-bit integer's.
MAX_QUOTA = 2**63 - 1
MAX_EXPIRY_DAYS = 36_500
DAYS = re.compile(r"([0-9]{1,5})d")


class AccountError(ValueError):
    """A request about users or keys that can't be done; the message says why."""


@dataclass(frozen=True)
class UserRow:
    """A user as ``torchyard user list`` shows it: the row and how many of its keys still work."""

    user: User
    keys: int


@dataclass(frozen=True)
class KeyRow:
    """An API key as ``torchyard token list`` shows it (never the token or its hash)."""

    key: ApiKey
    user_name: str


def hash_token(token: str) -> str:
    """The stored form of a token (tokens are random, so no slow hash is needed)."""
    return hashlib.sha256(token.encode()).hexdigest()


# --- keys as the API sees them -------------------------------------------------------------------


# key_for_token's query, built once with the hash a bound parameter: building a statement and computing its
# cache key on each request cost more than running it.
_KEY_BY_HASH = select(ApiKey).where(ApiKey.key_hash == bindparam("key_hash")).options(joinedload(ApiKey.user))


def key_for_token(session: Session, token: str) -> ApiKey | None:
    """The key a token names, with its user, in one query (every request pays it); revoked and expired
    keys too, so that ``refusal`` can say which."""
    return session.scalar(_KEY_BY_HASH, {"key_hash": hash_token(token)})


def refusal(key: ApiKey, now: dt.datetime) -> str | None:
    """Why ``key`` no longer authenticates (revoked, expired), or None while it does."""
    if key.revoked_at is not None:
        return f"this API key was revoked on {_moment(key.revoked_at)}"
    if key.expires_at is not None and _aware(key.expires_at) <= now:
        return f"this API key expired on {_moment(key.expires_at)}"
    return None


# --- users ---------------------------------------------------------------------------------------


def find_user(session: Session, name: str) -> User | None:
    """The user called ``name``, or None."""
    return session.scalar(select(User).where(User.name == name))


def get_user(session: Session, name: str) -> User:
    """The user called ``name``; AccountError when there is none."""
    _check_name("user name", name)
    user = find_user(session, name)
    if user is None:
        raise AccountError(f"no user {quoted(name)} (torchyard user list shows the users)")
    return user


def create_user(session: Session, name: str, *, role: str = "user", share: float = 1.0,
                actor: Someone | None = None) -> User:
    """Create a user and commit; AccountError when the name is taken or not stored text."""
    _check_name("user name", name)
    _check_role(role)
    _check_share(share)
    if find_user(session, name) is not None:
        raise AccountError(f"user {quoted(name)} exists already")
    user = _add_user(session, name, role, share, actor or audit.cli_actor())
    try:
        session.commit()
    except IntegrityError:  # created meanwhile by someone else
        session.rollback()
        raise AccountError(f"user {quoted(name)} exists already") from None
    return user


def users(session: Session, now: dt.datetime | None = None) -> list[UserRow]:
    """Every user by name, with the number of keys that still work."""
    working = (select(ApiKey.user_id, func.count().label("working")).where(*_working(now or utcnow()))
               .group_by(ApiKey.user_id).subquery())
    rows = session.execute(select(User, func.coalesce(working.c.working, 0))
                           .outerjoin(working, working.c.user_id == User.id).order_by(User.name)).all()
    return [UserRow(user, keys) for user, keys in rows]


def set_quota(session: Session, name: str, quota: str, value: int | None, actor: Someone | None = None) -> User:
    """Override one of the user's quotas with ``value``, or drop the override (None: the deployment's
    default applies again); commit."""
    if quota not in QUOTAS:
        raise AccountError(unknown_name_message(quota, "quota", list(QUOTAS)))
    if value is not None and not 0 <= value <= MAX_QUOTA:
        raise AccountError(f"a quota is a whole number from 0 to {MAX_QUOTA}, not {value}")
    user = get_user(session, name)
    overrides = dict(user.quotas or {})  # a new dict: the JSON column sees only a replaced value
    if value is None:
        overrides.pop(quota, None)
    else:
        overrides[quota] = value
    user.quotas = overrides or None
    audit.record(session, actor or audit.cli_actor(), "user_set_quota", user.id, user=user.name, quota=quota,
                 value=value)
    session.commit()
    return user


def set_share(session: Session, name: str, share: float, actor: Someone | None = None) -> User:
    """Set the user's weight in fair-share dispatch (above 0); commit."""
    _check_share(share)
    user = get_user(session, name)
    user.share = share
    audit.record(session, actor or audit.cli_actor(), "user_set_share", user.id, user=user.name, share=share)
    session.commit()
    return user


def set_role(session: Session, name: str, role: str, actor: Someone | None = None) -> User:
    """Make the user a plain ``user`` or an ``admin``; commit."""
    _check_role(role)
    user = get_user(session, name)
    user.role = role
    audit.record(session, actor or audit.cli_actor(), "user_set_role", user.id, user=user.name, role=role)
    session.commit()
    return user


# --- keys ----------------------------------------------------------------------------------------


def create_api_key(session: Session, user_name: str, key_name: str, expires_at: dt.datetime | None = None,
                   actor: Someone | None = None) -> str:
    """Make an API key for ``user_name`` (creating the user if missing), commit, return the token once;
    ValueError (AccountError) when a name isn't stored text (models.text's rule)."""
    for what, value in (("user name", user_name), ("key name", key_name)):
        _check_name(what, value)
    actor = actor or audit.cli_actor()
    user = find_user(session, user_name) or _add_user(session, user_name, "user", 1.0, actor)
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey(user_id=user.id, name=key_name, key_hash=hash_token(token), prefix=token[:PREFIX_LENGTH],
                 expires_at=expires_at)
    session.add(key)
    session.flush()  # the key's id, for its event
    audit.record(session, actor, "token_create", key.id, user=user.name, name=key_name, prefix=key.prefix,
                 expires_at=None if expires_at is None else _moment(expires_at))
    session.commit()
    return token


def keys(session: Session, user_name: str | None = None) -> list[KeyRow]:
    """Every API key (or the user's), by user name and age."""
    query = select(ApiKey, User.name).join(User, User.id == ApiKey.user_id)
    if user_name is not None:
        query = query.where(ApiKey.user_id == get_user(session, user_name).id)
    rows = session.execute(query.order_by(User.name, ApiKey.created_at, ApiKey.id)).all()
    return [KeyRow(key, name) for key, name in rows]


def revoke_key(session: Session, key_name: str, user_name: str | None = None, actor: Someone | None = None,
               now: dt.datetime | None = None) -> list[KeyRow]:
    """Revoke the user's unrevoked keys called ``key_name`` (without a user: the one user who has such
    keys); commit. The API refuses them from its next request on."""
    _check_name("key name", key_name)
    query = (select(ApiKey, User.name).join(User, User.id == ApiKey.user_id)
             .where(ApiKey.name == key_name, ApiKey.revoked_at.is_(None)))
    if user_name is not None:
        query = query.where(ApiKey.user_id == get_user(session, user_name).id)
    rows = [KeyRow(key, name) for key, name in session.execute(query.order_by(ApiKey.created_at)).all()]
    whose = f" of user {quoted(user_name)}" if user_name is not None else ""
    if not rows:
        raise AccountError(f"no unrevoked API key {quoted(key_name)}{whose} (torchyard token list shows the keys)")
    owners = sorted({row.user_name for row in rows})
    if len(owners) > 1:
        raise AccountError(f"users {', '.join(map(quoted, owners))} each have an API key {quoted(key_name)}: "
                           "name the user")
    now, actor = now or utcnow(), actor or audit.cli_actor()
    for row in rows:
        row.key.revoked_at = now
        audit.record(session, actor, "token_revoke", row.key.id, user=row.user_name, name=key_name,
                     prefix=row.key.prefix)
    session.commit()
    return rows


def expiry(text: str, now: dt.datetime) -> dt.datetime:
    """When a key given ``--expires`` ends: ``30d`` (days from ``now``), a date (its midnight, UTC) or a
    date and time (UTC unless it says otherwise); AccountError when it isn't one, or isn't in the future."""
    days = DAYS.fullmatch(text)
    if days:
        count = int(days.group(1))
        if not 1 <= count <= MAX_EXPIRY_DAYS:
            raise AccountError(f"--expires: from 1d to {MAX_EXPIRY_DAYS}d, not {text}")
        return now + dt.timedelta(days=count)
    try:
        moment = _aware(dt.datetime.fromisoformat(text.removesuffix("Z") + ("+00:00" if text.endswith("Z") else "")))
    except ValueError:
        raise AccountError(f"--expires: a number of days (30d), a date (2027-01-31) or an ISO 8601 date and "
                           f"time, not {quoted(text)}") from None
    if moment <= now:
        raise AccountError(f"--expires: {_moment(moment)} is not in the future")
    return moment


def quota_value(text: str) -> int | None:
    """A quota override as the CLI takes it: a whole number, or ``default`` (None: drop the override)."""
    if text == "default":
        return None
    if not re.fullmatch(r"[0-9]{1,19}", text):
        raise AccountError(f"a quota is a whole number or 'default', not {quoted(text)}")
    return int(text)


# --- rules -----------------------------------------------------------------------------------------


def _add_user(session: Session, name: str, role: str, share: float, actor: Someone) -> User:
    user = User(name=name, role=role, share=share)
    session.add(user)
    session.flush()  # the user's id, for its event and its keys
    audit.record(session, actor, "user_create", user.id, user=name, role=role, share=share)
    return user


def _working(now: dt.datetime) -> tuple:
    return ApiKey.revoked_at.is_(None), or_(ApiKey.expires_at.is_(None), ApiKey.expires_at > now)


def _check_name(what: str, value: str) -> None:
    problem = label_problem(value)
    if not problem and what == "user name" and (value == "cli" or value.startswith("cli:")):
        problem = "'cli' names the command line in the audit log; pick another name"
    if problem:
        raise AccountError(f"{what} {quoted(value)}: {problem}")


def _check_role(role: str) -> None:
    if role not in ROLES:
        raise AccountError(unknown_name_message(role, "role", list(ROLES)))


# Shares are weights relative to each other: a million to one is as uneven as fair share needs.
MIN_SHARE, MAX_SHARE = 1e-3, 1e3


def _check_share(share: float) -> None:
    if not (math.isfinite(share) and MIN_SHARE <= share <= MAX_SHARE):
        raise AccountError(f"a share is a number from {MIN_SHARE:g} to {MAX_SHARE:g}, not {share}")


def _aware(moment: dt.datetime) -> dt.datetime:
    """SQLite hands stored times back without a zone (they are UTC)."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=dt.timezone.utc)


def _moment(moment: dt.datetime) -> str:
    return _aware(moment).astimezone(dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
