"""Every error leaves the API as RFC 9457 problem+json, built in this one place; never a stack trace."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable

from flask import Flask, Response, request
from werkzeug.exceptions import ClientDisconnected, HTTPException, RequestEntityTooLarge

from api.db import services
from models.quotas import QuotaExceeded
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
# When to ask again after a quota's 429, by quota. A queued job leaves the queue when a worker starts it or
# its owner cancels it, which takes a job's run (minutes) on a busy cluster: asking every 30 s costs one
# cheap request and finds the room soon after it frees. A stream of a few seconds' polling frees a slot sooner.
QUOTA_RETRY_AFTER = {"queued_jobs": 30, "running_jobs": 30, "gpus": 30, "streams": 5}


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
        extensions: dict | None = None,
    ):
        super().__init__(detail or title)
        self.status = status
        self.title = title
        self.detail = detail
        self.kind = kind
        self.errors = list(errors)
        self.headers = headers or {}
        self.extensions = extensions or {}  # RFC 9457 §3.2: members of this problem type beyond the standard ones


def not_found(what: str, ident: str) -> ApiError:
    """The one 404 for a missing row and for another user's row alike (no existence leak)."""
    return ApiError(404, "Not Found", f"no {what} {quoted(ident)}", kind="not-found")


def conflict(detail: str) -> ApiError:
    """A request that can't be done in the resource's current state."""
    return ApiError(409, "Conflict", detail, kind="conflict")


def too_large(what: str, limit: int, setting: str) -> ApiError:
    """413 naming the limit and its setting: ``the request body is larger than N bytes (max_upload_bytes)``."""
    return ApiError(413, "Content Too Large", f"{what} is larger than {limit} bytes ({setting})", kind="too-large")


def quota_exceeded(error: QuotaExceeded) -> ApiError:
    """The one answer of every quota: 429 with Retry-After where waiting frees room, else 403; the quota, its
    limit and the use in the detail and as members ``quota``, ``limit``, ``use``."""
    quota = error.quota
    headers = {"Retry-After": str(QUOTA_RETRY_AFTER[quota.name])} if error.status == 429 else {}
    return ApiError(error.status, "Quota exceeded", str(error), kind="quota-exceeded", headers=headers,
                    extensions={"quota": quota.name, "limit": quota.limit, "use": quota.use})


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
    extensions: dict | None = None,
) -> Response:
    """A problem+json response."""
    body = _problem_json(status, title, detail, kind, errors, extensions)
    response = Response(body, status=status, mimetype=PROBLEM_MIMETYPE)
    response.headers.update(headers or {})
    return response


def raw_problem(error: ApiError) -> bytes:
    """A whole HTTP/1.1 answer carrying ``error`` as problem+json, for a server to write on the socket itself
    (a request it refuses before the app sees it); the connection closes after it."""
    body = _problem_json(error.status, error.title, error.detail, error.kind, error.errors, error.extensions).encode()
    head = [f"HTTP/1.1 {error.status} {error.title}", f"Content-Type: {PROBLEM_MIMETYPE}",
            f"Content-Length: {len(body)}", "Connection: close", *(f"{k}: {v}" for k, v in error.headers.items())]
    return "\r\n".join([*head, "", ""]).encode("latin-1") + body


def _problem_json(status: int, title: str, detail: str, kind: str | None, errors: list[Problem] | None,
                  extensions: dict | None = None) -> str:
    # Extension members first, so that none can replace a standard one.
    body: dict = {**(extensions or {}), "type": TYPE_BASE + kind if kind else "about:blank", "title": title,
                  "status": status}
    if detail:
        body["detail"] = _cut(detail)
    if errors:
        body["errors"] = [{"path": _cut(p.path), "message": _cut(p.message)} for p in errors[:MAX_LISTED]]
    return json.dumps(body)  # ASCII only (ensure_ascii): safe as it is in any answer


def _cut(text: str) -> str:
    return text if len(text) <= MAX_TEXT else f"{text[:MAX_TEXT]}… ({len(text) - MAX_TEXT} more characters)"


def _api_error(error: ApiError) -> Response:
    return problem_response(error.status, error.title, error.detail, error.kind, error.errors, error.headers,
                            error.extensions)


def _quota_exceeded(error: QuotaExceeded) -> Response:
    return _api_error(quota_exceeded(error))


def _http_error(error: HTTPException) -> Response:
    headers = {k: v for k, v in error.get_headers() if k.lower() not in ("content-type", "content-length")}
    kind = "-".join(error.name.lower().split())  # "Method Not Allowed" -> /problems/method-not-allowed
    return problem_response(error.code or 500, error.name, error.description or "", kind, headers=headers)


def _too_large(error: RequestEntityTooLarge) -> Response:
    # werkzeug raises the same error past MAX_CONTENT_LENGTH (the body's limit: max_upload_bytes, set in
    # api/__init__.py) and past its own form limits (a field beside the file, the number of parts).
    if _past_body_limit():
        return _api_error(too_large("the request body", request.max_content_length, "max_upload_bytes"))
    return _api_error(ApiError(
        413, "Content Too Large", f"a form field beside the file is larger than {request.max_form_memory_size} "
        f"bytes, or the form has more than {request.max_form_parts} parts", kind="too-large"))


def _past_body_limit() -> bool:
    limit = request.max_content_length
    if limit is None:
        return False
    if request.content_length is not None:
        return request.content_length > limit
    return getattr(request.stream, "is_exhausted", False)  # a chunked body, read up to the limit


def _incomplete_body(error: ClientDisconnected) -> Response:
    # werkzeug turns any failed read of the body into ClientDisconnected. A read that timed out (the server's
    # request_read_timeout_seconds) is TimeoutError under werkzeug's server and EAGAIN under gunicorn's
    # worker, whose socket times out in the kernel (SO_RCVTIMEO): either way the client stalled, 408.
    if isinstance(error.__context__, (TimeoutError, BlockingIOError)):
        seconds = services().settings.request_read_timeout_seconds
        return problem_response(408, "Request Timeout", f"the request body stalled: nothing of it came for "
                                f"{seconds:g} s (request_read_timeout_seconds)", kind="request-timeout")
    return problem_response(400, "Bad Request", "the request body ended before its announced length",
                            kind="incomplete-body")


def internal_error() -> ApiError:
    """The 500 for an error nobody foresaw: its trace goes to the log, never to the client."""
    return ApiError(500, "Internal Server Error", "an unexpected error happened; it was logged")


def _unexpected(error: Exception) -> Response:
    log.exception("unhandled error", exc_info=error)
    return _api_error(internal_error())


def register_error_handlers(app: Flask) -> None:
    """Route every error the app can raise to problem+json."""
    app.register_error_handler(ApiError, _api_error)
    app.register_error_handler(QuotaExceeded, _quota_exceeded)
    app.register_error_handler(RequestEntityTooLarge, _too_large)
    app.register_error_handler(ClientDisconnected, _incomplete_body)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _unexpected)
