"""Downloading a job's weights (plain and as a bundle) and its checkpoints."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile

import pytest

JOBS = "/api/v1/jobs"
WEIGHTS = b"\x08\x00\x00\x00\x00\x00\x00\x00{}      " + bytes(range(256)) * 64
CARD = json.dumps({"spec": {"task": "binary"}, "input_shape": [2]}).encode()
METRICS = b'{"epoch": 1, "loss": 0.7}\n{"epoch": 2, "loss": 0.5}\n'


@pytest.fixture
def job_id(client, alice, spec) -> str:
    return client.post(JOBS, json=spec, headers=alice).json["id"]


def test_weights_are_409_until_the_job_has_them(client, alice, job_id):
    response = client.get(f"{JOBS}/{job_id}/weights", headers=alice)
    assert response.status_code == 409
    assert response.mimetype == "application/problem+json"
    assert "no weights yet" in response.json["detail"]


def test_weights_stream_as_safetensors(client, alice, job_id, add_artifact, set_job):
    add_artifact(job_id, "weights", "weights.safetensors", WEIGHTS)
    set_job(job_id, status="succeeded")
    response = client.get(f"{JOBS}/{job_id}/weights", headers=alice)
    assert response.status_code == 200
    assert response.mimetype == "application/octet-stream"
    assert response.headers["Content-Disposition"] == f'attachment; filename="{job_id}.safetensors"'
    assert response.headers["Content-Length"] == str(len(WEIGHTS))
    assert response.headers["ETag"] == f'"{hashlib.sha256(WEIGHTS).hexdigest()}"'
    assert response.data == WEIGHTS


def test_a_bundle_holds_weights_card_and_metrics_at_its_top(client, alice, job_id, add_artifact):
    add_artifact(job_id, "weights", "weights.safetensors", WEIGHTS)
    assert client.get(f"{JOBS}/{job_id}/weights?format=bundle", headers=alice).status_code == 409  # no card
    add_artifact(job_id, "model_card", "model.json", CARD)
    add_artifact(job_id, "metrics", "metrics.jsonl", METRICS)
    response = client.get(f"{JOBS}/{job_id}/weights", query_string={"format": "bundle"}, headers=alice)
    assert response.status_code == 200
    assert response.mimetype == "application/gzip"
    assert response.headers["Content-Disposition"] == f'attachment; filename="{job_id}.tar.gz"'
    with tarfile.open(fileobj=io.BytesIO(response.data), mode="r:gz") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    # At the top: unpacked into a folder, they are the folder load_model reads.
    assert members == {"weights.safetensors": WEIGHTS, "model.json": CARD, "metrics.jsonl": METRICS}
    unknown = client.get(f"{JOBS}/{job_id}/weights", query_string={"format": "onnx"}, headers=alice)
    assert unknown.status_code == 422
    assert unknown.json["errors"][0]["path"] == "format"


def test_checkpoints_are_listed_and_downloadable(client, alice, job_id, add_artifact):
    add_artifact(job_id, "checkpoint", "checkpoints/epoch-0003.pt", b"three", epoch=3)
    add_artifact(job_id, "checkpoint", "checkpoints/epoch-0002.pt", b"two", epoch=2)
    add_artifact(job_id, "weights", "weights.safetensors", WEIGHTS)
    listing = client.get(f"{JOBS}/{job_id}/checkpoints", headers=alice).json["checkpoints"]
    assert [(c["epoch"], c["name"], c["size"]) for c in listing] == [
        (2, "checkpoints/epoch-0002.pt", 3), (3, "checkpoints/epoch-0003.pt", 5)]
    assert listing[1]["sha256"] == hashlib.sha256(b"three").hexdigest()
    download = client.get(listing[1]["download"], headers=alice)
    assert download.status_code == 200
    assert download.data == b"three"
    assert download.headers["Content-Disposition"] == f'attachment; filename="{job_id}-epoch-0003.pt"'
    assert client.get(f"{JOBS}/{job_id}/checkpoints/7", headers=alice).status_code == 404


@pytest.mark.parametrize("query", ["", "?format=bundle"])
def test_a_download_whose_file_is_already_gone_is_a_404_not_a_500(client, alice, job_id, add_artifact, set_job,
                                                                   store, query):
    # A delete removes a job's files before its rows: a download in between finds the row but no file.
    weights = add_artifact(job_id, "weights", "weights.safetensors", WEIGHTS)
    add_artifact(job_id, "model_card", "model.json", CARD)
    add_artifact(job_id, "metrics", "metrics.jsonl", METRICS)
    set_job(job_id, status="succeeded")
    store.delete(weights.uri)
    response = client.get(f"{JOBS}/{job_id}/weights{query}", headers=alice)
    assert response.status_code == 404
    assert response.mimetype == "application/problem+json"
    assert "weights.safetensors" in response.json["detail"]
