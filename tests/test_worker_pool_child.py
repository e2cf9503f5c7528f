"""A pool process that dies mid-job (SIGKILL, the kernel's OOM killer, a crash in native code) while its
worker's main process lives on: the main process sees it go and hands the job back at once, as a used
attempt, instead of leaving it "running" until its lease runs out."""

from __future__ import annotations

import datetime as dt
import os
import signal
from pathlib import Path

import pytest
from conftest import running_service, worker_settings
from specs import long_spec
from sqlalchemy import select, update
from test_lifecycle import write

from models import lifecycle
from models.tables import Artifact, EpochMetrics, Job, User, utcnow

EPOCHS = 30  # with fused Adam 12 epochs ended too soon for a kill to land mid-run
LONG = long_spec(EPOCHS, n_samples=3000, batch_size=8)  # seconds, on a fast machine too: a kill lands mid-run
LEASE = 60  # the reaper can't be the one that brings the job back within the test's wait
BACK_WITHIN = 20


# --- the transition: lifecycle.held and lifecycle.lose, on SQLite and PostgreSQL -------------------


@pytest.fixture(params=["sqlite", "postgres"])
def db(request):
    """Sessions over a migrated database of each kind."""
    from models.db import make_engine, make_sessionmaker

    engine = make_engine(request.getfixturevalue(f"{request.param}_url"))
    yield make_sessionmaker(engine)
    engine.dispose()


def claimed(db, max_attempts: int = 3, worker: str = "box:1") -> str:
    """A job running its first attempt on ``worker``."""
    def submit(session):
        user = User(name=f"user-{utcnow().timestamp()}")
        session.add(user)
        session.flush()
        job = lifecycle.submit(session, user_id=user.id, name="j", spec={}, epochs=2, max_attempts=max_attempts)
        session.flush()
        return job.id

    job_id = write(db, submit)
    assert write(db, lambda session: take(session, job_id, worker)) is not None
    return job_id


def take(session, job_id: str, worker: str):
    """The dispatcher releases the job, then ``worker`` claims it."""
    lifecycle.release(session, job_id)
    return lifecycle.claim(session, job_id, worker, LEASE)


def held(db, job_id: str, worker: str = "box:1"):
    with db() as session:
        return lifecycle.held(session, job_id, worker)


def row(db, job_id: str) -> Job:
    with db() as session:
        return session.get(Job, job_id)


def test_a_lost_attempt_goes_back_to_the_queue_used_up_and_the_next_claim_is_attempt_2(db):
    job_id = claimed(db)
    assert held(db, job_id, "other:2") is None  # another worker's process can't lose it

    assert write(db, lambda session: lifecycle.lose(session, held(db, job_id), "its process died")) == "queued"

    job = row(db, job_id)
    assert (job.status, job.attempts, job.max_attempts, job.worker_id, job.lease_expires_at) == (
        "queued", 1, 3, None, None)
    assert job.pending_reason == "requeued: its process died (attempt 1 of 3)"
    assert write(db, lambda session: take(session, job_id, "box:1")).attempts == 2


def test_a_lost_last_attempt_fails_and_a_lost_attempt_being_cancelled_ends_cancelled(db):
    last = claimed(db, max_attempts=1)
    cancelling = claimed(db)
    write(db, lambda session: lifecycle.cancel(session, cancelling, row(db, cancelling).user_id))

    for job_id in (last, cancelling):
        write(db, lambda session, job_id=job_id: lifecycle.lose(session, held(db, job_id), "its process died"))

    assert (row(db, last).status, row(db, last).error) == ("failed", "worker lost 1 times")
    assert row(db, cancelling).status == "cancelled"


def test_losing_an_attempt_never_touches_the_attempt_after_it(db):
    job_id = claimed(db)
    first = held(db, job_id)
    with db() as session:  # the lease ran out, the reaper requeued the job, the same worker claimed it again
        session.execute(update(Job).where(Job.id == job_id).values(lease_expires_at=utcnow() - dt.timedelta(hours=1)))
        (expired,) = lifecycle.expired(session, utcnow())
        assert lifecycle.reap(session, expired, utcnow()) == "queued"
        assert take(session, job_id, "box:1").attempts == 2
        session.commit()

    assert write(db, lambda session: lifecycle.lose(session, first, "its process died")) is None
    assert (row(db, job_id).status, row(db, job_id).attempts) == ("running", 2)


# --- a real worker -------------------------------------------------------------------------------


def pool_processes(pid: int) -> list[int]:
    """The children of the worker's main process: its prefork pool."""
    return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def newest_checkpoint(sessions, job_id: str, attempt: int) -> int:
    """The epoch of the newest checkpoint that ``attempt`` stored (each attempt uploads to a folder of its own)."""
    with sessions() as session:
        epochs = session.scalars(select(Artifact.epoch).where(
            Artifact.job_id == job_id, Artifact.kind == "checkpoint",
            Artifact.uri.contains(f"/attempt-{attempt}/"))).all()
    return max(epochs)


def attempt_by_epoch(sessions, job_id: str) -> dict[int, int]:
    with sessions() as session:
        return dict(session.execute(select(EpochMetrics.epoch, EpochMetrics.attempt)
                                    .where(EpochMetrics.job_id == job_id)).all())


def test_a_job_whose_pool_process_is_killed_is_requeued_at_once_and_resumes_from_its_checkpoint(tmp_path):
    with running_service(worker_settings(tmp_path / "home", lease_seconds=LEASE)) as service:
        worker = service.workers[0]
        job_id = service.submit(LONG)
        service.wait_for(lambda: service.job(job_id)["progress"]["epoch"] >= 2, 90, "the job at epoch 2")
        (child,) = pool_processes(worker.process.pid)  # concurrency 1: one pool process, running the job

        os.kill(child, signal.SIGKILL)
        # Read now: attempt 1 stores nothing more, and attempt 2 prunes its checkpoints only epochs later.
        checkpoint = newest_checkpoint(service.sessions, job_id, attempt=1)

        back = service.wait_for(lambda: (job := service.job(job_id))["attempts"] == 2 and job, BACK_WITHIN,
                                f"attempt 2 within {BACK_WITHIN} s, long before the {LEASE} s lease")
        assert back["status"] in ("queued", "running")
        assert worker.process.poll() is None  # only the pool process died
        job = service.wait_status(job_id, timeout=120)

        assert (job["status"], job["attempts"], job["progress"]["epoch"]) == ("succeeded", 2, EPOCHS), job
        by_epoch = attempt_by_epoch(service.sessions, job_id)
        assert sorted(by_epoch) == list(range(1, EPOCHS + 1))
        # Attempt 2 went on from the newest checkpoint at the kill, and re-ran nothing before it.
        assert {epoch for epoch, attempt in by_epoch.items() if attempt == 1} == set(range(1, checkpoint + 1))
        assert f"job {job_id} resumes from checkpoints/epoch-{checkpoint:04d}.pt" in worker.log(10_000)
        assert f"job {job_id} attempt 1: its pool process {child} died" in worker.log(10_000)
        assert worker.process.poll() is None and pool_processes(worker.process.pid) != [child]
