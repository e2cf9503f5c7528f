"""Every transition of a job, allowed and forbidden, on SQLite and PostgreSQL (models/lifecycle.py).

Each state is reached through the lifecycle's own transitions; then every transition is tried from it. An
allowed one moves the job where the table says; a forbidden one returns nothing and leaves the row as it was.
"""

from __future__ import annotations

import datetime as dt

import pytest
from sqlalchemy import inspect, update

from models import lifecycle
from models.tables import Job, User, utcnow

LEASE = 60
HOUR = dt.timedelta(hours=1)


@pytest.fixture(params=["sqlite", "postgres"])
def sessions(request):
    """Sessions over a migrated database of each kind."""
    from migrations.apply import upgrade
    from models.db import make_engine, make_sessionmaker

    url = request.getfixturevalue(f"{request.param}_url")
    upgrade(url)
    engine = make_engine(url)
    yield make_sessionmaker(engine)
    engine.dispose()


def write(sessions, change):
    """Run one lifecycle call in its own committed transaction; return what it returned."""
    with sessions() as session:
        result = change(session)
        session.commit()
    return result


def submit(sessions, max_attempts: int = 3) -> tuple[str, str]:
    with sessions() as session:
        user = User(name=f"user-{utcnow().timestamp()}")
        session.add(user)
        session.flush()
        job = lifecycle.submit(session, user_id=user.id, name="j", spec={}, epochs=2, max_attempts=max_attempts)
        session.commit()
        return job.id, user.id


def expire_lease(sessions, job_id: str) -> None:
    """The attempt stopped renewing: its lease lies in the past (a test's stand-in for waiting a lease out)."""
    with sessions() as session:
        session.execute(update(Job).where(Job.id == job_id).values(lease_expires_at=utcnow() - HOUR))
        session.commit()


def claim(session, job_id, _user, _attempt):
    return lifecycle.claim(session, job_id, "host:1", LEASE)


def release_and_claim(session, job_id, user, attempt):
    """What a job's way to a worker is: the dispatcher releases it, then a worker claims it."""
    lifecycle.release(session, job_id)
    return claim(session, job_id, user, attempt)


def finish(session, job_id, _user, attempt):
    return lifecycle.finish(session, job_id, attempt, "succeeded", stop_reason="completed", epoch=2)


# Every transition, called the way its owner calls it: (session, job id, owner's user id, attempt).
TRANSITIONS = {
    "claim": claim,
    "give_up": lambda session, job_id, _user, _attempt: lifecycle.give_up(session, job_id),
    "cancel": lambda session, job_id, user, _attempt: lifecycle.cancel(session, job_id, user),
    "renew": lambda session, job_id, _user, attempt: lifecycle.renew(session, job_id, attempt, LEASE, epoch=1),
    "finish": finish,
    "hand_back": lambda session, job_id, _user, attempt: lifecycle.hand_back(session, job_id, attempt, "back"),
    "reap": lambda session, job_id, _user, _attempt: next(
        (lifecycle.reap(session, row, utcnow()) for row in lifecycle.expired(session, utcnow()) if row.id == job_id),
        None),
    "lose": lambda session, job_id, _user, _attempt: next(
        (lifecycle.lose(session, row, "its process died") for row in [lifecycle.held(session, job_id, "host:1")]
         if row is not None), None),
    "release": lambda session, job_id, _user, _attempt: lifecycle.release(session, job_id),
    "unrelease": lambda session, job_id, _user, _attempt: lifecycle.unrelease(session, job_id),
    "request_preemption": lambda session, job_id, _user, attempt: lifecycle.request_preemption(
        session, job_id, attempt, "preempted by a high-priority job"),
    "set_pending_reason": lambda session, job_id, _user, _attempt: lifecycle.set_pending_reason(session, job_id,
                                                                                                 "waiting"),
    "pause": lambda session, job_id, _user, attempt: lifecycle.pause(session, job_id, attempt, "paused", epoch=1),
    "unpause": lambda session, job_id, _user, _attempt: lifecycle.unpause(session, job_id, 2),
    "end_paused": lambda session, job_id, _user, _attempt: lifecycle.end_paused(session, job_id, "sweep_pruned"),
}


