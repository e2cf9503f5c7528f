"""Live metrics and logs as Server-Sent Events: each new epoch row an ``event: metrics``, then ``event: status``;
each new log line an ``event: log``, then ``event: end``.

The stream polls the database with a fresh short-lived session each time, so no connection or transaction
stays open while it waits; the request's own session is closed when the view returns, before the stream.
A stream holds a server thread while open, so it is admitted only within the limits of api/stream_slots.py
and gives its slot back when the response closes: when it ends, or when a write to a client that hung up
fails (keep-alives every few seconds make that write happen soon).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from flask import Request, Response, current_app
from pydantic import BaseModel
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from werkzeug.datastructures import MultiDict

from api import epoch_rows
from api.auth import bearer_key
from api.db import get_session, services
from api.errors import validation_error
from api.pagination import MAX_INT, int_arg, one_arg
from api.presenters import job_out, log_line_out
from api.schemas import to_json
from api.stream_slots import LEASE_SECONDS, stream_gate
from models.accounts import refusal
from models.spec import Problem
from models.tables import FINISHED_STATUSES, ApiKey, Job, LogLine, utcnow

EVENT_STREAM = "text/event-stream"
STREAM_FLAGS = {"1": True, "true": True, "0": False, "false": False, "": False}
# Defaults of the tuning knobs; the app's config (METRICS_STREAM_*) may override them, e.g. in tests.
POLL_SECONDS = 0.5
# A write to a client that hung up fails at the second write after it left: so a closed client's thread and
# slot are freed within two keep-alives.
KEEPALIVE_SECONDS = 2.0
# A stream ends after this long (the client reconnects with Last-Event-ID), so no request lives forever.
MAX_SECONDS = 3600.0
# How long an EventSource waits before reconnecting after the stream ends.
RETRY_MILLISECONDS = 1000
# How often an open stream asks whether the API key that opened it was revoked or expired meanwhile.
KEY_CHECK_SECONDS = 5.0


def wants_stream(request: Request) -> bool:
    """True for ``?stream=1`` (or ``true``), or an Accept header that prefers text/event-stream over JSON."""
    flag = one_arg(request.args, "stream")
    if flag is not None:
        if flag.lower() not in STREAM_FLAGS:
            raise validation_error(
                [Problem("stream", f"must be true, false, 1 or 0, not {flag!r}")], "Invalid query argument"
            )
        return STREAM_FLAGS[flag.lower()]
    return request.accept_mimetypes.best_match(["application/json", EVENT_STREAM]) == EVENT_STREAM


def resume_epoch(request: Request, since_epoch: int) -> int:
    """The last epoch (of a log: the last seq) the client has: a reconnect's ``Last-Event-ID`` header wins over
    ``since_epoch``."""
    header = request.headers.get("Last-Event-ID")
    if header is None:
        return since_epoch
    return int_arg(MultiDict({"Last-Event-ID": header.strip()}), "Last-Event-ID", since_epoch, 0, MAX_INT)


# What a stream reads each poll: the job's new rows after the last one sent, each as (its id, its SSE event).
Reader = Callable[[Session, str, int], list[tuple[int, str]]]


def metrics_stream(sessions: sessionmaker[Session], user_id: str, job_id: str, since_epoch: int,
                   owner: str) -> Response:
    """The SSE response that follows a job's metrics from after ``since_epoch`` until the job finishes, if
    the stream limits admit another stream of ``user_id`` (else 429); ``owner`` names the job's user."""
    return job_stream(sessions, user_id, job_id, since_epoch, _epoch_events,
                      lambda job: sse("status", job_out(job, owner)))


def logs_stream(sessions: sessionmaker[Session], user_id: str, job_id: str, since_seq: int) -> Response:
    """The SSE response that follows a job's log lines from after ``since_seq``: an ``end`` event once the job
    has finished and every line was sent; admitted as ``metrics_stream`` is."""
    return job_stream(sessions, user_id, job_id, since_seq, _log_events,
                      lambda job: sse("end", {"status": job.status}))


