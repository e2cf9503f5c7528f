"""``torchyard api`` under gunicorn: the command line, and a worker class that is gthread's with a read timeout on
each connection and problem+json for the answers gunicorn writes itself (its own are HTML).

Only gunicorn imports this module (and the ``api`` command, for the command line): ``create_app`` doesn't.
"""

from __future__ import annotations

import logging
import socket
import ssl
import struct
from collections.abc import Sequence
from http import HTTPStatus

from gunicorn import util
from gunicorn.http.errors import (
    ExpectationFailed,
    InvalidHeader,
    InvalidResponseHeader,
    InvalidResponseHeaderName,
    LimitRequestHeaders,
    LimitRequestLine,
    ParseException,
)
from gunicorn.workers.gthread import ThreadWorker

from api.errors import ApiError, internal_error, raw_problem
from api.http_limits import ambiguous_length, gunicorn_limit_options, headers_too_large, request_line_too_long
from models.settings import Settings, get_settings

# Headers whose InvalidHeader means gunicorn couldn't tell the body's length from them.
FRAMING_HEADERS = ("CONTENT-LENGTH", "TRANSFER-ENCODING")


def gunicorn_argv(settings: Settings, bind: str, workers: int, options: Sequence[str] = ("--access-logfile", "-"),
                  ) -> list[str]:
    """The gunicorn command line serving the API (``python -m`` it): this module's worker class, the limits,
    and the hooks that keep the metric files of its processes (api/gunicorn_hooks.py); then ``options``
    (``torchyard api``: an access log on stdout; ``torchyard serve`` picks its own).

    ValueError when the settings would let metrics streams take every thread of a process."""
    # Each open metrics stream (SSE) holds a thread; the stream limit keeps some for every other request.
    if settings.max_streams_per_process >= settings.api_threads:
        raise ValueError(
            f"TORCHYARD_MAX_STREAMS_PER_PROCESS ({settings.max_streams_per_process}) must be below "
            f"TORCHYARD_API_THREADS ({settings.api_threads}), so that streams leave threads for other requests")
    return ["gunicorn", "--bind", bind, "--workers", str(workers), "--config", "python:api.gunicorn_hooks",
            "--worker-class", f"{__name__}.ProblemWorker", "--threads", str(settings.api_threads),
            *gunicorn_limit_options(), *options, "api:create_app()"]


class ProblemWorker(ThreadWorker):
    """gthread's worker; a client that sends nothing for ``request_read_timeout_seconds`` is dropped."""

    def init_process(self) -> None:
        """Read the timeout, then run gthread's loop."""
        self.read_timeout = get_settings().request_read_timeout_seconds
        self.log.error_log.addFilter(StalledHeadLog(self.read_timeout))
        super().init_process()

    def handle(self, conn):
        """gthread's, with the read timeout on the connection's socket."""
        # gunicorn turns the socket blocking and back as it waits for requests, which resets a Python timeout
        # (settimeout); the kernel's receive timeout holds through that, for the request line, the headers and
        # the body alike: a read past it fails with EAGAIN.
        set_receive_timeout(conn.sock, self.read_timeout)
        return super().handle(conn)

    def handle_error(self, req, client, addr, exc) -> None:
        """Answer a request gunicorn couldn't serve as problem+json, logged as gunicorn logs it."""
        problem = gunicorn_problem(exc)
        if problem.status == 500:
            self.log.exception("Error handling request")
        else:
            self.log.warning("Invalid request from ip=%s: %s", (addr or ("",))[0], exc)
        try:
            util.write_nonblock(client, raw_problem(problem))
        except OSError:
            self.log.debug("Failed to send error message.")


class StalledHeadLog(logging.Filter):
    """gunicorn logs a read that timed out before the headers ended as a socket error, with its trace: it is a
    client's stall (slowloris), one warning line."""

    def __init__(self, seconds: float):
        super().__init__()
        self.message = f"Request timed out: nothing came for {seconds:g} s (request_read_timeout_seconds)"

    def filter(self, record: logging.LogRecord) -> bool:
        """Turn the socket error of a timed-out read into the warning; pass every other record."""
        if record.exc_info and isinstance(record.exc_info[1], BlockingIOError):
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.msg, record.args, record.exc_info, record.exc_text = self.message, (), None, None
        return True


def set_receive_timeout(sock: socket.socket, seconds: float) -> None:
    """Make each blocking read of ``sock`` fail after ``seconds`` without data (SO_RCVTIMEO)."""
    whole = int(seconds)
    timeval = struct.pack("ll", whole, int((seconds - whole) * 1_000_000))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)


def gunicorn_problem(exc: BaseException) -> ApiError:
    """The problem for an error gunicorn met serving a request, with the status gunicorn gives it."""
    if isinstance(exc, LimitRequestLine):
        return request_line_too_long()
    if isinstance(exc, LimitRequestHeaders):
        return headers_too_large()
    if isinstance(exc, (InvalidResponseHeader, InvalidResponseHeaderName)):
        return internal_error()  # a header the app tried to send: its fault, not the client's
    if isinstance(exc, InvalidHeader) and exc.hdr in FRAMING_HEADERS:
        return ambiguous_length()
    if not isinstance(exc, (ParseException, ssl.SSLError)):
        return internal_error()
    # gunicorn's parse errors that aren't a 400 carry their status (403, 500, 501), but for one.
    status = 417 if isinstance(exc, ExpectationFailed) else getattr(exc, "code", 400)
    return internal_error() if status == 500 else ApiError(status, HTTPStatus(status).phrase, str(exc))
