"""A real worker over the embedded defaults (SQLite file, filesystem broker, local store) runs jobs.

One worker serves the whole module; jobs come in through the API, which publishes them to the real broker.
"""

from __future__ import annotations

import copy
import io
import json

import numpy as np
from specs import circles_spec
from sqlalchemy import select

from models.tables import Artifact, EpochMetrics, Job

CIRCLES = circles_spec("circles", epochs=4, lr=0.05, checkpoints=True)


def spec(**changes) -> dict:
    value = copy.deepcopy(CIRCLES)
    value.update(changes)
    return value


def metrics_rows(service, job_id: str) -> list[EpochMetrics]:
    with service.sessions() as session:
        return session.scalars(select(EpochMetrics).where(EpochMetrics.job_id == job_id)
                               .order_by(EpochMetrics.epoch)).all()


def artifacts(service, job_id: str) -> dict[str, Artifact]:
    with service.sessions() as session:
        return {a.name: a for a in session.scalars(select(Artifact).where(Artifact.job_id == job_id))}


def test_a_submitted_job_trains_and_records_every_epoch_and_its_files(embedded_service):
    service = embedded_service
    job_id = service.submit(spec())

    job = service.wait_status(job_id)

    assert job["status"] == "succeeded", job
    assert job["stop_reason"] == "completed"
    assert job["attempts"] == 1
    rows = metrics_rows(service, job_id)
    assert [row.epoch for row in rows] == [1, 2, 3, 4]
    assert all(row.attempt == 1 for row in rows)
    assert {"loss", "accuracy", "val_loss", "val_accuracy", "lr"} <= set(rows[0].values)
    stored = artifacts(service, job_id)
    assert {"weights.safetensors", "model.json", "metrics.jsonl"} <= set(stored)
    # keep_last 2 plus the best epoch's checkpoint, never more
    checkpoints = sorted(name for name in stored if name.startswith("checkpoints/"))
    assert "checkpoints/epoch-0004.pt" in checkpoints and 2 <= len(checkpoints) <= 3
    for artifact in stored.values():
        with service.store.open(artifact.uri) as handle:
            assert len(handle.read()) == artifact.size
    with service.store.open(stored["metrics.jsonl"].uri) as handle:
        lines = [json.loads(line) for line in handle.read().decode().splitlines()]
    assert [line["loss"] for line in lines] == [row.values["loss"] for row in rows]
    with service.sessions() as session:
        row = session.get(Job, job_id)
        assert row.epoch == 4 and row.lease_expires_at is None and row.best_metric == "val_loss"
        assert row.final_metrics["epoch"] == 4


def test_a_duplicate_message_trains_the_job_once(embedded_service):
    service = embedded_service
    job_id = service.submit(spec(name="twice"))
    service.publisher.publish(job_id, "cpu")
    service.publisher.publish(job_id, "cpu")

    service.wait_status(job_id)
    # the duplicates behind it are consumed as no-ops; give them time to be taken
    service.wait_status(service.submit(spec(name="after")))

    job = service.job(job_id)
    assert job["status"] == "succeeded" and job["attempts"] == 1
    assert [row.attempt for row in metrics_rows(service, job_id)] == [1, 1, 1, 1]


def test_cancel_stops_a_running_job_at_a_batch_boundary(embedded_service):
    service = embedded_service
    job_id = service.submit(spec(name="long", training={"epochs": 5000, "batch_size": 10}))
    service.wait_status(job_id, ("running",))

    response = service.client.post(f"/api/v1/jobs/{job_id}/cancel", headers=service.headers)
    assert response.status_code == 202, response.get_json()
    job = service.wait_status(job_id, timeout=30)

    assert job["status"] == "cancelled", job
    assert job["stop_reason"] == "cancelled"
    with service.sessions() as session:
        assert session.get(Job, job_id).epoch < 5000


def test_a_diverging_job_fails_and_says_why(embedded_service):
    service = embedded_service
    diverging = spec(name="diverges", task="regression",
                     data={"source": "sklearn", "name": "make_regression",
                           "params": {"n_samples": 200, "n_features": 5, "noise": 1.0, "random_state": 0}},
                     model={"layers": [{"type": "Linear", "out_features": 1}]},
                     optimizer={"type": "SGD", "lr": 1e6})

    job = service.wait_status(service.submit(diverging))

    assert job["status"] == "failed"
    assert "loss became" in job["error"], job["error"]
    assert "weights.safetensors" not in artifacts(service, job["id"])


def test_an_uploaded_dataset_is_downloaded_and_trained_on(embedded_service):
    service = embedded_service
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 3))
    y = (x[:, 0] + x[:, 1] > 0).astype(int)
    csv = "a,b,c,label\n" + "".join(f"{r[0]},{r[1]},{r[2]},{t}\n" for r, t in zip(x, y, strict=True))
    response = service.client.post("/api/v1/datasets", headers=service.headers,
                                   data={"file": (io.BytesIO(csv.encode()), "points.csv"), "target": "label"})
    assert response.status_code == 201, response.get_json()
    dataset_id = response.get_json()["id"]

    data = {"source": "dataset", "dataset_id": dataset_id, "target": "label"}
    job = service.wait_status(service.submit(spec(name="csv", data=data)))

    assert job["status"] == "succeeded", job
    assert len(metrics_rows(service, job["id"])) == 4
