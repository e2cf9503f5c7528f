"""``torchyard serve``'s request handler for werkzeug's server: the limits of api.http_limits, a read timeout
on each connection, and problem+json for every answer the server writes itself (http.server's are HTML)."""

from __future__ import annotations

import re
from email.message import Message
from http import HTTPStatus

from werkzeug.serving import WSGIRequestHandler

from api.errors import ApiError, raw_problem
from api.http_limits import (
    MAX_HEADER_FIELD_BYTES,
    MAX_HEADER_FIELDS,
    MAX_REQUEST_LINE,
    ambiguous_length,
    headers_too_large,
    request_line_too_long,
)
from models.settings import Settings

_DIGITS = re.compile(r"[0-9]+")


class ProblemRequestHandler(WSGIRequestHandler):
    """werkzeug's handler, refusing what gunicorn refuses under ``torchyard api``, each refusal as problem+json."""

    def parse_request(self) -> bool:
        # http.server reads the line and the headers within its own, looser bounds (64 KiB a line, 100 fields);
        # ours are checked on what it read, before the app sees anything.
        if not super().parse_request():
            return False
        problem = head_problem(self.raw_requestline, self.headers)
        if problem is not None:
            self._refuse(problem)
        return problem is None

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own refusals (a bad request line, 414, 431, 505), as problem+json."""
        self._refuse(server_problem(code, message, explain))

    def _refuse(self, problem: ApiError) -> None:
        self.close_connection = True
        self.log_request(problem.status)
        self.wfile.write(raw_problem(problem))


def request_handler(settings: Settings) -> type[ProblemRequestHandler]:
    """The handler class for werkzeug's ``run_simple``/``make_server``: each connection gets
    ``request_read_timeout_seconds`` for each read (socketserver sets it on the socket)."""
    return type("ProblemRequestHandler", (ProblemRequestHandler,), {"timeout": settings.request_read_timeout_seconds})


def head_problem(request_line: bytes, headers: Message) -> ApiError | None:
    """The refusal of a request whose line or headers are past the limits, or whose body's length is ambiguous
    (more than one Content-Length, one beside Transfer-Encoding, a last coding other than chunked), as gunicorn
    refuses them; None when it may go on."""
    if len(request_line.rstrip(b"\r\n")) > MAX_REQUEST_LINE:
        return request_line_too_long()
    too_long = any(len(k) + len(v) + 4 > MAX_HEADER_FIELD_BYTES for k, v in headers.items())  # "k: v\r\n"
    if too_long or len(headers) > MAX_HEADER_FIELDS:
        return headers_too_large()
    lengths = headers.get_all("Content-Length") or []
    codings = ",".join(headers.get_all("Transfer-Encoding") or []).split(",")
    if codings != [""] and (lengths or codings[-1].strip().lower() != "chunked"):
        return ambiguous_length()  # with Transfer-Encoding, the body's length is its chunks' (RFC 9112 §6.3)
    if len(lengths) > 1 or lengths and not _DIGITS.fullmatch(lengths[0].strip()):
        return ambiguous_length()
    return None


def server_problem(status: int, message: str | None, explain: str | None) -> ApiError:
    """The problem for an answer http.server gives by itself; its limits are reported as ours (they are looser)."""
    if status == HTTPStatus.REQUEST_URI_TOO_LONG:
        return request_line_too_long()
    if status == HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE:
        return headers_too_large()
    if status == HTTPStatus.HTTP_VERSION_NOT_SUPPORTED:  # the client's input: a 4xx, as gunicorn answers it
        return ApiError(400, "Bad Request", f"{message or 'unsupported HTTP version'}; speak HTTP/1.1",
                        kind="bad-request")
    return ApiError(status, HTTPStatus(status).phrase, "; ".join(text for text in (message, explain) if text))
