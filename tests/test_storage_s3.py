"""The artifact store on S3 (moto's server over real HTTP): files go in and come out, and a whole job run by a
real worker keeps its checkpoints and weights in the bucket, from where the API serves them."""

from __future__ import annotations

import hashlib

import pytest
from conftest import s3_bucket, s3_keys, s3_objects, worker_settings
from specs import blobs_spec
from sqlalchemy import select

from models.storage import ArtifactStore
from models.tables import Artifact

SPEC = blobs_spec("s3-blobs", checkpoints=True)


def test_files_go_into_the_bucket_under_the_prefix_and_come_back(s3_url, tmp_path):
    store = ArtifactStore(f"{s3_url}/artifacts")
    local = tmp_path / "weights.bin"
    local.write_bytes(b"\x00weights" * 1000)

    uri, size, sha256 = store.put_file(str(local), "jobs/job_1/weights.bin")
    uri2, size2, sha2 = store.put_bytes(b"a,b\n1,2\n", "datasets/ds_1.csv")

    assert uri == f"{s3_url}/artifacts/jobs/job_1/weights.bin"
    assert (size, sha256) == (8000, hashlib.sha256(local.read_bytes()).hexdigest())
    assert uri2 == f"{s3_url}/artifacts/datasets/ds_1.csv"
    assert (size2, sha2) == (8, hashlib.sha256(b"a,b\n1,2\n").hexdigest())
    # the objects as S3 itself lists them (boto3, not the store under test), keys relative to the bucket
    assert s3_objects(s3_url) == {"artifacts/jobs/job_1/weights.bin": local.read_bytes(),
                                  "artifacts/datasets/ds_1.csv": b"a,b\n1,2\n"}
    with store.open(uri) as f:
        assert f.read() == local.read_bytes()
    with store.open("datasets/ds_1.csv") as f:
        assert f.read() == b"a,b\n1,2\n"
    store.get_file(uri2, str(tmp_path / "copy.csv"))
    assert (tmp_path / "copy.csv").read_bytes() == b"a,b\n1,2\n"
    assert store.exists(uri) and store.exists("jobs/job_1")


def test_deletes_remove_files_and_trees_and_a_second_delete_is_harmless(s3_url):
    store = ArtifactStore(f"{s3_url}/artifacts")
    for name in ("checkpoints/epoch-0001.pt", "checkpoints/epoch-0002.pt", "weights.safetensors"):
        store.put_bytes(name.encode(), f"jobs/job_1/{name}")
    other, _, _ = store.put_bytes(b"keep me", "jobs/job_2/weights.safetensors")

    assert store.delete("jobs/job_1/weights.safetensors") is True
    assert store.delete("jobs/job_1/weights.safetensors") is False
    store.delete_tree("jobs/job_1")
    store.delete_tree("jobs/job_1")  # already gone: nothing to do

    assert not store.exists("jobs/job_1/checkpoints/epoch-0001.pt")
    assert s3_keys(s3_url) == [other.removeprefix(f"{s3_url}/")]
    with store.open(other) as f:
        assert f.read() == b"keep me"


def test_uris_outside_the_store_are_refused(s3_url):
    store = ArtifactStore(f"{s3_url}/artifacts")

    for outside in (f"{s3_url}/elsewhere/x", "s3://another-bucket/artifacts/x", "../x", "/x"):
        with pytest.raises(ValueError):
            store.path(outside)


@pytest.fixture(scope="module")
def s3_service(tmp_path_factory, moto_endpoint):
    """The embedded deployment (SQLite, filesystem broker), one real worker, its artifacts in S3."""
    from conftest import running_service

    with s3_bucket(moto_endpoint) as url:
        settings = worker_settings(tmp_path_factory.mktemp("home"), artifacts_url=f"{url}/artifacts")
        with running_service(settings) as service:
            yield service, url


def test_a_job_s_checkpoints_and_weights_live_in_s3_and_the_api_serves_them_from_there(s3_service):
    service, url = s3_service
    job_id = service.submit(SPEC)

    job = service.wait_status(job_id)

    assert job["status"] == "succeeded", job
    with service.sessions() as session:
        stored = {a.name: a for a in session.scalars(select(Artifact).where(Artifact.job_id == job_id))}
    assert {"weights.safetensors", "model.json", "metrics.jsonl", "checkpoints/epoch-0003.pt"} <= set(stored)
    objects = s3_objects(f"{url}/artifacts/jobs/{job_id}/")
    attempt = f"artifacts/jobs/{job_id}/attempt-1"  # each attempt uploads under its own folder
    for artifact in stored.values():
        assert artifact.uri == f"{url}/{attempt}/{artifact.name}"
        data = objects[artifact.uri.removeprefix(f"{url}/")]
        assert (len(data), hashlib.sha256(data).hexdigest()) == (artifact.size, artifact.sha256)
    # keep_last 2: the worker deleted epoch 1's checkpoint from the bucket as well as its row; no file lacks a row
    assert sorted(objects) == sorted(artifact.uri.removeprefix(f"{url}/") for artifact in stored.values())
    assert sorted(k.rsplit("/", 1)[1] for k in objects if "/checkpoints/" in k) == ["epoch-0002.pt",
                                                                                    "epoch-0003.pt"]
    weights = service.client.get(f"/api/v1/jobs/{job_id}/weights", headers=service.headers)
    assert weights.status_code == 200
    assert weights.data == objects[f"{attempt}/weights.safetensors"]
    checkpoint = service.client.get(f"/api/v1/jobs/{job_id}/checkpoints/3", headers=service.headers)
    assert checkpoint.status_code == 200, checkpoint.get_json()
    assert checkpoint.data == objects[f"{attempt}/checkpoints/epoch-0003.pt"]

    assert service.client.delete(f"/api/v1/jobs/{job_id}", headers=service.headers).status_code == 204
    assert s3_keys(f"{url}/artifacts/jobs/{job_id}/") == []
