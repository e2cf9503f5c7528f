"""Jobs survive their workers: a vanished worker's job is reaped and resumed, a stopping worker hands its
job back, and either way the job ends with the same weights as a run that was never interrupted."""

from __future__ import annotations

import hashlib

import pytest
from specs import long_spec
from sqlalchemy import select

from models.tables import Artifact, EpochMetrics, Job, Worker
from models.validation import parse_spec
from worker.engine import train

EPOCHS = 40
# Enough batches that the 40 epochs last several seconds even on a fast machine (at 30 a batch they took 1 s, and
# a stop once landed after the end): a stop must land mid-run.
LONG = long_spec(EPOCHS, n_samples=4000, batch_size=8)


@pytest.fixture(scope="module")
def uninterrupted_weights_sha256(tmp_path_factory) -> str:
    result = train(parse_spec(LONG), tmp_path_factory.mktemp("uninterrupted"))
    return hashlib.sha256(result.weights_path.read_bytes()).hexdigest()


def epoch_of(service, job_id: str) -> int:
    with service.sessions() as session:
        return session.get(Job, job_id).epoch


def long_job_at_epoch_5(service):
    """Submit LONG and wait until its worker is at epoch 5, well before the end; return (job id, worker)."""
    job_id = service.submit(LONG)
    service.wait_status(job_id, ("running",))
    service.wait_for(lambda: epoch_of(service, job_id) >= 5, 60, "epoch 5")
    assert epoch_of(service, job_id) < EPOCHS // 2, "too quick to interrupt; make the job longer"
    return job_id, service.workers[0]


def assert_finished_like_an_uninterrupted_run(service, job_id: str, sha256: str) -> None:
    job = service.wait_status(job_id, timeout=120)
    assert job["status"] == "succeeded", job
    assert job["attempts"] == 2
    with service.sessions() as session:
        rows = session.scalars(select(EpochMetrics).where(EpochMetrics.job_id == job_id)
                               .order_by(EpochMetrics.epoch)).all()
        checkpoints = session.scalars(select(Artifact.name).where(Artifact.job_id == job_id,
                                                                  Artifact.kind == "checkpoint")).all()
    assert [row.epoch for row in rows] == list(range(1, EPOCHS + 1))
    # keep_last 2 (plus the best epoch's); a mid-epoch checkpoint is gone once an epoch ends after it
    assert f"checkpoints/epoch-{EPOCHS:04d}.pt" in checkpoints and len(checkpoints) <= 3
    assert not [name for name in checkpoints if "-batch-" in name]
    assert {row.attempt for row in rows} == {1, 2}
    weights = service.client.get(f"/api/v1/jobs/{job_id}/weights", headers=service.headers)
    assert weights.status_code == 200
    assert hashlib.sha256(weights.data).hexdigest() == sha256


def test_a_vanished_worker_s_job_is_reaped_and_resumed_from_its_checkpoint(own_embedded_service,
                                                                           uninterrupted_weights_sha256):
    service = own_embedded_service
    job_id, first = long_job_at_epoch_5(service)

    first.kill()
    service.start_worker(name="second")

    assert_finished_like_an_uninterrupted_run(service, job_id, uninterrupted_weights_sha256)


def test_a_stopping_worker_hands_its_job_back_and_another_finishes_it(own_embedded_service,
                                                                      uninterrupted_weights_sha256):
    service = own_embedded_service
    job_id, first = long_job_at_epoch_5(service)

    assert first.stop(timeout=30) == 0, first.log()
    job = service.job(job_id)
    assert job["status"] == "queued", job
    assert job["pending_reason"] == "requeued: its worker shut down"
    with service.sessions() as session:
        assert session.scalars(select(Worker.id)).all() == []  # it left the registry
    service.start_worker(name="second")

    assert_finished_like_an_uninterrupted_run(service, job_id, uninterrupted_weights_sha256)
