"""Query arguments and opaque cursors for newest-first lists (the cursor is the last row's created_at, id)."""

from __future__ import annotations

import base64
import datetime as dt
import json
from collections.abc import Mapping

from api.errors import validation_error
from models.spec import Problem

MAX_LIMIT = 100
# The largest whole number a query argument may carry: an INTEGER column's range on every backend.
MAX_INT = 2**31 - 1


def encode_cursor(created_at: dt.datetime, ident: str) -> str:
    """A URL-safe token for the position after the row (created_at, ident)."""
    raw = json.dumps([created_at.isoformat(), ident]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[dt.datetime, str]:
    """The (created_at, id) a cursor holds; 422 when it isn't one this API made."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created, ident = json.loads(raw)
        return dt.datetime.fromisoformat(created), str(ident)
    except (ValueError, TypeError) as exc:
        raise validation_error(
            [Problem("cursor", "not a cursor from this API; pass next_cursor from the previous page")],
            "Invalid query argument",
        ) from exc


def int_arg(args: Mapping[str, str], name: str, default: int, low: int, high: int | None = None) -> int:
    """A whole-number query argument in [low, high] (``default`` when absent), or 422 naming it."""
    value = args.get(name)
    if value is None:
        return default
    try:
        number = int(value)
    except ValueError:
        number = None
    if number is None or number < low or (high is not None and number > high):
        bound = f"from {low} to {high}" if high is not None else f"of {low} or more"
        raise validation_error(
            [Problem(name, f"must be a whole number {bound}, not {value!r}")], "Invalid query argument"
        )
    return number
