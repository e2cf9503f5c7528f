"""The jobs resource: submit, list, read, follow metrics, cancel, delete."""

from __future__ import annotations

import logging

from flask import Blueprint, request
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from api import epoch_rows
from api.auth import current_user, owned, require_user, visible
from api.db import get_session, services
from api.errors import conflict, not_found, validation_error
from api.pagination import MAX_INT, MAX_LIMIT, after_cursor, encode_cursor, int_arg, one_arg
from api.presenters import SUMMARY_COLUMNS, job_out, job_summary
from api.schemas import API_PREFIX, MetricsOut, json_response, no_content
from api.streams import metrics_stream, resume_epoch, wants_stream
from api.submit import spec_body, submit_job
from api.tags import label_filters
from models import audit, lifecycle
from models.experiments import labelled
from models.quotas import restate_stored_bytes
from models.spec import Problem, unknown_name_message
from models.storage import job_prefix
from models.tables import JOB_STATUSES, Artifact, EpochMetrics, Job, Sweep, User

log = logging.getLogger(__name__)

bp = Blueprint("jobs", __name__, url_prefix=f"{API_PREFIX}/jobs")
bp.before_request(require_user)

DEFAULT_LIMIT = 20
# A list's query but for its conditions and page size, built once: building the select of 27 columns each
# request cost ~300 Python calls.
LISTED = (select(*SUMMARY_COLUMNS, User.name.label("owner")).join(User, User.id == Job.user_id)
          .order_by(Job.created_at.desc(), Job.id.desc()))
# How a job that ended is said in a refusal to cancel it.
ENDED_ALREADY = {"succeeded": "has already succeeded", "failed": "has already failed",
                 "cancelled": "has already been cancelled"}


@bp.post("")
def submit():
    """Submit a spec: 201 with the new job, or 200 with the job an earlier request of this key made."""
    job, created = submit_job(
        get_session(),
        current_user(),
        spec_body(request, services().settings),
        request.headers.get("Idempotency-Key"),
        services(),
    )
    headers = {"Location": f"{API_PREFIX}/jobs/{job.id}"}
    return json_response(job_out(job, current_user().name), status=201 if created else 200, headers=headers)


