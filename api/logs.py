"""A job's own log (worker.job_log writes it): as JSON, as plain text to download, or followed over SSE."""

from __future__ import annotations

from flask import Blueprint, Response, request

from api.auth import current_user, owned, require_user
from api.db import get_session, services
from api.errors import validation_error
from api.pagination import MAX_INT, int_arg, one_arg
from api.presenters import log_line_out
from api.schemas import API_PREFIX, LogsOut, as_utc, json_response
from api.streams import log_lines, logs_stream, resume_epoch, wants_stream
from models.spec import Problem, unknown_name_message
from models.tables import Job, LogLine

bp = Blueprint("logs", __name__, url_prefix=f"{API_PREFIX}/jobs")
bp.before_request(require_user)

FORMATS = ("json", "text")


@bp.get("/<job_id>/logs")
def logs(job_id: str):
    """The job's log lines in order: its start, device and attempts, its warnings, how it ended.
    ``?since_seq=N`` gives only the lines after N (for polling); ``?format=text`` the log as plain text, a line
    a line; with ``Accept: text/event-stream`` (or ``?stream=1``) an SSE stream follows new lines live."""
    session = get_session()
    job = owned(session, Job, job_id, "job")  # read before its lines: a finished job's lines are all there
    since = int_arg(request.args, "since_seq", 0, 0, MAX_INT)
    form = log_format(one_arg(request.args, "format"))
    if form is None and wants_stream(request):
        # As the metrics stream: polled with sessions of its own, held by the caller's stream slots.
        return logs_stream(services().sessions, current_user().id, job.id, resume_epoch(request, since))
    lines = log_lines(session, job.id, since)
    if form == "text":
        return Response("".join(f"{text_line(line)}\n" for line in lines), mimetype="text/plain",
                        headers={"Content-Disposition": f'attachment; filename="{job.id}.log"'})
    return json_response(LogsOut(lines=[log_line_out(line) for line in lines],
                                 last_seq=lines[-1].seq if lines else since, status=job.status))


def log_format(value: str | None) -> str | None:
    """The ``format`` argument (None when absent), or 422 naming it."""
    if value is not None and value not in FORMATS:
        raise validation_error([Problem("format", unknown_name_message(value, "log format", FORMATS))],
                               "Invalid query argument")
    return value


def text_line(line: LogLine) -> str:
    """A log line as the text download writes it: time, level, attempt, text."""
    moment = as_utc(line.created_at).isoformat().replace("+00:00", "Z")
    return f"{moment} {line.level:<7} [attempt {line.attempt}] {line.text}"
