"""The reaper, the reconciler, the claim and the fence, against real databases (SQLite and PostgreSQL)
and a real filesystem broker: each rule is one conditional UPDATE, and only its winner rings."""

from __future__ import annotations

import base64
import datetime as dt
import json
import threading

import pytest
from sqlalchemy import event, select, update

from api.schemas import as_utc
from models import lifecycle, rounds
from models.tables import AuditEvent, EpochMetrics, Job, MaintenanceRound, User, Worker, utcnow
from models.validation import parse_service_spec
from worker import maintenance, runner
from worker.engine import RunState, pick_device
from worker.job_callbacks import DatabaseMetrics, Fence, LeaseLost

SPEC = {"task": "regression",
        "data": {"source": "sklearn", "name": "make_regression",
                 "params": {"n_samples": 100, "n_features": 3}},
        "model": {"layers": [{"type": "Linear", "out_features": 1}]},
        "training": {"epochs": 2}}
LONG_AGO = dt.timedelta(hours=1)


def add_job(ctx, **columns) -> str:
    """A job of alice's; a queued one is released to the broker (what a message of it finds)."""
    columns.setdefault("released_at", utcnow() if columns.get("status", "queued") == "queued" else None)
    with ctx.sessions() as session:
        user = session.query(User).filter_by(name="alice").one_or_none() or User(name="alice")
        session.add(user)
        session.flush()
        columns.setdefault("spec", SPEC)
        job = Job(user_id=user.id, name="j", epochs=2, **columns)
        session.add(job)
        session.commit()
        return job.id


def claim(ctx, job_id: str) -> int | None:
    """The attempt number a claim of ``job_id`` took, None if it took none."""
    claimed = runner.claim(ctx, job_id)
    return None if claimed is None else claimed[0].attempts


def job(ctx, job_id: str) -> Job:
    with ctx.sessions() as session:
        return session.get(Job, job_id)


def rung(ctx, queue: str = "cpu") -> list[str]:
    """The job ids waiting in the filesystem broker's queue folder (Celery's message protocol 2)."""
    ids = []
    for path in sorted((ctx.settings.home / "broker" / "queue").glob(f"*.{queue}.msg")):
        body = json.loads(base64.b64decode(json.loads(path.read_text())["body"]))
        ids.append(body[0][0])
    return ids


def add_worker(ctx, worker_id: str, queues: str, heartbeat_age=dt.timedelta(0), slots: int = 1) -> None:
    with ctx.sessions() as session:
        session.add(Worker(id=worker_id, hostname="h", queues=queues, slots=slots,
                           last_heartbeat_at=utcnow() - heartbeat_age))
        session.commit()


def running(ctx, attempts=1, lease_age=LONG_AGO, worker_id="gone:1", **columns) -> str:
    return add_job(ctx, status="running", attempts=attempts, worker_id=worker_id,
                   lease_expires_at=utcnow() - lease_age, **columns)


# --- reaper -------------------------------------------------------------------------------------


def test_the_reaper_requeues_a_job_whose_lease_expired_and_the_round_rings_for_it(worker_context):
    job_id = running(worker_context)
    add_worker(worker_context, "new-box:1", "cpu")

    assert maintenance.reap(worker_context) == [job_id]

    row = job(worker_context, job_id)
    assert (row.status, row.worker_id, row.lease_expires_at, row.attempts) == ("queued", None, None, 1)
    assert row.pending_reason == "requeued: worker gone:1 stopped renewing its lease (attempt 1 of 3)"
    assert row.released_at is None  # held until the dispatcher releases it again
    assert maintenance.reap(worker_context) == []  # done once, not again
    maintenance.sweep(worker_context)
    assert rung(worker_context) == [job_id]


def test_the_reaper_leaves_a_live_lease_alone(worker_context):
    job_id = running(worker_context, lease_age=-dt.timedelta(minutes=1))

    assert maintenance.reap(worker_context) == []
    assert job(worker_context, job_id).status == "running"


def test_a_job_whose_worker_was_lost_max_attempts_times_fails_saying_so(worker_context):
    job_id = running(worker_context, attempts=3, max_attempts=3)

    maintenance.reap(worker_context)

    row = job(worker_context, job_id)
    assert (row.status, row.error) == ("failed", "worker lost 3 times")
    assert rung(worker_context) == []


def test_a_lost_job_that_was_being_cancelled_ends_cancelled(worker_context):
    job_id = running(worker_context, cancel_requested=True)

    maintenance.reap(worker_context)

    assert (job(worker_context, job_id).status, rung(worker_context)) == ("cancelled", [])


# --- reconciler ---------------------------------------------------------------------------------


def test_the_reconciler_says_why_a_gpu_job_waits_and_clears_it_when_a_gpu_worker_comes(worker_context):
    add_worker(worker_context, "cpu-box:1", "cpu")
    job_id = add_job(worker_context, queue="gpu")

    maintenance.reconcile(worker_context)
    assert job(worker_context, job_id).pending_reason == "no live worker serves queue 'gpu' (jobs needing 1 GPU)"

    add_worker(worker_context, "gpu-box:1", "cpu,gpu")
    maintenance.reconcile(worker_context)
    assert job(worker_context, job_id).pending_reason is None