@bp.get("")
def list_jobs():
    """The caller's jobs (an admin's: every user's), newest first, a page at a time.
    ``?status=``, ``?experiment=`` and ``?tag=`` (repeatable: a job must carry each) narrow them."""
    limit = int_arg(request.args, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
    query = LISTED.where(visible(Job))
    status = one_arg(request.args, "status")
    if status is not None:
        if status not in JOB_STATUSES:
            raise validation_error(
                [Problem("status", unknown_name_message(status, "job status", JOB_STATUSES))],
                "Invalid query argument",
            )
        query = query.where(Job.status == status)
    query = labelled(query, *label_filters(request.args))
    cursor = one_arg(request.args, "cursor")
    if cursor:
        query = query.where(after_cursor(cursor, Job.created_at, Job.id))
    # One row more than the page tells whether a next page exists.
    rows = get_session().execute(query.limit(limit + 1)).all()
    page = rows[:limit]
    next_cursor = encode_cursor(page[-1].created_at, page[-1].id) if len(rows) > limit else None
    return json_response({"jobs": [job_summary(row, row.owner) for row in page], "next_cursor": next_cursor})


@bp.get("/<job_id>")
def get_job(job_id: str):
    """One job: status, progress, attempts, best metric, reasons, timestamps, spec."""
    session = get_session()
    job = owned(session, Job, job_id, "job")
    return json_response(job_out(job, owner_name(session, job)))


@bp.get("/<job_id>/metrics")
def metrics(job_id: str):
    """Per-epoch metrics in epoch order, a page (``METRICS_PAGE`` epochs) at a time: ``?since_epoch=N`` gives the
    epochs after N (for polling; ``next_since_epoch`` is the N of the next page), ``?max_points=N`` at most N of
    them, evenly spaced, the first and the last always (for charts). With ``Accept: text/event-stream`` (or
    ``?stream=1``) an SSE stream follows new epochs live."""
    session = get_session()
    job = owned(session, Job, job_id, "job")
    since = int_arg(request.args, "since_epoch", 0, 0, MAX_INT)
    most = int_arg(request.args, "max_points", 0, 2, epoch_rows.METRICS_PAGE)  # 0 (absent): a page
    if wants_stream(request):
        if most:  # a stream sends every epoch as it comes: a sample of epochs not yet trained can't be drawn
            raise validation_error([Problem("max_points", "a stream sends every epoch; ask without max_points, or "
                                                          "for a sample without a stream")], "Invalid query argument")
        # The stream polls with sessions of its own; the request's session closes when this view returns.
        # The caller holds the stream (an admin following another's job uses the admin's stream slots).
        return metrics_stream(services().sessions, current_user().id, job.id, resume_epoch(request, since),
                              owner_name(session, job))
    if most:
        rows, next_since = epoch_rows.sample(session, job.id, since, most), None  # the sample spans them all
    else:
        rows, next_since = epoch_rows.page(session, job.id, since)
    return json_response(MetricsOut(metrics=[{"epoch": epoch, **values} for epoch, values in rows],
                                    status=job.status, next_since_epoch=next_since))


@bp.post("/<job_id>/cancel")
def cancel(job_id: str):
    """A queued job is cancelled at once (200); a running one is asked to stop at its next batch (202)."""
    session = get_session()
    job = owned(session, Job, job_id, "job")
    outcome = lifecycle.cancel(session, job.id, job.user_id)  # owned() said the caller may
    if outcome is not None:
        audit.record(session, current_user(), "cancel", job.id, name=job.name, outcome=outcome)
    session.commit()
    job = session.get(Job, job.id, populate_existing=True)
    if job is None:  # deleted meanwhile (a cancel racing a delete of the cancelled job)
        raise not_found("job", job_id)
    if outcome is None:
        raise conflict(f"job {job.id} {ENDED_ALREADY.get(job.status, f'is {job.status} already')}; only queued or "
                       "running jobs can be cancelled")
    return json_response(job_out(job, owner_name(session, job)), status=200 if outcome == "cancelled" else 202)


@bp.delete("/<job_id>")
def delete_job(job_id: str):
    """Delete a finished job: its artifact files first (so a failure can be retried), then its rows."""
    session = get_session()
    job = owned(session, Job, job_id, "job")
    if not lifecycle.is_finished(job.status):
        raise conflict(f"job {job.id} is {job.status}; cancel it and delete it once it has stopped")
    if job.sweep_id is not None:
        # A sweep's record is its trials' rows: a running sweep would start a deleted trial again, an ended
        # one would lose a result (its best, its counts).
        raise conflict(f"job {job.id} is trial {job.sweep_trial} of sweep {job.sweep_id}; delete the sweep, which "
                       "deletes its trials")
    delete_finished_job(session, job)
    audit.record(session, current_user(), "delete", job.id, name=job.name)
    session.commit()
    return no_content()


def delete_finished_job(session: Session, job: Job) -> None:
    """Delete a finished job: its artifact files first (so a failure can be retried), then its rows."""
    store = services().store
    for artifact in session.scalars(select(Artifact).where(Artifact.job_id == job.id)):
        store.delete(artifact.uri)
    store.delete_tree(job_prefix(job.id))
    session.execute(delete(EpochMetrics).where(EpochMetrics.job_id == job.id))
    session.execute(delete(Artifact).where(Artifact.job_id == job.id))
    restate_stored_bytes(session, job.id)  # its bytes leave its user's total
    session.execute(delete(Job).where(Job.id == job.id))


def owner_name(session: Session, row: Job | Sweep) -> str:
    """The name of the user of a job or a sweep (the caller's own row is in the session already: no query)."""
    return session.get(User, row.user_id).name
