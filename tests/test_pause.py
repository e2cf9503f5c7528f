"""Pausing jobs (a sweep's trials): a job whose row says ``stop_at_epoch`` pauses after that epoch with its
outputs stored, waits held in the queue, and resumes from its checkpoint as if it had never stopped; the
dispatcher and the reconciler leave a paused job alone.

The sweep controller sets ``stop_at_epoch`` in production; here the tests set it on the row themselves. The
dispatcher's part runs against SQLite and PostgreSQL without a worker; the rest with a real worker (the
embedded deployment: SQLite, filesystem broker and store)."""

from __future__ import annotations

import dataclasses
import datetime as dt

import pytest
from conftest import running_service, worker_settings
from specs import blobs_spec
from sqlalchemy import select
from test_dispatch import queued, running
from test_worker_maintenance import add_worker, job

from models import dispatch, lifecycle, quotas
from models.liveness import NO_WORKER, stalls
from models.storage import job_prefix
from models.tables import Artifact, EpochMetrics, Job, Sweep, User
from models.validation import parse_service_spec, parse_spec
from worker import maintenance
from worker.engine import PAUSED, train
from worker.job_callbacks import PauseAt

API = "/api/v1"
WAITING = "paused after epoch 2: waiting for its sweep to promote or stop it"
SPEC = blobs_spec("trial", epochs=6, n_samples=300, checkpoints=True)


# --- the dispatcher and the reconciler, no worker -------------------------------------------------


def paused(ctx, owner: str = "alice", priority: str = "normal", **columns) -> str:
    """A job of ``owner`` as a pause leaves it: queued, paused, held, saying why."""
    return queued(ctx, owner, priority, paused=True, pending_reason=WAITING, attempts=1, max_attempts=4, **columns)


def test_the_dispatcher_never_releases_a_paused_job_nor_counts_it_as_waiting(worker_context):
    add_worker(worker_context, "box:1", "cpu")
    held = paused(worker_context, age=dt.timedelta(minutes=5))
    with worker_context.sessions() as session:
        assert dispatch.queue_states(session, worker_context, {"cpu"})["cpu"].held == 0

    assert dispatch.dispatch(worker_context) == []
    waiting = queued(worker_context, "alice")
    assert dispatch.dispatch(worker_context) == [waiting]  # the younger job: the paused one is no candidate
    row = job(worker_context, held)
    assert (row.status, row.paused, row.released_at, row.pending_reason) == ("queued", True, None, WAITING)


def test_a_paused_high_priority_job_asks_no_running_job_for_its_slot(worker_context):
    add_worker(worker_context, "box:1", "cpu")
    low = running(worker_context, "bob", "box:1", "low")
    paused(worker_context, priority="high")

    preempting = dataclasses.replace(worker_context,
                                     settings=worker_context.settings.model_copy(update={"preemption": True}))
    assert dispatch.dispatch(preempting) == []
    assert job(worker_context, low).preempt_reason is None


def test_the_reconciler_keeps_a_paused_job_s_reason_and_no_stall_is_reported_for_it(worker_context):
    held = paused(worker_context)
    other = queued(worker_context, "alice")  # no live worker serves "cpu"

    maintenance.reconcile(worker_context)

    assert job(worker_context, held).pending_reason == WAITING
    assert job(worker_context, other).pending_reason.startswith(NO_WORKER)
    with worker_context.sessions() as session:
        assert stalls(session, worker_context.settings).unserved == {"cpu": 1}


def test_a_paused_job_does_not_count_against_the_queued_jobs_quota(worker_context):
    held = paused(worker_context)
    waiting = queued(worker_context, "alice")
    owner = job(worker_context, held).user_id
    with worker_context.sessions() as session:
        assert quotas.use(session, owner, "queued_jobs") == 1  # the waiting one: a paused one holds no place
        load = dispatch.read_load(session, worker_context.settings, owner, ("queued_jobs",))
        assert load.uses["queued_jobs"] == 1 and job(worker_context, waiting).user_id == owner


# --- with a real worker ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """One embedded deployment for the module: every test waits for its own jobs to pause or end."""
    with running_service(worker_settings(tmp_path_factory.mktemp("home"))) as service:
        yield service


@pytest.fixture(scope="module")
def engine_weights(tmp_path_factory) -> dict[str, bytes]:
    """The weights the engine alone makes of SPEC: paused after epoch 2, and run through in one go."""
    spec = parse_spec(SPEC)
    at_2 = train(spec, tmp_path_factory.mktemp("paused"), callbacks=[PauseAt(2)])
    assert (at_2.stop_reason, at_2.epochs_completed) == (PAUSED, 2)
    whole = train(spec, tmp_path_factory.mktemp("whole"))
    return {"paused at 2": at_2.weights_path.read_bytes(), "whole": whole.weights_path.read_bytes()}


def submit_trial(service, stop_at_epoch: int | None, trial: int = 0) -> str:
    """Insert a trial job of a new sweep as the sweep controller does (``stop_at_epoch`` on the row from the
    start), then dispatch it. The sweep is not ``running``, so the controller leaves it alone: the test
    decides for its trial itself."""
    parsed = parse_service_spec(SPEC, service.settings.limits)
    with service.sessions() as session:
        owner = session.scalar(select(User.id).where(User.name == "alice"))
        sweep = Sweep(user_id=owner, name="s", request={}, base={}, trials=[{}], rungs=[2, 6], metric="loss",
                      mode="min", status="cancelled")
        session.add(sweep)
        session.flush()
        job_id = lifecycle.submit(session, user_id=owner, name=parsed.name, spec=parsed.model_dump(mode="json"),
                                  queue="cpu", epochs=parsed.training.epochs, sweep_id=sweep.id, sweep_trial=trial,
                                  stop_at_epoch=stop_at_epoch).id
        session.commit()
    dispatch.dispatch(services(service), ["cpu"])
    return job_id


