"""Every change of a job's status, each one conditional UPDATE: the only module that writes ``Job.status``.

The API, the worker and the maintenance loop call these functions; none writes a status itself. Each
function runs in the caller's session and leaves the commit to it (a worker's fenced writes retry whole
transactions). A running job is fenced by its attempt number: ``attempts`` only grows, so an attempt
that lost its job (the reaper requeued it, another worker claimed it) matches no row and writes nothing.

======================  ===========  ===========================  =====================================
transition              from         to                           who, and the condition
======================  ===========  ===========================  =====================================
``submit``              (new row)    queued                       API
``claim``               queued       running                      worker; no cancel asked, attempts left
``give_up``             queued       failed                       worker; attempts used up
``cancel``              queued       cancelled                    API, at once
``cancel``              running      running, cancel requested    API; the attempt stops at a batch end
``renew``               running      running                      the attempt (lease and progress)
``finish``              running      succeeded, failed, cancelled the attempt, when its run ended
``hand_back``           running      queued (cancelled if asked)  the attempt, on shutdown; no attempt used
``reap``                running      queued, failed or cancelled  maintenance, once the lease expired
``mark_rung``           queued       queued                       maintenance (the reconciler re-rang it)
``set_pending_reason``  queued       queued                       maintenance (why it waits)
======================  ===========  ===========================  =====================================

Everything else is forbidden: nothing leaves succeeded, failed or cancelled; a cancelled or exhausted
queued job is never claimed; a running job is never claimed again, nor finished by another attempt.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import Row, select, update
from sqlalchemy.orm import Session

from models.tables import FINISHED_STATUSES, Job, utcnow

# What a running attempt may record besides its lease: its progress, and how the run ended.
PROGRESS_FIELDS = frozenset({"epoch", "best_metric", "best_value", "best_epoch"})
OUTCOME_FIELDS = PROGRESS_FIELDS | {"final_metrics"}


def _ended(status: str, now: dt.datetime) -> dict[str, Any]:
    """The fields every end of a job sets: its status and time; no lease, no reason to wait."""
    ended = {"status": status, "finished_at": now, "lease_expires_at": None, "pending_reason": None}
    if status == "cancelled":
        ended["stop_reason"] = "cancelled"
    return ended


def _back_in_queue(pending_reason: str) -> dict[str, Any]:
    """The fields a job sets when it goes back to the queue: no worker, device or lease until claimed."""
    return {"status": "queued", "worker_id": None, "device": None, "lease_expires_at": None,
            "pending_reason": pending_reason}


def _queued(job_id: str):
    return update(Job).where(Job.id == job_id, Job.status == "queued")


def _running(job_id: str, attempt: int):
    return update(Job).where(Job.id == job_id, Job.status == "running", Job.attempts == attempt)


def _rows(session: Session, statement) -> int:
    return session.execute(statement.execution_options(synchronize_session=False)).rowcount


def is_finished(status: str) -> bool:
    """Whether a job in ``status`` has ended for good (only then may it be deleted)."""
    return status in FINISHED_STATUSES


def submit(session: Session, **fields: Any) -> Job:
    """Add a new queued job (the caller commits, then publishes its id)."""
    job = Job(status="queued", **fields)
    session.add(job)
    return job


def claim(session: Session, job_id: str, worker_id: str, lease_seconds: float) -> Job | None:
    """queued -> running as the next attempt, with a lease; None if the job isn't this worker's to run
    (a duplicate or stale message, a cancelled job, or one out of attempts)."""
    now = utcnow()
    statement = (
        _queued(job_id)
        .where(Job.cancel_requested.is_(False), Job.attempts < Job.max_attempts)
        .values(status="running", attempts=Job.attempts + 1, worker_id=worker_id, started_at=now,
                pending_reason=None, lease_expires_at=now + dt.timedelta(seconds=lease_seconds))
        .returning(Job)
        .execution_options(synchronize_session=False)
    )
    return session.scalar(statement)


def give_up(session: Session, job_id: str) -> bool:
    """queued -> failed when every attempt is used (its last worker was lost); False for anything else."""
    job = session.get(Job, job_id)
    if job is None or job.status != "queued" or job.attempts < job.max_attempts:
        return False
    error = f"gave up after {job.attempts} attempts (max_attempts {job.max_attempts})"
    return bool(_rows(session, _queued(job_id).where(Job.attempts == job.attempts)
                      .values(error=error, **_ended("failed", utcnow()))))


def cancel(session: Session, job_id: str, user_id: str) -> str | None:
    """The owner's cancel: a queued job ends ``cancelled`` at once; a running one gets ``requested`` and its
    attempt stops at the next batch end. None when the job is neither (ended already, or not theirs)."""
    owned = (Job.user_id == user_id,)
    if _rows(session, _queued(job_id).where(*owned).values(**_ended("cancelled", utcnow()))):
        return "cancelled"
    requested = update(Job).where(Job.id == job_id, Job.status == "running", *owned).values(cancel_requested=True)
    return "requested" if _rows(session, requested) else None


def renew(session: Session, job_id: str, attempt: int, lease_seconds: float, **progress: Any) -> Row | None:
    """Extend the attempt's lease and record its progress; None when the attempt no longer owns the job.

    Returns the row's ``cancel_requested``, so each renewal also tells the attempt whether to stop.
    """
    unknown = progress.keys() - PROGRESS_FIELDS
    if unknown:
        raise ValueError(f"not progress: {sorted(unknown)}")
    statement = (
        _running(job_id, attempt)
        .values(lease_expires_at=utcnow() + dt.timedelta(seconds=lease_seconds), **progress)
        .returning(Job.cancel_requested)
        .execution_options(synchronize_session=False)
    )
    return session.execute(statement).first()


def finish(session: Session, job_id: str, attempt: int, status: str, *, stop_reason: str | None = None,
           error: str | None = None, **outcome: Any) -> bool:
    """running -> succeeded, failed or cancelled, with how the run ended; False if the attempt lost the job."""
    if status not in FINISHED_STATUSES:
        raise ValueError(f"a run ends {', '.join(FINISHED_STATUSES)}, not {status!r}")
    unknown = outcome.keys() - OUTCOME_FIELDS
    if unknown:
        raise ValueError(f"not an outcome: {sorted(unknown)}")
    values = {"stop_reason": stop_reason, "error": error, **outcome, **_ended(status, utcnow())}
    return bool(_rows(session, _running(job_id, attempt).values(**values)))


def hand_back(session: Session, job_id: str, attempt: int, reason: str) -> str | None:
    """running -> queued without using up an attempt (the worker shut down; the job resumes from its
    checkpoint); -> cancelled when a cancel was asked meanwhile. Returns the new status, None if the
    attempt lost the job.

    ``max_attempts`` grows with ``attempts``, which only ever grows because it is the fence. A job with a
    cancel request is never claimed, so it ends here. ``cancel_requested`` only turns true while the job
    runs: if the first UPDATE misses because of it, the second finds it.
    """
    requeued = (_running(job_id, attempt).where(Job.cancel_requested.is_(False))
                .values(max_attempts=Job.max_attempts + 1, **_back_in_queue(reason)))
    if _rows(session, requeued):
        return "queued"
    cancelled = _running(job_id, attempt).where(Job.cancel_requested.is_(True)).values(**_ended("cancelled", utcnow()))
    return "cancelled" if _rows(session, cancelled) else None


def expired(session: Session, now: dt.datetime) -> list[Row]:
    """Running jobs whose lease ran out before ``now``: what ``reap`` takes."""
    return list(session.execute(
        select(Job.id, Job.attempts, Job.max_attempts, Job.worker_id, Job.queue, Job.cancel_requested)
        .where(Job.status == "running", Job.lease_expires_at < now)
    ))


def reap(session: Session, job: Row, now: dt.datetime) -> str | None:
    """running -> queued (the next attempt resumes), failed (attempts used up) or cancelled (one was asked)
    for a job of ``expired``; the new status, or None when the attempt renewed or ended meanwhile."""
    if job.cancel_requested:
        values = _ended("cancelled", now)
    elif job.attempts >= job.max_attempts:
        values = {"error": f"worker lost {job.attempts} times", **_ended("failed", now)}
    else:
        values = _back_in_queue(f"requeued: worker {job.worker_id} stopped renewing its lease "
                                f"(attempt {job.attempts} of {job.max_attempts})")
    statement = _running(job.id, job.attempts).where(Job.lease_expires_at < now).values(**values)
    return values["status"] if _rows(session, statement) else None


def mark_rung(session: Session, job_id: str, stale: dt.datetime) -> bool:
    """Note that a queued job untouched since ``stale`` was published again; False when another worker's
    reconciler did it first (only the winner publishes)."""
    return bool(_rows(session, _queued(job_id).where(Job.updated_at < stale).values(updated_at=utcnow())))


def set_pending_reason(session: Session, job_id: str, reason: str | None) -> bool:
    """Say why a queued job waits (None: it no longer does for that reason); False if it isn't queued."""
    return bool(_rows(session, _queued(job_id).values(pending_reason=reason)))
