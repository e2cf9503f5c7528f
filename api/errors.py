"""Every error leaves the API as RFC 9457 problem+json, built in this one place; never a stack trace."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable

from flask import Flask, Response
from werkzeug.exceptions import HTTPException

from models.spec import Problem
from models.text import quoted

log = logging.getLogger(__name__)

PROBLEM_MIMETYPE = "application/problem+json"
# Problem types are relative URIs (RFC 9457 §3.1.1), resolved against the API's own address.
TYPE_BASE = "/problems/"
# A problem lists at most this many fields, each message cut to this length: the answer to a hostile body
# stays small, whatever the body held (a megabyte of bad values, a 10 KB key).
MAX_LISTED = 50
MAX_TEXT = 500


class ApiError(Exception):
    """An error a client caused (or may retry), with what RFC 9457 calls its type, title and detail."""

    def __init__(
        self,
        status: int,
        title: str,
        detail: str = "",
        *,
        kind: str | None = None,
        errors: Iterable[Problem] = (),
        headers: dict[str, str] | None = None,
    ):
        super().__init__(detail or title)
        self.status = status
        self.title = title
        self.detail = detail
        self.kind = kind
        self.errors = list(errors)
        self.headers = headers or {}


def not_found(what: str, ident: str) -> ApiError:
    """The one 404 for a missing row and for another user's row alike (no existence leak)."""
    return ApiError(404, "Not Found", f"no {what} {quoted(ident)}", kind="not-found")


def conflict(detail: str) -> ApiError:
    """A request that can't be done in the resource's current state."""
    return ApiError(409, "Conflict", detail, kind="conflict")


def validation_error(problems: list[Problem], title: str = "Validation failed") -> ApiError:
    """422 naming every bad field by its path."""
    first = str(problems[0]) if problems else ""
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return ApiError(422, title, first + more, kind="validation-error", errors=problems)


def problem_response(
    status: int,
    title: str,
    detail: str = "",
    kind: str | None = None,
    errors: list[Problem] | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    """A problem+json response."""
    body: dict = {"type": TYPE_BASE + kind if kind else "about:blank", "title": title, "status": status}
    if detail:
        body["detail"] = _cut(detail)
    if errors:
        body["errors"] = [{"path": _cut(p.path), "message": _cut(p.message)} for p in errors[:MAX_LISTED]]
    response = Response(json.dumps(body), status=status, mimetype=PROBLEM_MIMETYPE)
    response.headers.update(headers or {})
    return response


def _cut(text: str) -> str:
    return text if len(text) <= MAX_TEXT else f"{text[:MAX_TEXT]}… ({len(text) - MAX_TEXT} more characters)"


def _api_error(error: ApiError) -> Response:
    return problem_response(error.status, error.title, error.detail, error.kind, error.errors, error.headers)


def _http_error(error: HTTPException) -> Response:
    headers = {k: v for k, v in error.get_headers() if k.lower() not in ("content-type", "content-length")}
    return problem_response(error.code or 500, error.name, error.description or "", headers=headers)


def _unexpected(error: Exception) -> Response:
    # The trace goes to the log, never to the client.
    log.exception("unhandled error", exc_info=error)
    return problem_response(500, "Internal Server Error", "an unexpected error happened; it was logged")


def register_error_handlers(app: Flask) -> None:
    """Route every error the app can raise to problem+json."""
    app.register_error_handler(ApiError, _api_error)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _unexpected)