def make_state(sessions, state: str) -> tuple[str, str, int]:
    """A job in ``state``, reached through lifecycle calls; (job id, owner, current attempt)."""
    job_id, user = submit(sessions, max_attempts=0 if state == "queued, attempts used up" else 3)
    if state == "queued, held":
        return job_id, user, 0
    if state in ("queued", "queued, attempts used up"):
        write(sessions, lambda s: lifecycle.release(s, job_id))
        return job_id, user, 0
    write(sessions, lambda s: release_and_claim(s, job_id, user, 0))
    if state == "queued, paused":
        write(sessions, lambda s: lifecycle.pause(s, job_id, 1, "paused after epoch 1", epoch=1))
    elif state == "running, cancel requested":
        write(sessions, lambda s: lifecycle.cancel(s, job_id, user))
    elif state == "running, lease expired":
        expire_lease(sessions, job_id)
    elif state == "succeeded":
        write(sessions, lambda s: finish(s, job_id, user, 1))
    elif state == "failed":
        write(sessions, lambda s: lifecycle.finish(s, job_id, 1, "failed", error="boom"))
    elif state == "cancelled":
        write(sessions, lambda s: lifecycle.cancel(s, job_id, user))
        write(sessions, lambda s: lifecycle.finish(s, job_id, 1, "cancelled"))
    return job_id, user, 1


# (state, transition) -> the status it leads to. Every pair not listed is forbidden.
ALLOWED = {
    ("queued", "claim"): "running",
    ("queued", "cancel"): "cancelled",
    ("queued", "unrelease"): "queued",
    ("queued", "set_pending_reason"): "queued",
    ("queued, held", "release"): "queued",
    ("queued, held", "cancel"): "cancelled",
    ("queued, held", "set_pending_reason"): "queued",
    ("queued, attempts used up", "give_up"): "failed",
    ("queued, attempts used up", "cancel"): "cancelled",
    ("queued, attempts used up", "unrelease"): "queued",
    ("queued, attempts used up", "set_pending_reason"): "queued",
    **{(running, transition): status
       for running in ("running", "running, cancel requested", "running, lease expired")
       for transition, status in (("renew", "running"), ("finish", "succeeded"), ("cancel", "running"))},
    ("running", "hand_back"): "queued",
    ("running, lease expired", "hand_back"): "queued",
    ("running, cancel requested", "hand_back"): "cancelled",
    ("running, lease expired", "reap"): "queued",
    ("running", "lose"): "queued",
    ("running, lease expired", "lose"): "queued",
    ("running, cancel requested", "lose"): "cancelled",
    ("running", "request_preemption"): "running",
    ("running, lease expired", "request_preemption"): "running",
    ("running", "pause"): "queued",
    ("running, lease expired", "pause"): "queued",
    ("running, cancel requested", "pause"): "cancelled",
    # Paused: held for its sweep. Never released (so never claimed); a cancel ends it as any queued job.
    ("queued, paused", "cancel"): "cancelled",
    ("queued, paused", "set_pending_reason"): "queued",
    ("queued, paused", "unpause"): "queued",
    ("queued, paused", "end_paused"): "succeeded",
}
STATES = ("queued, held", "queued", "queued, attempts used up", "queued, paused", "running",
          "running, cancel requested", "running, lease expired", "succeeded", "failed", "cancelled")


def snapshot(sessions, job_id: str) -> dict:
    with sessions() as session:
        job = session.get(Job, job_id)
        return {column.key: getattr(job, column.key) for column in inspect(Job).columns}


@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("transition", TRANSITIONS)
def test_a_transition_moves_a_job_only_where_the_lifecycle_table_allows(sessions, state, transition):
    job_id, user, attempt = make_state(sessions, state)
    before = snapshot(sessions, job_id)
    result = write(sessions, lambda s: TRANSITIONS[transition](s, job_id, user, attempt))
    after = snapshot(sessions, job_id)
    if (state, transition) in ALLOWED:
        assert result, f"{transition} from {state} refused"
        assert after["status"] == ALLOWED[state, transition]
        assert after != before
    else:
        assert not result, f"{transition} from {state} went through"
        assert after == before