def services(service):
    return service.app.extensions["torchyard"]


def change(service, transition) -> bool:
    """One lifecycle call of the sweep controller's, committed, then a dispatch."""
    with service.sessions() as session:
        done = transition(session)
        session.commit()
    dispatch.dispatch(services(service), ["cpu"])
    return done


def wait_paused(service, job_id: str, epoch: int) -> dict:
    """Wait until the job is paused at ``epoch``; return it as the API shows it."""
    def paused_there():
        with service.sessions() as session:
            row = session.get(Job, job_id)
            assert row.status in ("queued", "running"), (row.status, row.error)
            return row.paused and row.epoch == epoch

    service.wait_for(paused_there, 60, f"job {job_id} to pause after epoch {epoch}")
    return service.job(job_id)


def weights(service, job_id: str) -> bytes:
    response = service.client.get(f"{API}/jobs/{job_id}/weights", headers=service.headers)
    assert response.status_code == 200, response.get_json()
    return response.data


def stored_weights_files(service, job_id: str) -> list[str]:
    return [uri for uri in service.store.list_uris(job_prefix(job_id)) if uri.endswith("weights.safetensors")]


def test_a_job_pauses_at_its_epoch_resumes_twice_and_ends_byte_identical_to_an_uninterrupted_run(
        service, engine_weights):
    job_id = submit_trial(service, stop_at_epoch=2)

    shown = wait_paused(service, job_id, 2)
    assert (shown["status"], shown["paused"], shown["sweep_trial"], shown["pending_reason"]) == \
        ("queued", True, 0, WAITING)
    assert shown["sweep_id"].startswith("swp_")
    assert (shown["attempts"], shown["max_attempts"], shown["progress"]["epoch"]) == (1, 4, 2)
    assert shown["final_metrics"]["epoch"] == 2 and shown["best"]["epoch"] <= 2
    assert weights(service, job_id) == engine_weights["paused at 2"]
    logs = service.client.get(f"{API}/jobs/{job_id}/logs", headers=service.headers).get_json()["lines"]
    assert logs[-1]["text"] == ("paused after epoch 2 (stop_at_epoch); the next attempt resumes from the "
                                "checkpoint saved now")
    # Maintenance rounds (the worker's, and one here) leave it held, saying why it waits.
    maintenance.sweep(services(service))
    row = job(services(service), job_id)
    assert (row.released_at, row.pending_reason) == (None, WAITING)

    assert change(service, lambda session: lifecycle.unpause(session, job_id, 4))
    shown = wait_paused(service, job_id, 4)
    assert shown["attempts"] == 2 and shown["pending_reason"].startswith("paused after epoch 4: ")

    assert change(service, lambda session: lifecycle.unpause(session, job_id, None))
    shown = service.wait_status(job_id)
    assert (shown["status"], shown["stop_reason"], shown["paused"], shown["attempts"]) == \
        ("succeeded", "completed", False, 3)
    assert weights(service, job_id) == engine_weights["whole"]
    with service.sessions() as session:
        rows = session.execute(select(EpochMetrics.epoch, EpochMetrics.attempt).where(EpochMetrics.job_id == job_id)
                               .order_by(EpochMetrics.epoch)).all()
    assert [tuple(row) for row in rows] == [(1, 1), (2, 1), (3, 2), (4, 2), (5, 3), (6, 3)]
    assert len(stored_weights_files(service, job_id)) == 1  # the paused attempts' weights were replaced


def test_a_pruned_paused_job_succeeds_with_the_weights_of_its_pause(service, engine_weights):
    job_id = submit_trial(service, stop_at_epoch=2, trial=1)
    wait_paused(service, job_id, 2)

    assert change(service, lambda session: lifecycle.end_paused(session, job_id, "sweep_pruned"))

    shown = service.job(job_id)
    assert (shown["status"], shown["stop_reason"], shown["paused"], shown["pending_reason"]) == \
        ("succeeded", "sweep_pruned", False, None)
    assert shown["progress"] == {"epoch": 2, "epochs": 6} and shown["finished_at"] is not None
    assert weights(service, job_id) == engine_weights["paused at 2"]
    bundle = service.client.get(f"{API}/jobs/{job_id}/weights?format=bundle", headers=service.headers)
    assert bundle.status_code == 200
    with service.sessions() as session:
        kinds = set(session.scalars(select(Artifact.kind).where(Artifact.job_id == job_id)))
    assert kinds == {"weights", "model_card", "metrics", "checkpoint"}


def test_a_paused_job_is_cancelled_at_once_and_never_runs_again(service):
    job_id = submit_trial(service, stop_at_epoch=2, trial=2)
    wait_paused(service, job_id, 2)

    response = service.client.post(f"{API}/jobs/{job_id}/cancel", headers=service.headers)

    assert response.status_code == 200, response.get_json()
    assert (response.get_json()["status"], response.get_json()["paused"]) == ("cancelled", False)
    assert change(service, lambda session: lifecycle.unpause(session, job_id, None)) is False
    assert change(service, lambda session: lifecycle.end_paused(session, job_id, "sweep_pruned")) is False
    assert service.job(job_id)["status"] == "cancelled"


def test_an_ordinary_job_shows_no_sweep_and_is_not_paused(service):
    job_id = service.submit(blobs_spec("plain", epochs=1, n_samples=60))
    shown = service.wait_status(job_id)
    assert (shown["status"], shown["paused"], shown["sweep_id"], shown["sweep_trial"]) == \
        ("succeeded", False, None, None)
