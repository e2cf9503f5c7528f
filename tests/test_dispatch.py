"""The dispatcher against real databases (SQLite and PostgreSQL) and a real filesystem broker: the broker
holds only what free slots can take, picked by fair share, then priority and age; quotas hold jobs back
with a reason; a lost message is rung again; a high job may ask a lower one for its slot."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime as dt

import pytest
from conftest import wait_for
from sqlalchemy import func, select, text
from test_worker_maintenance import LONG_AGO, SPEC, add_worker, job, rung

from models import dispatch, lifecycle
from models.tables import Job, User, utcnow

SOON = dt.timedelta(minutes=5)


def user(ctx, name: str, **columns) -> str:
    with ctx.sessions() as session:
        row = session.query(User).filter_by(name=name).one_or_none() or User(name=name, **columns)
        session.add(row)
        session.commit()
        return row.id


def queued(ctx, owner: str, priority: str = "normal", age: dt.timedelta = dt.timedelta(0), **columns) -> str:
    with ctx.sessions() as session:
        row = Job(user_id=user(ctx, owner), name=f"{owner}-{priority}", spec=SPEC, epochs=2,
                  priority=dispatch.PRIORITIES[priority], created_at=utcnow() - age, **columns)
        session.add(row)
        session.commit()
        return row.id


def running(ctx, owner: str, worker_id: str, priority: str = "normal", started_ago=dt.timedelta(seconds=1)) -> str:
    return queued(ctx, owner, priority, status="running", attempts=1, worker_id=worker_id,
                  started_at=utcnow() - started_ago, lease_expires_at=utcnow() + SOON)


def with_settings(ctx, **fields):
    return dataclasses.replace(ctx, settings=ctx.settings.model_copy(update=fields))


def test_on_an_idle_cluster_a_job_is_released_at_once(worker_context):
    add_worker(worker_context, "box:1", "cpu")
    job_id = queued(worker_context, "alice")

    assert dispatch.dispatch(worker_context, ["cpu"]) == [job_id]
    assert rung(worker_context) == [job_id]
    assert job(worker_context, job_id).released_at is not None
    assert dispatch.dispatch(worker_context, ["cpu"]) == []  # released once, not again


def test_with_no_live_worker_nothing_is_released(worker_context):
    add_worker(worker_context, "dead:1", "cpu", heartbeat_age=LONG_AGO)
    queued(worker_context, "alice")

    assert dispatch.dispatch(worker_context) == []
    assert rung(worker_context) == []


def test_the_broker_holds_only_the_free_slots_and_the_margin(worker_context):
    add_worker(worker_context, "box:1", "cpu", slots=2)
    running(worker_context, "alice", "box:1")
    jobs = [queued(worker_context, "alice", age=dt.timedelta(seconds=10 - i)) for i in range(5)]

    # One slot free, plus dispatch_margin (1): the two oldest.
    assert dispatch.dispatch(worker_context) == jobs[:2]
    assert dispatch.dispatch(worker_context) == []  # both still wait for a worker to claim them
    assert [job(worker_context, j).released_at is None for j in jobs] == [False, False, True, True, True]


def test_a_free_slot_goes_to_the_user_with_the_fewest_active_jobs_not_the_oldest_job(worker_context):
    add_worker(worker_context, "box:1", "cpu")
    running(worker_context, "alice", "box:1")
    alices = [queued(worker_context, "alice", age=dt.timedelta(minutes=10 - i)) for i in range(5)]
    bobs = queued(worker_context, "bob")

    # alice runs one job; bob runs none: bob's only job goes first, though alice's waited longer.
    assert dispatch.dispatch(worker_context) == [bobs]
    assert all(job(worker_context, j).released_at is None for j in alices)


def test_between_users_with_as_many_jobs_the_one_who_used_less_recently_goes_first(worker_context):
    add_worker(worker_context, "box:1", "cpu")
    with worker_context.sessions() as session:  # alice ran for an hour a minute ago; bob for a minute
        for owner, seconds in (("alice", 3600), ("bob", 60)):
            ended = utcnow() - dt.timedelta(minutes=1)
            session.add(Job(user_id=user(worker_context, owner), name="done", spec=SPEC, epochs=2,
                            status="succeeded", started_at=ended - dt.timedelta(seconds=seconds),
                            finished_at=ended))
        session.commit()
    queued(worker_context, "alice", age=dt.timedelta(minutes=5))
    bobs = queued(worker_context, "bob")

    assert dispatch.dispatch(with_settings(worker_context, dispatch_margin=0)) == [bobs]


def test_a_users_share_weighs_their_usage(worker_context):
    add_worker(worker_context, "box:1", "cpu", slots=3)
    user(worker_context, "alice", share=2.0)
    running(worker_context, "alice", "box:1")
    running(worker_context, "bob", "box:1")
    alices = queued(worker_context, "alice", age=dt.timedelta(minutes=1))
    queued(worker_context, "bob", age=dt.timedelta(minutes=2))

    # Both run one job; alice's share is twice bob's, so her one job weighs half as much.
    assert dispatch.dispatch(with_settings(worker_context, dispatch_margin=0)) == [alices]


def test_within_a_user_a_higher_priority_goes_first_then_the_older(worker_context):
    add_worker(worker_context, "box:1", "cpu", slots=3)
    old_low = queued(worker_context, "alice", "low", age=dt.timedelta(minutes=9))
    old_normal = queued(worker_context, "alice", "normal", age=dt.timedelta(minutes=8))
    new_high = queued(worker_context, "alice", "high")
    new_normal = queued(worker_context, "alice", "normal")

    assert dispatch.dispatch(worker_context) == [new_high, old_normal, new_normal, old_low]


def test_a_higher_job_submitted_after_a_lower_one_was_released_still_goes_first(worker_context):
    add_worker(worker_context, "box:1", "cpu")
    running(worker_context, "alice", "box:1")
    low = queued(worker_context, "alice", "low", age=dt.timedelta(minutes=1))
    assert dispatch.dispatch(worker_context) == [low]  # the margin: it waits in the broker
    high = queued(worker_context, "alice", "high")

    # The low job is held back again (a worker skips its message) and the high one takes its place.
    assert dispatch.dispatch(worker_context, ["cpu"]) == [high]
    assert job(worker_context, low).released_at is None


def test_a_user_at_the_running_quota_waits_saying_so_while_others_go(worker_context):
    add_worker(worker_context, "box:1", "cpu", slots=4)
    ctx = with_settings(worker_context, quota_running_jobs=1)
    running(ctx, "alice", "box:1")
    alices = queued(ctx, "alice", age=dt.timedelta(minutes=1))
    bobs = queued(ctx, "bob")

    assert dispatch.dispatch(ctx) == [bobs]
    assert job(ctx, alices).pending_reason == ("waiting: 1 of your 1 running jobs are in use "
                                               "(quota_running_jobs)")
    with ctx.sessions() as session:  # alice's override lifts it
        session.query(User).filter_by(name="alice").one().quotas = {"running_jobs": 2}
        session.commit()
    assert dispatch.dispatch(ctx) == [alices]
    assert job(ctx, alices).pending_reason is None


def test_a_gpu_job_past_the_users_gpu_quota_waits_saying_so(worker_context):
    add_worker(worker_context, "gpu-box:1", "gpu.2", slots=2)
    ctx = with_settings(worker_context, quota_gpus=3)
    running(ctx, "alice", "gpu-box:1")
    with ctx.sessions() as session:
        session.query(Job).update({Job.queue: "gpu.2"})
        session.commit()
    waiting = queued(ctx, "alice", queue="gpu.2")

    assert dispatch.dispatch(ctx) == []
    assert job(ctx, waiting).pending_reason == ("waiting: 2 of your 3 GPUs are in use and this job needs 2 "
                                                "(quota_gpus)")


def test_a_released_job_nobody_took_while_a_worker_is_free_is_rung_again_once(worker_context):
    add_worker(worker_context, "box:1", "cpu", slots=2)
    lost = queued(worker_context, "alice", released_at=utcnow() - LONG_AGO)
    fresh = queued(worker_context, "alice", released_at=utcnow())

    assert dispatch.dispatch(worker_context) == [lost]
    assert dispatch.dispatch(worker_context) == []  # rung just now: wait reconcile_seconds again
    assert rung(worker_context) == [lost]
    assert fresh not in rung(worker_context)


def test_a_released_job_waiting_behind_busy_workers_is_not_rung_again(worker_context):
    add_worker(worker_context, "box:1", "cpu")
    running(worker_context, "alice", "box:1")
    queued(worker_context, "alice", released_at=utcnow() - LONG_AGO)

    assert dispatch.dispatch(worker_context) == []
    assert rung(worker_context) == []


def test_a_job_back_in_the_queue_is_dispatched_again(worker_context):
    add_worker(worker_context, "box:1", "cpu")
    job_id = queued(worker_context, "alice")
    assert dispatch.dispatch(worker_context) == [job_id]
    with worker_context.sessions() as session:
        claimed = lifecycle.claim(session, job_id, "box:1", 60)
        assert lifecycle.hand_back(session, job_id, claimed.attempts, "requeued: its worker shut down") == "queued"
        session.commit()

    assert job(worker_context, job_id).released_at is None
    assert dispatch.dispatch(worker_context) == [job_id]


def test_a_high_job_with_no_free_slot_asks_the_newest_lower_job_of_its_own_user_to_hand_back(worker_context):
    add_worker(worker_context, "box:1", "cpu", slots=2)
    ctx = with_settings(worker_context, preemption=True, dispatch_margin=0)
    older = running(ctx, "alice", "box:1", "low", started_ago=dt.timedelta(minutes=5))
    newer = running(ctx, "alice", "box:1", "low", started_ago=dt.timedelta(minutes=1))
    ahead = queued(ctx, "alice", "normal", released_at=utcnow(), age=dt.timedelta(minutes=9))
    high = queued(ctx, "alice", "high")

    # The high job goes to the broker, and the normal one released before it is held back again, so the
    # slot being freed is the high job's.
    assert dispatch.dispatch(ctx) == [high]
    assert job(ctx, newer).preempt_reason == "preempted by a high-priority job (it ran at low)"
    assert job(ctx, older).preempt_reason is None
    assert job(ctx, ahead).released_at is None
    assert dispatch.dispatch(ctx) == []  # one slot is being freed already: nobody else is asked
    assert job(ctx, older).preempt_reason is None


def test_a_high_job_preempts_another_user_only_when_that_user_runs_more_than_their_share(worker_context):
    add_worker(worker_context, "box:1", "cpu", slots=2)
    ctx = with_settings(worker_context, preemption=True, dispatch_margin=0)
    alices = running(ctx, "alice", "box:1", started_ago=dt.timedelta(minutes=5))
    bobs = running(ctx, "bob", "box:1", started_ago=dt.timedelta(minutes=1))
    queued(ctx, "carol", "high")

    # Three users with work: a third of the slots is each one's share; alice and bob run half each.
    dispatch.dispatch(ctx)
    assert (job(ctx, alices).preempt_reason, job(ctx, bobs).preempt_reason is not None) == (None, True)


def test_a_user_within_their_share_keeps_their_slot_and_the_high_jobs_owner_yields_their_own(worker_context):
    add_worker(worker_context, "box:1", "cpu", slots=2)
    ctx = with_settings(worker_context, preemption=True, dispatch_margin=0)
    carols = running(ctx, "carol", "box:1", started_ago=dt.timedelta(minutes=5))
    alices = running(ctx, "alice", "box:1", started_ago=dt.timedelta(minutes=1))  # the newest, but at share
    queued(ctx, "carol", "high")

    dispatch.dispatch(ctx)
    assert job(ctx, alices).preempt_reason is None
    assert job(ctx, carols).preempt_reason == "preempted by a high-priority job (it ran at normal)"


def test_without_preemption_a_high_job_waits_its_turn(worker_context):
    add_worker(worker_context, "box:1", "cpu")
    ctx = with_settings(worker_context, dispatch_margin=0)
    low = running(ctx, "alice", "box:1", "low")
    queued(ctx, "alice", "high")

    assert dispatch.dispatch(ctx) == []
    assert job(ctx, low).preempt_reason is None


def test_a_submit_goes_to_the_broker_with_its_insert_only_when_nothing_else_could_have_the_slot(worker_context):
    ctx = with_settings(worker_context, quota_running_jobs=2)
    with ctx.sessions() as session:
        alice = session.get(User, user(ctx, "alice"))
        assert not dispatch.admits_at_once(session, ctx, "cpu", alice)  # no worker serves cpu
    add_worker(ctx, "box:1", "cpu")
    with ctx.sessions() as session:
        alice = session.get(User, user(ctx, "alice"))
        assert dispatch.admits_at_once(session, ctx, "cpu", alice)  # idle: the slot is the new job's
    bobs = queued(ctx, "bob")
    with ctx.sessions() as session:  # another job waits held: fair share must choose
        assert not dispatch.admits_at_once(session, ctx, "cpu", session.get(User, user(ctx, "alice")))
    with ctx.sessions() as session:
        session.get(Job, bobs).status = "cancelled"
        session.commit()
    running(ctx, "alice", "box:0")
    running(ctx, "alice", "box:0")
    with ctx.sessions() as session:  # alice's two running jobs fill her quota, though box:1 is free
        assert not dispatch.admits_at_once(session, ctx, "cpu", session.get(User, user(ctx, "alice")))


def test_a_large_room_is_released_a_batch_a_transaction_each_published_once_it_commits(worker_context, monkeypatch):
    monkeypatch.setattr(dispatch, "RELEASE_BATCH", 2)
    add_worker(worker_context, "box:1", "cpu", slots=4)
    jobs = [queued(worker_context, "alice", age=dt.timedelta(seconds=10 - i)) for i in range(7)]

    class Recording:
        """The publisher, noting at each publish how many jobs the database holds released (committed)."""

        def __init__(self, inner):
            self.inner, self.released = inner, []

        def publish(self, job_id: str, queue: str) -> None:
            with worker_context.sessions() as session:
                self.released.append(session.scalar(select(func.count()).where(Job.released_at.is_not(None))))
            self.inner.publish(job_id, queue)

    recording = Recording(worker_context.publisher)
    # Four free slots and the margin: five jobs, two, two and one a transaction, each published once it committed.
    assert dispatch.dispatch(dataclasses.replace(worker_context, publisher=recording)) == jobs[:5]
    assert recording.released == [2, 2, 4, 4, 5]
    assert sorted(rung(worker_context)) == sorted(jobs[:5])  # the broker's folder: same-tick messages in any order


@pytest.mark.parametrize("worker_context", ["postgresql"], indirect=True)  # SQLite serializes writes itself
def test_one_dispatcher_per_queue_at_a_time_a_round_leaves_a_held_queue_and_a_job_end_waits(worker_context):
    add_worker(worker_context, "box:1", "cpu")
    job_id = queued(worker_context, "alice")
    holder = worker_context.sessions()  # another dispatcher, in the middle of its transaction on queue cpu
    pool = concurrent.futures.ThreadPoolExecutor(1)
    try:
        assert dispatch.lock_queues(holder, {"cpu"}, wait=True) == {"cpu"}
        assert dispatch.dispatch(worker_context) == []  # a maintenance round: the holder will see the free slot
        assert job(worker_context, job_id).released_at is None

        after_a_job_end = pool.submit(dispatch.dispatch, worker_context, ["cpu"])
        waiting = text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted")
        wait_for(lambda: holder.scalar(waiting) == 1, what="the job end's dispatch to wait for the lock")
        assert not after_a_job_end.done()
    finally:
        holder.rollback()  # the holder's transaction ends: its lock goes with it
        holder.close()
        pool.shutdown()
    assert after_a_job_end.result() == [job_id]
    assert rung(worker_context) == [job_id]


@pytest.mark.parametrize("worker_context", ["postgresql"], indirect=True)
def test_a_dispatch_that_waits_past_the_lock_wait_for_a_stalled_holder_gives_up_and_the_next_round_goes(
        worker_context, monkeypatch, caplog):
    monkeypatch.setattr(dispatch, "LOCK_WAIT_SECONDS", 0.2)
    add_worker(worker_context, "box:1", "cpu")
    job_id = queued(worker_context, "alice")
    holder = worker_context.sessions()  # a dispatcher whose process froze mid-transaction (SIGSTOP)
    try:
        dispatch.lock_queues(holder, {"cpu"}, wait=True)
        assert dispatch.dispatch(worker_context, ["cpu"]) == []  # a submit's dispatch: it does not hang
        assert "stayed locked by another dispatcher" in caplog.text
    finally:
        holder.rollback()
        holder.close()
    assert dispatch.dispatch(worker_context) == [job_id]  # the next round
