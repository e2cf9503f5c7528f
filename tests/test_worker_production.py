"""A real worker over the production stack: PostgreSQL (a fresh database) and Redis (db 7)."""

from __future__ import annotations

from specs import blobs_spec
from sqlalchemy import select

from models.tables import Artifact, EpochMetrics, Worker

SPEC = blobs_spec("blobs")


def test_a_job_trains_over_postgresql_and_redis_with_its_metrics_and_files(production_service):
    service = production_service
    job_id = service.submit(SPEC)

    job = service.wait_status(job_id)

    assert job["status"] == "succeeded", job
    with service.sessions() as session:
        rows = session.scalars(select(EpochMetrics).where(EpochMetrics.job_id == job_id)
                               .order_by(EpochMetrics.epoch)).all()
        stored = {a.name: a for a in session.scalars(select(Artifact).where(Artifact.job_id == job_id))}
        worker = session.scalars(select(Worker)).one()
    assert [(row.epoch, row.attempt) for row in rows] == [(1, 1), (2, 1), (3, 1)]
    assert {"val_accuracy", "accuracy"} <= set(rows[-1].values)
    assert {"weights.safetensors", "model.json", "metrics.jsonl", "checkpoints/epoch-0003.pt"} <= set(stored)
    for artifact in stored.values():
        assert service.store.exists(artifact.uri)
    assert worker.queues == "cpu" and worker.devices["cpu"] >= 1
    assert job["worker_id"] == worker.id and job["device"] == "cpu"


def test_a_duplicate_message_over_redis_trains_the_job_once(production_service):
    service = production_service
    job_id = service.submit({**SPEC, "name": "dup"})
    service.publisher.publish(job_id, "cpu")

    service.wait_status(job_id)
    service.wait_status(service.submit({**SPEC, "name": "after"}))  # the duplicate was consumed before it

    job = service.job(job_id)
    assert job["status"] == "succeeded" and job["attempts"] == 1
