"""Query arguments, each single-valued one given at most once, and opaque cursors for newest-first lists (the
cursor is the last row's created_at, id)."""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
import re

from sqlalchemy import ColumnElement, tuple_
from werkzeug.datastructures import MultiDict

from api.errors import validation_error
from api.gate import JsonRefused, loads
from models.paging import MAX_LIMIT as MAX_LIMIT  # re-exported: the routes' bound, owned by models.paging
from models.spec import Problem
from models.text import quoted, text_problem

# The largest whole number a query argument may carry: an INTEGER column's range on every backend.
MAX_INT = 2**31 - 1
# ASCII digits only: int() would also take "1_000", " 7 " and other scripts' digits, and spend quadratic
# time on thousands of them.
WHOLE_NUMBER = re.compile(r"-?[0-9]{1,10}")
# A cursor this API makes is under 100 characters; a longer one is refused before it is decoded.
MAX_CURSOR_LENGTH = 200
# An ISO 8601 time with microseconds and an offset is 32 characters.
MAX_TIME_LENGTH = 40


def encode_cursor(created_at: dt.datetime, ident: str) -> str:
    """A URL-safe token for the position after the row (created_at, ident)."""
    raw = json.dumps([created_at.isoformat(), ident]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[dt.datetime, str]:
    """The (created_at, id) a cursor holds; 422 when it isn't one this API made."""
    try:
        if text_problem(cursor, MAX_CURSOR_LENGTH):
            raise ValueError(cursor)
        raw = base64.b64decode(cursor + "=" * (-len(cursor) % 4), altchars=b"-_", validate=True)
        value = loads(raw, max_depth=1)
        if not (isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) for v in value)):
            raise ValueError(value)
        created, ident = value
        if text_problem(ident):
            raise ValueError(ident)
        return dt.datetime.fromisoformat(created), ident
    except (ValueError, TypeError, binascii.Error, JsonRefused) as exc:
        raise validation_error(
            [Problem("cursor", "not a cursor from this API; pass next_cursor from the previous page")],
            "Invalid query argument",
        ) from exc


def after_cursor(cursor: str, moment: ColumnElement, ident: ColumnElement) -> ColumnElement[bool]:
    """The condition on the rows after ``cursor`` in a list newest first by (``moment``, ``ident``): below the
    cursor's pair, as one row comparison, so that an index ending in those columns starts the page at the
    cursor rather than filtering every newer row (a deep page costs what the first one does); 422 when the
    cursor isn't one of ours."""
    at, last = decode_cursor(cursor)
    return tuple_(moment, ident) < (at, last)


def one_arg(args: MultiDict[str, str], name: str, default: str | None = None) -> str | None:
    """The value of a query argument that takes one (``default`` when absent), or 422 naming it when given more
    than once: ``?format=text&format=json`` asks for two things, and guessing which is meant hides the mistake."""
    values = args.getlist(name)
    if len(values) > 1:
        raise validation_error([Problem(name, f"given {len(values)} times; it takes one value")],
                               "Invalid query argument")
    return values[0] if values else default


def int_arg(args: MultiDict[str, str], name: str, default: int, low: int, high: int = MAX_INT) -> int:
    """A whole-number query argument in [low, high] (``default`` when absent), or 422 naming it."""
    value = one_arg(args, name)
    if value is None:
        return default
    number = int(value) if WHOLE_NUMBER.fullmatch(value) else None
    if number is None or not low <= number <= high:
        raise validation_error(
            [Problem(name, f"must be a whole number from {low} to {high}, not {quoted(value)}")],
            "Invalid query argument",
        )
    return number


def time_arg(args: MultiDict[str, str], name: str) -> dt.datetime | None:
    """An ISO 8601 date or date and time query argument as an aware UTC datetime (UTC unless it names an
    offset; None when absent), or 422 naming it."""
    value = one_arg(args, name)
    if value is None:
        return None
    try:
        if text_problem(value, MAX_TIME_LENGTH):
            raise ValueError(value)
        # Python 3.10's fromisoformat doesn't take the "Z" of UTC.
        moment = dt.datetime.fromisoformat(value[:-1] + "+00:00" if value.endswith(("Z", "z")) else value)
        moment = moment if moment.tzinfo is not None else moment.replace(tzinfo=dt.timezone.utc)
        # Stored times are UTC, and SQLite compares them as text: the argument must be UTC too.
        return moment.astimezone(dt.timezone.utc)
    except (ValueError, OverflowError) as exc:  # OverflowError: year 1 moved west of UTC, say
        raise validation_error(
            [Problem(name, f"must be an ISO 8601 date or date and time (2027-01-31T12:00:00Z), not {quoted(value)}")],
            "Invalid query argument",
        ) from exc