def test_every_end_sets_the_same_fields_and_a_cancel_says_so(sessions):
    ended = {}
    for status in ("succeeded", "failed", "cancelled"):
        job_id, user, _ = make_state(sessions, status)
        ended[status] = snapshot(sessions, job_id)
    queued_id, user, _ = make_state(sessions, "queued")
    write(sessions, lambda s: lifecycle.set_pending_reason(s, queued_id, "no live worker"))
    write(sessions, lambda s: lifecycle.cancel(s, queued_id, user))
    ended["cancelled while queued"] = snapshot(sessions, queued_id)
    for job in ended.values():
        assert job["finished_at"] is not None and job["lease_expires_at"] is None and job["pending_reason"] is None
    assert ended["cancelled"]["stop_reason"] == ended["cancelled while queued"]["stop_reason"] == "cancelled"
    assert ended["failed"]["error"] == "boom" and ended["succeeded"]["stop_reason"] == "completed"


def test_a_claim_starts_the_next_attempt_with_a_lease(sessions):
    job_id, user, _ = make_state(sessions, "queued")
    claimed = write(sessions, lambda s: claim(s, job_id, user, 0))
    job = snapshot(sessions, job_id)
    assert claimed.id == job_id and job["attempts"] == 1 and job["worker_id"] == "host:1"
    assert job["started_at"] is not None and job["lease_expires_at"] is not None


def test_a_renewal_records_progress_and_reports_a_cancel_request(sessions):
    job_id, user, attempt = make_state(sessions, "running")
    assert write(sessions, lambda s: lifecycle.renew(s, job_id, attempt, LEASE, epoch=1)).cancel_requested is False
    write(sessions, lambda s: lifecycle.cancel(s, job_id, user))
    assert write(sessions, lambda s: lifecycle.renew(s, job_id, attempt, LEASE, epoch=2)).cancel_requested is True
    assert snapshot(sessions, job_id)["epoch"] == 2
    with pytest.raises(ValueError, match="not progress"):
        write(sessions, lambda s: lifecycle.renew(s, job_id, attempt, LEASE, status="succeeded"))
    with pytest.raises(ValueError, match="a run ends"):
        write(sessions, lambda s: lifecycle.finish(s, job_id, attempt, "queued"))


def test_a_hand_back_uses_no_attempt_and_frees_the_job_for_any_worker(sessions):
    job_id, user, attempt = make_state(sessions, "running")
    assert write(sessions, lambda s: lifecycle.hand_back(s, job_id, attempt, "requeued: shut down")) == "queued"
    job = snapshot(sessions, job_id)
    assert (job["attempts"], job["max_attempts"]) == (1, 4)
    assert job["worker_id"] is job["device"] is job["lease_expires_at"] is None
    assert job["pending_reason"] == "requeued: shut down"


@pytest.mark.parametrize("state, status, reason", [
    ("running, lease expired", "queued", "requeued: worker host:1 stopped renewing its lease (attempt 1 of 3)"),
    ("running, cancel requested", "cancelled", None),
])
def test_the_reaper_requeues_or_ends_a_job_whose_lease_ran_out(sessions, state, status, reason):
    job_id, user, _ = make_state(sessions, state)
    expire_lease(sessions, job_id)
    assert write(sessions, lambda s: TRANSITIONS["reap"](s, job_id, user, 1)) == status
    job = snapshot(sessions, job_id)
    assert job["status"] == status and job["pending_reason"] == reason and job["lease_expires_at"] is None


def test_the_reaper_fails_a_job_whose_last_attempt_was_lost(sessions):
    job_id, user = submit(sessions, max_attempts=1)
    write(sessions, lambda s: release_and_claim(s, job_id, user, 0))
    expire_lease(sessions, job_id)
    assert write(sessions, lambda s: TRANSITIONS["reap"](s, job_id, user, 1)) == "failed"
    assert snapshot(sessions, job_id)["error"] == "worker lost 1 times"


