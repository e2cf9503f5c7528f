"""The runner in this process over real databases: whatever goes wrong, the job ends saying why."""

from __future__ import annotations

import dataclasses

import pytest
from conftest import wait_for
from sqlalchemy import event, select, update

from models import quotas
from models.storage import job_prefix
from models.tables import Artifact, EpochMetrics, Job, StoredBytes, User, Worker, utcnow
from worker import runner
from worker.job_callbacks import Fence

MOONS = {"task": "binary",
         "data": {"source": "sklearn", "name": "make_moons", "params": {"n_samples": 200, "random_state": 0}},
         "model": {"layers": [{"type": "Linear", "out_features": 8}, {"type": "ReLU"},
                              {"type": "Linear", "out_features": 1}]},
         "training": {"epochs": 3, "batch_size": 50}}


@pytest.fixture
def ctx(worker_context, monkeypatch):
    """The runner's context is the test deployment's."""
    monkeypatch.setattr(runner, "context", lambda: worker_context)
    return worker_context


def add_job(ctx, spec: dict) -> str:
    """A job of alice's, released to the broker: what a run_job message is for."""
    with ctx.sessions() as session:
        user = User(name="alice")
        session.add(user)
        session.flush()
        job = Job(user_id=user.id, name="j", spec=spec, epochs=spec["training"]["epochs"], released_at=utcnow())
        session.add(job)
        session.commit()
        return job.id


def job(ctx, job_id: str) -> Job:
    with ctx.sessions() as session:
        return session.get(Job, job_id)


def test_the_artifacts_a_run_keeps_are_its_users_stored_bytes(ctx):
    first = add_job(ctx, MOONS)
    with ctx.sessions() as session:
        user_id = session.get(Job, first).user_id
        second = Job(user_id=user_id, name="j2", spec={**MOONS, "seed": 1}, epochs=3, released_at=utcnow())
        session.add(second)
        session.commit()
        second = second.id

    assert runner.run_job(first) == "succeeded"
    assert runner.run_job(second) == "succeeded"

    with ctx.sessions() as session:
        sizes = {job_id: sum(session.scalars(select(Artifact.size).where(Artifact.job_id == job_id)))
                 for job_id in (first, second)}
        # Checkpoints came and went each epoch (keep_last 2): what is counted is what the rows hold at the end.
        assert all(sizes.values())
        assert {job_id: session.get(Job, job_id).stored_bytes for job_id in sizes} == sizes
        assert session.get(StoredBytes, user_id).artifacts == sum(sizes.values())
        assert quotas.use(session, user_id, "storage_bytes") == sum(sizes.values())


def test_a_job_runs_in_process_to_success(ctx):
    job_id = add_job(ctx, MOONS)

    assert runner.run_job(job_id) == "succeeded"
    assert runner.run_job(job_id) == "skipped"  # a late duplicate
    with ctx.sessions() as session:
        rows = session.scalars(select(Artifact).where(Artifact.job_id == job_id)).all()
        epochs = session.scalars(select(EpochMetrics.epoch).where(EpochMetrics.job_id == job_id)).all()
    assert sorted(row.name for row in rows) == ["checkpoints/epoch-0002.pt", "checkpoints/epoch-0003.pt",
                                                 "metrics.jsonl", "model.json", "weights.safetensors"]
    # keep_last 2: epoch 1's checkpoint was pruned, its row and then its file; the store holds what rows name.
    assert sorted(ctx.store.list_uris(job_prefix(job_id))) == sorted(row.uri for row in rows)
    assert sorted(epochs) == [1, 2, 3]
    assert not list((ctx.settings.home / "scratch").glob(f"{job_id}*"))  # the scratch folder is cleaned up


def test_epoch_writes_dont_wait_for_the_wal_flush_but_one_before_deleting_files_does(ctx):
    said = []

    def record(_connection, _cursor, statement, *_rest):
        if statement.startswith("SET LOCAL synchronous_commit"):
            said.append(statement.removeprefix("SET LOCAL synchronous_commit = "))

    event.listen(ctx.engine, "before_cursor_execute", record)
    try:  # 3 epochs, a checkpoint each, keep_last 2: epoch 3's transaction prunes epoch 1's checkpoint
        assert runner.run_job(add_job(ctx, MOONS)) == "succeeded"
    finally:
        event.remove(ctx.engine, "before_cursor_execute", record)
    if ctx.engine.dialect.name == "postgresql":
        # Each epoch's commit is asynchronous (renewals may add some), except the one whose files go after it.
        assert said.count("off") >= 3 and said.count("on") == 1, said
    else:
        assert said == []  # SQLite has no such setting: every commit is as durable as it makes it


def test_a_deleted_dataset_fails_the_job_naming_the_field(ctx):
    job_id = add_job(ctx, {**MOONS, "data": {"source": "dataset", "dataset_id": "ds_gone", "target": "y"}})

    assert runner.run_job(job_id) == "failed"
    assert job(ctx, job_id).error == "data.dataset_id: no dataset 'ds_gone' (deleted?)"


def test_a_local_file_source_is_refused_by_the_worker(ctx):
    job_id = add_job(ctx, {**MOONS, "data": {"source": "file", "path": "/etc/passwd", "target": "x"}})

    assert runner.run_job(job_id) == "failed"
    assert job(ctx, job_id).error.startswith("data.source: 'file' reads a path on the machine that trains")


def test_an_unexpected_engine_error_fails_the_job_in_one_line_and_the_runner_goes_on(ctx, monkeypatch):
    def broken(*_args, **_kwargs):
        raise RuntimeError("CUDA error: out of memory\nTried to allocate 2.00 GiB")

    monkeypatch.setattr(runner, "train", broken)
    job_id = add_job(ctx, MOONS)

    assert runner.run_job(job_id) == "failed"
    assert job(ctx, job_id).error == "RuntimeError: CUDA error: out of memory Tried to allocate 2.00 GiB"