def test_a_worker_that_stopped_heartbeating_serves_nothing_and_is_pruned(worker_context):
    add_worker(worker_context, "dead:1", "cpu", heartbeat_age=LONG_AGO)
    job_id = add_job(worker_context)

    maintenance.reconcile(worker_context)
    maintenance.prune(worker_context)

    assert job(worker_context, job_id).pending_reason == "no live worker serves queue 'cpu'"
    with worker_context.sessions() as session:
        assert session.query(Worker).count() == 0


def test_a_maintenance_round_deletes_audit_events_past_their_retention(worker_context):
    with worker_context.sessions() as session:
        for action, age in (("submit", dt.timedelta(days=91)), ("cancel", dt.timedelta(days=89))):
            session.add(AuditEvent(user_id="usr_x", user_name="alice", action=action, at=utcnow() - age))
        session.commit()

    maintenance.prune(worker_context)  # audit_retention_days: 90

    with worker_context.sessions() as session:
        assert session.scalars(select(AuditEvent.action)).all() == ["cancel"]


# --- claim and fence ----------------------------------------------------------------------------


def test_the_cluster_takes_one_maintenance_round_every_interval_whoever_asks(worker_context):
    start, every = utcnow(), dt.timedelta(seconds=5)

    def ask(taker: str, seconds: float) -> bool:
        with worker_context.sessions() as session:
            return rounds.take_round(session, taker, start + dt.timedelta(seconds=seconds), every)

    assert ask("a:1", 0)  # the first round ever
    assert not ask("b:2", 1) and not ask("a:1", 4.9)  # taken by a:1, for everyone, until 5 s have passed
    assert ask("b:2", 5)  # then whoever asks first: a process that stopped asking holds nothing up
    assert not ask("a:1", 6)
    with worker_context.sessions() as session:
        row = session.get(MaintenanceRound, rounds.SWEEP)
        assert (row.taken_by, as_utc(row.taken_at)) == ("b:2", start + dt.timedelta(seconds=5))


def test_a_round_stamped_by_a_clock_running_ahead_holds_up_no_other_process(worker_context):
    now, every = utcnow(), dt.timedelta(seconds=5)
    with worker_context.sessions() as session:
        assert rounds.take_round(session, "ahead:1", now + dt.timedelta(hours=1), every)
        assert rounds.take_round(session, "right:2", now, every)  # not held for the hour to come
        assert not rounds.take_round(session, "right:3", now + dt.timedelta(seconds=1), every)


def test_a_worker_sweeps_only_when_it_takes_the_round(worker_context):
    job_id = running(worker_context)  # its lease expired: a round requeues it

    assert maintenance.sweep_when_due(worker_context, "a:1")
    assert job(worker_context, job_id).status == "queued"
    assert not maintenance.sweep_when_due(worker_context, "b:2")  # within half a heartbeat of a:1's round


def test_a_joining_worker_fills_its_slots_at_once_though_the_round_was_just_taken(worker_context):
    held = [add_job(worker_context, released_at=None) for _ in range(5)]  # waiting in the database
    assert maintenance.sweep_when_due(worker_context, "other:1")  # no live worker: nothing released
    assert rung(worker_context) == []

    maintenance.join(worker_context, "new-box:1", ["cpu"], 2, {"cpu": 2, "cuda": 0})

    # Its 2 free slots and the dispatcher's margin, without waiting for the next round.
    assert not maintenance.sweep_when_due(worker_context, "new-box:1")
    released = rung(worker_context)
    assert len(released) == 2 + worker_context.settings.dispatch_margin
    assert set(released) <= set(held)


