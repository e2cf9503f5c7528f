"""Two machines, one store: workers with their own TORCHYARD_HOME and scratch folder, sharing only PostgreSQL,
Redis and S3 (moto's server). A job whose machine vanished resumes on the other from its checkpoint in S3."""

from __future__ import annotations

import hashlib
import shutil

import pytest
from conftest import Service, WorkerProcess, production_settings, s3_bucket, s3_keys, s3_objects
from specs import long_spec
from sqlalchemy import select

from models.tables import Artifact, EpochMetrics, Job
from models.validation import parse_spec
from worker.engine import train

EPOCHS = 40
LONG = long_spec(EPOCHS, n_samples=300, batch_size=30)


@pytest.fixture
def two_machines(tmp_path, moto_endpoint):
    """Settings of machines "a" and "b" (own home and scratch; the same database, broker and bucket), and
    the API (over machine a's settings, publishing to the shared Redis)."""
    with s3_bucket(moto_endpoint) as bucket, \
            production_settings(tmp_path / "a", artifacts_url=f"{bucket}/artifacts",
                                scratch_dir=str(tmp_path / "a" / "scratch")) as a:
        b = a.model_copy(update={"home": tmp_path / "b", "scratch_dir": str(tmp_path / "b" / "scratch")})
        service = Service(a)
        try:
            yield service, a, b, bucket
        finally:
            service.close()


def start_on(service: Service, settings, name: str) -> WorkerProcess:
    """A worker of the machine ``settings`` describes, its log under that machine's home."""
    settings.home.mkdir(parents=True, exist_ok=True)
    worker = WorkerProcess(settings, name=name)
    service.workers.append(worker)
    worker.wait_registered(service.sessions)
    return worker


def stored_checkpoint_epochs(service: Service, job_id: str, bucket: str) -> list[int]:
    """Epochs whose checkpoint has both its row and its object in S3."""
    with service.sessions() as session:
        rows = session.scalars(select(Artifact).where(Artifact.job_id == job_id,
                                                      Artifact.kind == "checkpoint")).all()
    # Keys only: the running job prunes old checkpoints, so one listed may be gone before it could be read.
    keys = set(s3_keys(f"{bucket}/artifacts/jobs/{job_id}/"))
    return sorted(row.epoch for row in rows if row.uri.removeprefix(f"{bucket}/") in keys)


def files_under(path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()) if path.exists() else []


def test_a_job_killed_on_one_machine_resumes_on_the_other_from_its_checkpoint_in_s3(two_machines, tmp_path):
    service, a, b, bucket = two_machines
    uninterrupted = train(parse_spec(LONG), tmp_path / "uninterrupted")
    expected_sha256 = hashlib.sha256(uninterrupted.weights_path.read_bytes()).hexdigest()

    first = start_on(service, a, "machine-a")
    job_id = service.submit(LONG)
    service.wait_for(lambda: max(stored_checkpoint_epochs(service, job_id, bucket), default=0) >= 2, 90,
                     "the job's 2nd checkpoint in S3")
    first.kill()  # SIGKILL to the whole process group: the machine vanished mid-run
    job = service.job(job_id)
    assert job["status"] == "running" and job["progress"]["epoch"] < EPOCHS, f"too quick to interrupt: {job}"
    assert job["worker_id"] == first.worker_id and job["device"] == "cpu"
    left = files_under(a.home / "scratch")
    assert [path for path in left if path.startswith(job_id)], "machine a's scratch should hold the killed run"
    # Machine b couldn't read machine a's disk anyway; move it out of reach to be sure nothing does.
    shutil.move(a.home / "scratch", tmp_path / "a-scratch-gone")
    scratch_b = b.home / "scratch"
    assert files_under(scratch_b) == []

    second = start_on(service, b, "machine-b")

    job = service.wait_status(job_id, timeout=120)
    assert job["status"] == "succeeded", job
    assert job["attempts"] == 2
    assert job["worker_id"] == second.worker_id and job["device"] == "cpu"
    resumed = [line for line in second.log(400).splitlines() if f"job {job_id} resumes from" in line]
    assert resumed, second.log()
    resumed_epoch = int(resumed[0].rsplit("epoch-", 1)[1][:4])
    assert resumed_epoch >= 2
    with service.sessions() as session:
        rows = session.scalars(select(EpochMetrics).where(EpochMetrics.job_id == job_id)
                               .order_by(EpochMetrics.epoch)).all()
        stored = session.scalars(select(Artifact).where(Artifact.job_id == job_id)).all()
        assert session.get(Job, job_id).pending_reason is None
    assert [row.epoch for row in rows] == list(range(1, EPOCHS + 1))  # each epoch once
    assert {row.attempt for row in rows if row.epoch <= resumed_epoch} == {1}
    assert {row.attempt for row in rows if row.epoch > resumed_epoch} == {2}
    # Every object is one the job lists: what the killed attempt uploaded without a row goes once the job
    # has ended (the attempt that ended it removes it just after its final write).
    listed = sorted(artifact.uri.removeprefix(f"{bucket}/") for artifact in stored)
    service.wait_for(lambda: s3_keys(f"{bucket}/artifacts/jobs/{job_id}/") == listed, 30, "only listed objects")
    objects = s3_objects(f"{bucket}/artifacts/jobs/{job_id}/")
    for artifact in stored:  # every file the job lists is the object in S3, byte for byte
        data = objects[artifact.uri.removeprefix(f"{bucket}/")]
        assert hashlib.sha256(data).hexdigest() == artifact.sha256
    weights = service.client.get(f"/api/v1/jobs/{job_id}/weights", headers=service.headers)
    assert weights.status_code == 200
    assert hashlib.sha256(weights.data).hexdigest() == expected_sha256
    assert files_under(scratch_b) == []  # the finished job's scratch files are gone from machine b too
