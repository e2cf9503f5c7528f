"""Every change of a job's status, each one conditional UPDATE: the only module that writes ``Job.status``.

The API, the worker and the maintenance loop call these functions; none writes a status itself. Each
function runs in the caller's session and leaves the commit to it (a worker's fenced writes retry whole
transactions). A running job is fenced by its attempt number: ``attempts`` only grows, so an attempt
that lost its job (the reaper requeued it, another worker claimed it) matches no row and writes nothing.

======================  ===========  ===========================  =====================================
transition              from         to                           who, and the condition
======================  ===========  ===========================  =====================================
``submit``              (new row)    queued                       API
``claim``               queued       running                      worker; released, no cancel, attempts left
``give_up``             queued       failed                       worker; attempts used up
``cancel``              queued       cancelled                    API, at once
``cancel``              running      running, cancel requested    API; the attempt stops at a batch end
``renew``               running      running                      the attempt (lease and progress)
``finish``              running      succeeded, failed, cancelled the attempt, when its run ended
``hand_back``           running      queued (cancelled if asked)  the attempt, on shutdown; no attempt used
``reap``                running      queued, failed or cancelled  maintenance, once the lease expired
``lose``                running      queued, failed or cancelled  the worker, when the attempt's process died
``release``             queued       queued, released             the dispatcher: handed to the broker
``unrelease``           queued       queued, held                 the dispatcher: its message is stale now
``request_preemption``  running      running, preemption asked    the dispatcher; the attempt hands back
``set_pending_reason``  queued       queued                       dispatcher, maintenance (why it waits)
``pause``               running      queued, paused (cancelled    the attempt, after its stop_at_epoch; no
                                     if asked)                    attempt used
``unpause``             queued,      queued                       the sweep controller (promote); the
                        paused                                    dispatcher then releases it
``end_paused``          queued,      succeeded                    the sweep controller (prune)
                        paused
======================  ===========  ===========================  =====================================

Everything else is forbidden: nothing leaves succeeded, failed or cancelled; a cancelled or exhausted
queued job is never claimed; a running job is never claimed again, nor finished by another attempt. A
paused job is a queued job that is never released (so never claimed) until ``unpause``; ``cancel`` ends it
at once like any queued job.
"""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Collection, Mapping
from typing import Any

from sqlalchemy import Row, Update, and_, bindparam, case, select, update
from sqlalchemy.orm import Session

from models.tables import FINISHED_STATUSES, Job, new_id, utcnow

# What a running attempt may record besides its lease: its progress, and how the run ended.
PROGRESS_FIELDS = frozenset({"epoch", "best_metric", "best_value", "best_epoch"})
OUTCOME_FIELDS = PROGRESS_FIELDS | {"final_metrics"}


def _ended(status: str, now: dt.datetime) -> dict[str, Any]:
    """The fields every end of a job sets: its status and time; no lease, no reason to wait."""
    ended = {"status": status, "finished_at": now, "lease_expires_at": None, "pending_reason": None,
             "paused": False}
    if status == "cancelled":
        ended["stop_reason"] = "cancelled"
    return ended


def _back_in_queue(pending_reason: str) -> dict[str, Any]:
    """The fields a job sets when it goes back to the queue: no worker, device or lease until claimed, and
    held in the database until the dispatcher releases it again."""
    return {"status": "queued", "worker_id": None, "device": None, "lease_expires_at": None,
            "pending_reason": pending_reason, "released_at": None, "preempt_reason": None}


def _queued(job_id: str):
    return update(Job).where(Job.id == job_id, Job.status == "queued")


def _running(job_id: str, attempt: int):
    return update(Job).where(Job.id == job_id, Job.status == "running", Job.attempts == attempt)


def _attempts():
    """The columns that ``reap`` and ``lose`` decide by (the attempt is their fence)."""
    return select(Job.id, Job.attempts, Job.max_attempts, Job.worker_id, Job.queue, Job.cancel_requested)