@pytest.mark.parametrize("worker_context", ["postgresql"], indirect=True)
def test_of_many_processes_asking_at_once_one_takes_the_round(worker_context):
    now, every, askers = utcnow(), dt.timedelta(seconds=5), 8
    barrier, taken = threading.Barrier(askers, timeout=60), []

    def ask(taker: str) -> None:
        with worker_context.sessions() as session:
            barrier.wait()
            taken.append(rounds.take_round(session, taker, now, every))

    threads = [threading.Thread(target=ask, args=(f"w:{n}",)) for n in range(askers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(taken) == [False] * (askers - 1) + [True]


def test_a_job_is_claimed_by_one_message_only(worker_context):
    job_id = add_job(worker_context)

    assert claim(worker_context, job_id) == 1
    assert claim(worker_context, job_id) is None
    row = job(worker_context, job_id)
    assert (row.status, row.attempts, row.device) == ("running", 1, "cpu")
    assert row.lease_expires_at is not None


def test_the_claim_records_the_device_the_spec_asks_for_and_none_for_one_this_machine_lacks(worker_context):
    def claimed_on(device: str) -> str | None:
        spec = parse_service_spec({**SPEC, "resources": {"device": device}}).model_dump(mode="json")
        job_id = add_job(worker_context, spec=spec)
        claim(worker_context, job_id)
        return job(worker_context, job_id).device

    assert claimed_on("cpu") == "cpu"
    assert claimed_on("auto") == str(pick_device("auto"))
    assert claimed_on("mps") is None  # no MPS on this machine: the job fails saying so, on no device


def test_a_claim_writes_the_job_row_once_with_its_device_and_reads_nothing_first(worker_context):
    spec = parse_service_spec(SPEC).model_dump(mode="json")
    job_id = add_job(worker_context, spec=spec)
    statements = []
    listen = (worker_context.engine, "before_cursor_execute")

    def record(_conn, _cursor, statement, *_args):
        statements.append(" ".join(statement.split()[:3]))

    event.listen(*listen, record)
    try:
        assert claim(worker_context, job_id) == 1
    finally:
        event.remove(*listen, record)
    assert statements[0] == "UPDATE jobs SET"  # the claim, with its lease and its device
    assert statements.count("UPDATE jobs SET") == 1
    assert job(worker_context, job_id).device == "cpu"


def test_a_cancelled_or_exhausted_queued_job_is_not_claimed(worker_context):
    cancelled = add_job(worker_context, cancel_requested=True)
    exhausted = add_job(worker_context, attempts=3, max_attempts=3)

    assert claim(worker_context, cancelled) is None
    assert claim(worker_context, exhausted) is None
    assert runner.give_up_if_exhausted(worker_context, exhausted) == "gave up"
    assert job(worker_context, exhausted).error == "gave up after 3 attempts (max_attempts 3)"
    assert job(worker_context, cancelled).status == "queued"


def end_epoch(callback: DatabaseMetrics, state: RunState, metrics: dict) -> None:
    """An epoch's end as the trainer calls it (no checkpoint due)."""
    state.epoch = metrics["epoch"]
    callback.on_epoch_end(state, metrics)
    callback.on_epoch_done(state)


def test_an_attempt_that_lost_its_job_writes_nothing(worker_context):
    job_id = add_job(worker_context)
    first = claim(worker_context, job_id)
    with worker_context.sessions() as session:  # the lease runs out and the job goes to another worker
        session.get(Job, job_id).lease_expires_at = utcnow() - LONG_AGO
        session.commit()
    maintenance.reap(worker_context)
    with worker_context.sessions() as session:  # the dispatcher releases it again
        assert lifecycle.release(session, job_id)
        session.commit()
    second = claim(worker_context, job_id)
    assert (first, second) == (1, 2)

    stale = DatabaseMetrics(Fence(worker_context, job_id, first, "cpu"))
    metrics = {"epoch": 1, "loss": 1.0, "val_loss": 1.0}
    with pytest.raises(LeaseLost):
        end_epoch(stale, RunState(epochs=2, epoch=1, history=[metrics]), metrics)

    with worker_context.sessions() as session:
        assert session.query(EpochMetrics).count() == 0
        assert session.get(Job, job_id).epoch == 0


def test_a_resumed_attempts_epoch_row_replaces_the_lost_attempts(worker_context):
    job_id = add_job(worker_context)
    first = claim(worker_context, job_id)
    end_epoch(DatabaseMetrics(Fence(worker_context, job_id, first, "cpu")), RunState(epochs=2),
              {"epoch": 1, "loss": 2.0})
    with worker_context.sessions() as session:  # the lease runs out; the job is released and claimed again
        session.get(Job, job_id).lease_expires_at = utcnow() - LONG_AGO
        session.commit()
    maintenance.reap(worker_context)
    with worker_context.sessions() as session:
        assert lifecycle.release(session, job_id)
        session.commit()
    second = claim(worker_context, job_id)
    end_epoch(DatabaseMetrics(Fence(worker_context, job_id, second, "cpu")), RunState(epochs=2),
              {"epoch": 1, "loss": 1.0})

    with worker_context.sessions() as session:
        rows = session.scalars(select(EpochMetrics)).all()
    assert [(row.epoch, row.attempt, row.values["loss"]) for row in rows] == [(1, second, 1.0)]


def test_an_epoch_row_is_stamped_when_the_epoch_ended_not_when_its_write_got_through(worker_context):
    job_id = add_job(worker_context)
    fence = Fence(worker_context, job_id, claim(worker_context, job_id), "cpu")
    locked, release = threading.Event(), threading.Event()

    def hold_the_row() -> None:  # another writer holds the job row, so the epoch's write waits
        with worker_context.engine.connect() as connection:
            connection.execute(update(Job).where(Job.id == job_id).values(name="held"))
            locked.set()
            release.wait(10)
            connection.rollback()

    holder = threading.Thread(target=hold_the_row)
    holder.start()
    assert locked.wait(10)
    threading.Timer(0.5, release.set).start()
    metrics = {"epoch": 1, "loss": 1.0, "val_loss": 1.0}
    ended = utcnow()
    end_epoch(DatabaseMetrics(fence), RunState(epochs=2, epoch=1, history=[metrics]), metrics)
    written = utcnow()
    holder.join()

    with worker_context.sessions() as session:
        created = as_utc(session.get(EpochMetrics, (job_id, 1)).created_at)
    assert written - ended >= dt.timedelta(seconds=0.4)  # the write did wait
    assert ended <= created < ended + dt.timedelta(seconds=0.2)