def job_stream(sessions: sessionmaker[Session], user_id: str, job_id: str, after: int, read: Reader,
               finished: Callable[[Job], str]) -> Response:
    """The SSE response that follows what ``read`` gives of a job after ``after``, ending with ``finished(job)``
    once the job has finished, if the stream limits admit another stream of ``user_id`` (else 429)."""
    config, settings = current_app.config, services().settings
    # Admitted over the request's own session: a thread waiting its turn holds a pooled connection already,
    # and the one whose turn it is must not wait for another.
    admitted = stream_gate(current_app).admit(
        get_session(), sessions, settings, user_id,
        lease=config.get("METRICS_STREAM_SLOT_LEASE_SECONDS", LEASE_SECONDS),
    )
    key_holds = key_in_force(sessions, bearer_key().id, config.get("METRICS_STREAM_KEY_CHECK_SECONDS",
                                                                     KEY_CHECK_SECONDS))
    try:
        events = follow_job(
            sessions,
            job_id,
            after,
            read=read,
            finished=finished,
            poll=config.get("METRICS_STREAM_POLL_SECONDS", POLL_SECONDS),
            keepalive=config.get("METRICS_STREAM_KEEPALIVE_SECONDS", KEEPALIVE_SECONDS),
            max_seconds=config.get("METRICS_STREAM_MAX_SECONDS", MAX_SECONDS),
            keep=lambda: admitted.keep() and key_holds(),
        )
        # No caching, and no buffering by a reverse proxy (nginx honours X-Accel-Buffering).
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        response = Response(events, mimetype=EVENT_STREAM, headers=headers)
    except BaseException:
        admitted.release()
        raise
    # Every WSGI server closes the response once it is done with it, also after a failed write.
    response.call_on_close(admitted.release)
    return response


def key_in_force(sessions: sessionmaker[Session], key_id: str, every: float) -> Callable[[], bool]:
    """Whether the API key that opened a stream still authenticates (models.accounts' rule), read again at
    most every ``every`` seconds: a key revoked (or expired) while its streams run ends them too."""
    checked, holds = time.monotonic(), True

    def check() -> bool:
        nonlocal checked, holds
        if holds and time.monotonic() - checked >= every:
            with sessions() as session:
                key = session.get(ApiKey, key_id)
                holds = key is not None and refusal(key, utcnow()) is None
            checked = time.monotonic()
        return holds

    return check


def follow_job(
    sessions: sessionmaker[Session],
    job_id: str,
    after: int,
    *,
    read: Reader,
    finished: Callable[[Job], str],
    poll: float,
    keepalive: float,
    max_seconds: float,
    keep: Callable[[], bool] = lambda: True,
) -> Iterator[str]:
    """SSE text: the events ``read`` gives as they appear, ``finished(job)`` when the job has finished,
    keep-alives between; it ends after ``finished``, when the job is gone, after ``max_seconds``, or when
    ``keep`` (called each poll: it renews the stream's slot) says the stream may no longer run."""
    started = last_sent = time.monotonic()
    yield f"retry: {RETRY_MILLISECONDS}\n\n"
    while True:
        job, events = _poll(sessions, job_id, after, read)
        for key, event in events:
            yield event
            after, last_sent = key, time.monotonic()
        if job is None:
            return  # deleted while followed
        # A full page (api.epoch_rows reads METRICS_PAGE rows a poll): more rows wait already, read them now.
        more = len(events) >= epoch_rows.METRICS_PAGE
        if job.status in FINISHED_STATUSES and not more:
            yield finished(job)
            return
        now = time.monotonic()
        if now - started >= max_seconds or not keep():
            return
        if now - last_sent >= keepalive:
            yield ": keep-alive\n\n"
            last_sent = now
        if not more:
            time.sleep(poll)


def _poll(sessions: sessionmaker[Session], job_id: str, after: int, read: Reader) -> tuple[Job | None, list]:
    # The job is read before its rows: a job seen finished has all its epoch rows and log lines committed
    # already, so the rows read next include the last ones, also where each statement sees its own snapshot.
    with sessions() as session:
        job = session.get(Job, job_id)
        events = read(session, job_id, after)
        if job is not None:
            session.expunge(job)
    return job, events


def _epoch_events(session: Session, job_id: str, after: int) -> list[tuple[int, str]]:
    rows, _next = epoch_rows.page(session, job_id, after)  # a stream opened on a long job reads it a page a poll
    return [(epoch, sse("metrics", {"epoch": epoch, **values}, event_id=str(epoch))) for epoch, values in rows]


def _log_events(session: Session, job_id: str, after: int) -> list[tuple[int, str]]:
    return [(line.seq, sse("log", log_line_out(line), event_id=str(line.seq)))
            for line in log_lines(session, job_id, after)]


def log_lines(session: Session, job_id: str, after: int) -> list[LogLine]:
    """A job's log lines after seq ``after``, in order."""
    return list(session.scalars(select(LogLine).where(LogLine.job_id == job_id, LogLine.seq > after)
                                .order_by(LogLine.seq)))


def sse(event: str, data: BaseModel | dict[str, Any], event_id: str | None = None) -> str:
    """One event in the text/event-stream format, its data written as a response body is (``to_json``: compact
    JSON holds no newline, so one data line)."""
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\ndata: {to_json(data).decode()}\n\n"