def _rows(session: Session, statement) -> int:
    return session.execute(statement.execution_options(synchronize_session=False)).rowcount


def waiting():
    """The condition on jobs that wait for a slot: queued and not paused (a paused job, a sweep's trial at a
    rung, waits for its sweep: it is never released, counted as waiting, nor said to wait for a worker)."""
    return (Job.status == "queued") & Job.paused.is_(False)


def is_finished(status: str) -> bool:
    """Whether a job in ``status`` has ended for good (only then may it be deleted)."""
    return status in FINISHED_STATUSES


def submit(session: Session, **fields: Any) -> Job:
    """Add a new queued job, its id given now so that the caller can name it before the flush (the caller
    commits, then publishes the id)."""
    job = Job(id=new_id("job"), status="queued", **fields)
    session.add(job)
    return job


def claim(session: Session, job_id: str, worker_id: str, lease_seconds: float,
          devices: Mapping[str, str | None] | None = None) -> Job | None:
    """queued -> running as the next attempt, with a lease, on the device ``devices`` names for the one the
    job's spec asks for (``resources.device``; none if not named); None if the job isn't this worker's to
    run (a duplicate or stale message, a job the dispatcher holds back, a cancelled job, or one out of
    attempts)."""
    now = utcnow()
    statement = _claim_statement(tuple(sorted((devices or {}).items())))
    return session.scalar(statement, {"job_id": job_id, "claimed_by": worker_id, "claimed_at": now,
                                      "lease_until": now + dt.timedelta(seconds=lease_seconds)})


@functools.lru_cache(maxsize=16)
def _claim_statement(devices: tuple[tuple[str, str | None], ...]) -> Update:
    """``claim``'s UPDATE for one mapping of devices, built once, its values bound parameters: building a
    statement this size and computing its cache key cost more than running it, on every job's way to its
    first epoch."""
    asked = Job.spec[("resources", "device")].as_string()
    return (
        update(Job)
        .where(Job.id == bindparam("job_id"), Job.status == "queued", Job.released_at.is_not(None),
               Job.paused.is_(False), Job.cancel_requested.is_(False), Job.attempts < Job.max_attempts)
        .values(status="running", attempts=Job.attempts + 1, worker_id=bindparam("claimed_by"),
                started_at=bindparam("claimed_at"), pending_reason=None, lease_expires_at=bindparam("lease_until"),
                device=case(dict(devices), value=asked, else_=None) if devices else None)
        .returning(Job)
        .execution_options(synchronize_session=False)
    )


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

    Returns the row's ``cancel_requested`` and ``preempt_reason``, so each renewal also tells the attempt
    whether to stop, or to hand its slot back.
    """
    unknown = progress.keys() - PROGRESS_FIELDS
    if unknown:
        raise ValueError(f"not progress: {sorted(unknown)}")
    values = {f"new_{name}": value for name, value in progress.items()}
    return session.execute(_renew_statement(tuple(sorted(progress))), {
        "job_id": job_id, "attempt": attempt, "lease_until": utcnow() + dt.timedelta(seconds=lease_seconds),
        **values}).first()


@functools.lru_cache(maxsize=16)
def _renew_statement(progress: tuple[str, ...]) -> Update:
    """``renew``'s UPDATE for one set of progress fields, built once (as ``_claim_statement``): a running job
    renews at every epoch's end."""
    return (
        update(Job)
        .where(Job.id == bindparam("job_id"), Job.status == "running", Job.attempts == bindparam("attempt"))
        .values(lease_expires_at=bindparam("lease_until"), **{name: bindparam(f"new_{name}") for name in progress})
        .returning(Job.cancel_requested, Job.preempt_reason)
        .execution_options(synchronize_session=False)
    )