def test_the_deployment_run_time_limit_fails_a_long_job(ctx, monkeypatch):
    limited = dataclasses.replace(ctx, settings=ctx.settings.model_copy(update={"max_runtime_seconds": 1}))
    monkeypatch.setattr(runner, "context", lambda: limited)
    job_id = add_job(ctx, {**MOONS, "training": {"epochs": 10000, "batch_size": 10}})

    assert runner.run_job(job_id) == "failed"
    row = job(ctx, job_id)
    assert row.error == ("timed out after 1 s of training (limit: training.max_runtime_seconds, at most the "
                         "deployment's max_runtime_seconds)")
    assert 0 < row.epoch < 10000


def test_a_job_of_a_stopping_worker_goes_back_to_the_queue_and_is_rung_for(ctx, monkeypatch):
    monkeypatch.setattr(runner, "draining", lambda: True)
    job_id = add_job(ctx, {**MOONS, "training": {"epochs": 10000, "batch_size": 10}})
    with ctx.sessions() as session:  # another worker is live, with a free slot
        session.add(Worker(id="other-box:1", hostname="other-box", queues="cpu", slots=1))
        session.commit()

    assert runner.run_job(job_id) == "requeued"
    row = job(ctx, job_id)
    assert (row.status, row.worker_id, row.attempts, row.max_attempts) == ("queued", None, 1, 4)
    assert row.pending_reason == "requeued: its worker shut down"
    wait_for(lambda: len(list((ctx.settings.home / "broker" / "queue").glob("*.cpu.msg"))) == 1, 30,
             "the dispatcher to ring for it")


def test_an_attempt_that_loses_its_job_mid_upload_overwrites_nothing_and_leaves_no_file(ctx, monkeypatch):
    job_id = add_job(ctx, {**MOONS, "checkpoint": {"every_n_epochs": 1, "keep_last": 5}})
    put_file = ctx.store.put_file
    winner = {}

    def taken_over_during_the_second_upload(local_path, key):
        if key.endswith("epoch-0002.pt") and not winner:
            # Past this attempt's lease check, another worker takes the job and stores its own epoch 2...
            with ctx.sessions() as session:
                session.execute(update(Job).where(Job.id == job_id).values(attempts=2, worker_id="other"))
                its_key = Fence(ctx, job_id, 2, "cpu").key("checkpoints/epoch-0002.pt")
                winner["uri"] = ctx.store.put_bytes(b"the winner's", its_key)[0]
                session.add(Artifact(job_id=job_id, kind="checkpoint", name="checkpoints/epoch-0002.pt",
                                     uri=winner["uri"], size=12, sha256="-", epoch=2))
                session.commit()
        return put_file(local_path, key)  # ...and this one uploads all the same

    monkeypatch.setattr(ctx.store, "put_file", taken_over_during_the_second_upload)

    assert runner.run_job(job_id) == "lease lost"
    with ctx.sessions() as session:
        rows = {a.name: a.uri for a in session.scalars(select(Artifact).where(Artifact.job_id == job_id))}
    assert rows == {"checkpoints/epoch-0001.pt": ctx.store.uri(f"jobs/{job_id}/attempt-1/checkpoints/epoch-0001.pt"),
                    "checkpoints/epoch-0002.pt": winner["uri"]}
    with ctx.store.open(winner["uri"]) as stored:
        assert stored.read() == b"the winner's"
    assert ctx.store.list_uris(f"jobs/{job_id}") == sorted(rows.values())  # the lost attempt's upload is gone


@pytest.fixture
def stopping():
    """This process as a pool process of a worker that is shutting down (the drain flag set)."""
    from worker import context

    context.start_draining()
    yield
    context._drain_flag[0] = 0  # the flag is the process's: leave it as the next test expects it


def claimed_by_a_live_worker(ctx) -> Fence:
    """A running job of alice's, claimed by this process as a registered worker of one slot."""
    from worker.context import worker_id

    with ctx.sessions() as session:
        session.add(Worker(id=worker_id(), hostname="here", queues="cpu", slots=1, last_heartbeat_at=utcnow()))
        session.commit()
    job_id = add_job(ctx, MOONS)
    claimed, _spec, _problem, _device, job_log = runner.claim(ctx, job_id)
    fence = Fence(ctx, job_id, claimed.attempts, claimed.queue, job_log)
    fence.hand_back_reason = "requeued: its worker shut down"
    return fence


def test_a_stopping_worker_that_hands_its_job_back_offers_no_slot_so_the_job_waits_for_another(ctx, stopping):
    from models.dispatch import dispatch

    fence = claimed_by_a_live_worker(ctx)
    assert runner.hand_back(fence) == "requeued"
    with ctx.sessions() as session:
        assert session.scalar(select(Worker.slots)) == 0
    assert dispatch(ctx, ["cpu"]) == []  # not rung to the stopping worker, which would only reject it
    assert job(ctx, fence.job_id).released_at is None


def test_a_worker_that_goes_on_keeps_its_slot_after_a_hand_back(ctx):
    from models.dispatch import dispatch

    fence = claimed_by_a_live_worker(ctx)
    fence.hand_back_reason = "requeued: preempted by a high-priority job (it ran at low)"
    assert runner.hand_back(fence) == "requeued"
    with ctx.sessions() as session:
        assert session.scalar(select(Worker.slots)) == 1
    assert dispatch(ctx, ["cpu"]) == [fence.job_id]