def test_an_attempt_that_lost_its_job_can_no_longer_write_it(sessions):
    job_id, user, first = make_state(sessions, "running, lease expired")
    write(sessions, lambda s: TRANSITIONS["reap"](s, job_id, user, first))
    second = write(sessions, lambda s: release_and_claim(s, job_id, user, 0)).attempts
    before = snapshot(sessions, job_id)
    for name in ("renew", "finish", "hand_back"):
        assert not write(sessions, lambda s, name=name: TRANSITIONS[name](s, job_id, user, first)), name
    assert snapshot(sessions, job_id) == before and (first, second) == (1, 2)


def test_a_pause_uses_no_attempt_holds_the_job_and_records_its_outcome(sessions):
    job_id, user, attempt = make_state(sessions, "running")
    outcome = {"epoch": 2, "best_metric": "val_loss", "best_value": 0.5, "best_epoch": 1,
               "final_metrics": {"val_loss": 0.6}}
    assert write(sessions, lambda s: lifecycle.pause(s, job_id, attempt, "paused after epoch 2", **outcome)) == "queued"
    job = snapshot(sessions, job_id)
    assert job["paused"] is True and (job["attempts"], job["max_attempts"]) == (1, 4)
    assert job["released_at"] is job["worker_id"] is job["lease_expires_at"] is job["finished_at"] is None
    assert job["pending_reason"] == "paused after epoch 2"
    assert {name: job[name] for name in outcome} == outcome
    with pytest.raises(ValueError, match="not an outcome"):
        write(sessions, lambda s: lifecycle.pause(s, job_id, attempt, "paused", status="succeeded"))


def test_an_unpaused_job_is_released_and_claimed_like_any_queued_job(sessions):
    job_id, user, _ = make_state(sessions, "queued, paused")
    assert write(sessions, lambda s: lifecycle.unpause(s, job_id, 6))
    job = snapshot(sessions, job_id)
    assert job["paused"] is False and job["stop_at_epoch"] == 6 and job["pending_reason"] is None
    claimed = write(sessions, lambda s: release_and_claim(s, job_id, user, 1))
    assert claimed.attempts == 2 and claimed.stop_at_epoch == 6
    assert write(sessions, lambda s: lifecycle.unpause(s, job_id, None)) is False


def test_a_pruned_or_cancelled_paused_job_ends_no_longer_paused(sessions):
    pruned, _user, _ = make_state(sessions, "queued, paused")
    assert write(sessions, lambda s: lifecycle.end_paused(s, pruned, "sweep_pruned"))
    cancelled, user, _ = make_state(sessions, "queued, paused")
    assert write(sessions, lambda s: lifecycle.cancel(s, cancelled, user)) == "cancelled"
    for job_id, status, stop_reason in ((pruned, "succeeded", "sweep_pruned"), (cancelled, "cancelled", "cancelled")):
        job = snapshot(sessions, job_id)
        assert (job["status"], job["stop_reason"], job["paused"]) == (status, stop_reason, False)
        assert job["finished_at"] is not None and job["pending_reason"] is None and job["epoch"] == 1


def test_a_pause_asked_to_cancel_ends_the_job_cancelled_with_its_outcome(sessions):
    job_id, user, attempt = make_state(sessions, "running, cancel requested")
    assert write(sessions, lambda s: lifecycle.pause(s, job_id, attempt, "paused", epoch=2)) == "cancelled"
    job = snapshot(sessions, job_id)
    assert (job["status"], job["paused"], job["epoch"], job["stop_reason"]) == ("cancelled", False, 2, "cancelled")


def test_only_the_owner_can_cancel(sessions):
    job_id, _user, _ = make_state(sessions, "queued")
    _other_job, stranger = submit(sessions)
    before = snapshot(sessions, job_id)
    assert write(sessions, lambda s: lifecycle.cancel(s, job_id, stranger)) is None
    assert snapshot(sessions, job_id) == before