def finish(session: Session, job_id: str, attempt: int, status: str, *, stop_reason: str | None = None,
           error: str | None = None, **outcome: Any) -> bool:
    """running -> succeeded, failed or cancelled, with how the run ended; False if the attempt lost the job."""
    if status not in FINISHED_STATUSES:
        raise ValueError(f"a run ends {', '.join(FINISHED_STATUSES)}, not {status!r}")
    _check_outcome(outcome)
    values = {"stop_reason": stop_reason, "error": error, **outcome, **_ended(status, utcnow())}
    return bool(_rows(session, _running(job_id, attempt).values(**values)))


def _check_outcome(outcome: Mapping[str, Any]) -> None:
    unknown = outcome.keys() - OUTCOME_FIELDS
    if unknown:
        raise ValueError(f"not an outcome: {sorted(unknown)}")


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


def pause(session: Session, job_id: str, attempt: int, reason: str, **outcome: Any) -> str | None:
    """running -> queued and paused, after the run stopped at its ``stop_at_epoch`` (its outputs stored, its
    checkpoint saved): held in the database, never released, until ``unpause`` or ``end_paused``. Uses no
    attempt (as ``hand_back``), says ``reason`` in pending_reason and records the outcome so far (epoch,
    final_metrics, best_*); -> cancelled when a cancel was asked meanwhile. The new status, None if the
    attempt lost the job."""
    _check_outcome(outcome)
    paused = (_running(job_id, attempt).where(Job.cancel_requested.is_(False))
              .values(max_attempts=Job.max_attempts + 1, paused=True, **outcome, **_back_in_queue(reason)))
    if _rows(session, paused):
        return "queued"
    cancelled = (_running(job_id, attempt).where(Job.cancel_requested.is_(True))
                 .values(**outcome, **_ended("cancelled", utcnow())))
    return "cancelled" if _rows(session, cancelled) else None


def _paused(job_id: str):
    return _queued(job_id).where(Job.paused.is_(True))


def unpause(session: Session, job_id: str, stop_at_epoch: int | None) -> bool:
    """queued and paused -> queued (the dispatcher releases it like any queued job), to run until
    ``stop_at_epoch`` (None: to the end) from the checkpoint its pause saved; False if it isn't paused."""
    return bool(_rows(session, _paused(job_id).values(paused=False, stop_at_epoch=stop_at_epoch,
                                                      pending_reason=None)))


def end_paused(session: Session, job_id: str, stop_reason: str) -> bool:
    """queued and paused -> succeeded with ``stop_reason`` (a sweep prunes it: ``"sweep_pruned"``); the
    weights its pause stored stay its result. False if it isn't paused."""
    return bool(_rows(session, _paused(job_id).values(stop_reason=stop_reason, **_ended("succeeded", utcnow()))))


def expired(session: Session, now: dt.datetime) -> list[Row]:
    """Running jobs whose lease ran out before ``now``: what ``reap`` takes."""
    return list(session.execute(_attempts().where(Job.status == "running", Job.lease_expires_at < now)))


def held(session: Session, job_id: str, worker_id: str) -> Row | None:
    """The running attempt of ``job_id`` if worker ``worker_id`` holds it: what ``lose`` takes."""
    return session.execute(_attempts().where(Job.id == job_id, Job.status == "running",
                                             Job.worker_id == worker_id)).first()


def _after_loss(job: Row, now: dt.datetime, what: str) -> dict[str, Any]:
    """What a lost attempt leaves: cancelled if asked, failed once attempts are used up, else queued again."""
    if job.cancel_requested:
        return _ended("cancelled", now)
    if job.attempts >= job.max_attempts:
        return {"error": f"worker lost {job.attempts} times", **_ended("failed", now)}
    return _back_in_queue(f"requeued: {what} (attempt {job.attempts} of {job.max_attempts})")


def reap(session: Session, job: Row, now: dt.datetime) -> str | None:
    """running -> queued (the next attempt resumes), failed (attempts used up) or cancelled (one was asked)
    for a job of ``expired``; the new status, or None when the attempt renewed or ended meanwhile."""
    values = _after_loss(job, now, f"worker {job.worker_id} stopped renewing its lease")
    statement = _running(job.id, job.attempts).where(Job.lease_expires_at < now).values(**values)
    return values["status"] if _rows(session, statement) else None


def lose(session: Session, job: Row, what: str) -> str | None:
    """``reap`` without waiting for the lease, for a job of ``held``: its worker saw the process running the
    attempt die (``what`` says how). The attempt counts as used, as a reaped one does, and the next resumes
    from the last checkpoint. The new status, or None when that attempt ended or was reaped meanwhile."""
    values = _after_loss(job, utcnow(), what)
    return values["status"] if _rows(session, _running(job.id, job.attempts).values(**values)) else None


def release(session: Session, job_id: str, again_before: dt.datetime | None = None,
            clear_reason: bool = False) -> bool:
    """Mark a held queued job as handed to the broker (the caller publishes it after the commit); with
    ``again_before``, one released before then that no worker took (its message was lost); with
    ``clear_reason``, its pending reason no longer holds. False when another dispatcher got there first, or
    the job is no longer queued: only the winner publishes."""
    held = Job.released_at.is_(None) if again_before is None else Job.released_at < again_before
    values: dict[str, Any] = {"released_at": utcnow(), "updated_at": Job.updated_at}
    if clear_reason:
        values["pending_reason"] = None
    return bool(_rows(session, update(Job).where(Job.id == job_id, _releasable(held)).values(**values)))


def release_many(session: Session, job_ids: list[str], clear_reason: Collection[str] = ()) -> list[str]:
    """``release`` of several held jobs in one statement (``clear_reason``: those whose pending reason no longer
    holds); the ids released, in ``job_ids``' order."""
    if not job_ids:
        return []
    values: dict[str, Any] = {"released_at": utcnow(), "updated_at": Job.updated_at}
    if clear_reason:
        values["pending_reason"] = case((Job.id.in_(clear_reason), None), else_=Job.pending_reason)
    releasable = (update(Job).where(Job.id.in_(job_ids), _releasable(Job.released_at.is_(None))).values(**values)
                  .returning(Job.id).execution_options(synchronize_session=False))
    done = set(session.scalars(releasable))
    return [job_id for job_id in job_ids if job_id in done]


def _releasable(held):
    """A job the dispatcher may hand to the broker: queued, ``held`` as the caller says, and neither paused (it
    waits for its sweep, not a slot: ``unpause`` first) nor being cancelled. Dispatch is bookkeeping, not a change
    a client sees: the releases leave updated_at as it was."""
    return and_(Job.status == "queued", held, Job.paused.is_(False), Job.cancel_requested.is_(False))


def unrelease(session: Session, job_id: str) -> bool:
    """Hold a released job back again (a higher-priority one must get the next free slot): a worker that
    meets its message skips it, and the dispatcher releases it again later. False if it wasn't released."""
    return bool(_rows(session, _queued(job_id).where(Job.released_at.is_not(None))
                      .values(released_at=None, updated_at=Job.updated_at)))


def request_preemption(session: Session, job_id: str, attempt: int, reason: str) -> bool:
    """Ask a running attempt to checkpoint at its next batch and hand the job back (``hand_back``, no attempt
    used), saying ``reason``; False when it ended, is being cancelled or was asked already."""
    asked = _running(job_id, attempt).where(Job.cancel_requested.is_(False), Job.preempt_reason.is_(None))
    return bool(_rows(session, asked.values(preempt_reason=reason)))


def set_pending_reason(session: Session, job_id: str, reason: str | None) -> bool:
    """Say why a queued job waits (None: it no longer does for that reason); False if it isn't queued or
    already says so (no write, so a reason said every round costs nothing)."""
    return bool(_rows(session, _queued(job_id).where(Job.pending_reason.is_distinct_from(reason))
                      .values(pending_reason=reason)))
