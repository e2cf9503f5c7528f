"""Quotas as the API answers them (models.quotas owns the rules, api/errors.py the answer): queued jobs at
submit, storage at upload, streams at open; over one, a problem naming the quota, its limit and the use, and
nothing stored. On SQLite and PostgreSQL; the concurrent submits on PostgreSQL, where they really interleave."""

from __future__ import annotations

import http.client
import io
import json
import socket
import threading
import urllib.parse
from pathlib import Path

import pytest
from sqlalchemy import func, select

from api.errors import QUOTA_RETRY_AFTER
from models.quotas import QUOTAS
from models.tables import Dataset, Job, User

API = "/api/v1"
QUEUED = 3
STORAGE = 1000  # bytes


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request) -> str:
    return request.getfixturevalue("postgres_url" if request.param == "postgresql" else "sqlite_url")


@pytest.fixture
def app(make_app):
    return make_app(quota_queued_jobs=QUEUED, quota_storage_bytes=STORAGE)


def submit(client, headers: dict, spec: dict, key: str | None = None):
    extra = {"Idempotency-Key": key} if key else {}
    return client.post(f"{API}/jobs", json=spec, headers={**headers, **extra})


def count(sessions, model) -> int:
    with sessions() as session:
        return session.scalar(select(func.count()).select_from(model))


def set_quotas(sessions, name: str, quotas: dict) -> None:
    """A per-user override, as ``torchyard user set-quota`` writes it."""
    with sessions() as session:
        session.scalar(select(User).where(User.name == name)).quotas = quotas
        session.commit()


def assert_quota_problem(response, status: int, quota: str, limit: int, use: int) -> dict:
    assert response.status_code == status, response.json
    problem = response.json
    assert response.mimetype == "application/problem+json"
    assert problem["type"] == "/problems/quota-exceeded"
    assert (problem["quota"], problem["limit"], problem["use"]) == (quota, limit, use)
    assert f"{use} of {limit}" in problem["detail"] and f"quota_{quota}" in problem["detail"]
    return problem


# --- queued jobs ----------------------------------------------------------------------------------


def test_a_submit_past_the_queued_jobs_quota_is_a_429_with_retry_after_and_stores_nothing(
    client, alice, spec, sessions, published, live_worker
):
    for _ in range(QUEUED):
        assert submit(client, alice, spec).status_code == 201
    before = list(published)
    assert len(before) == QUEUED  # with a live worker, each accepted job is released at once

    refused = submit(client, alice, spec)

    assert_quota_problem(refused, 429, "queued_jobs", QUEUED, QUEUED)
    assert refused.headers["Retry-After"] == str(QUOTA_RETRY_AFTER["queued_jobs"])
    assert count(sessions, Job) == QUEUED
    assert published == before


def test_a_cancelled_job_frees_its_place_in_the_queue(client, alice, spec):
    jobs = [submit(client, alice, spec).json["id"] for _ in range(QUEUED)]
    assert submit(client, alice, spec).status_code == 429
    assert client.post(f"{API}/jobs/{jobs[0]}/cancel", headers=alice).status_code == 200
    assert submit(client, alice, spec).status_code == 201


def test_a_retried_submit_at_the_quota_gets_its_first_job_not_a_429(client, alice, spec):
    first = submit(client, alice, spec, key="sweep-1")
    for _ in range(QUEUED - 1):
        submit(client, alice, spec)
    retried = submit(client, alice, spec, key="sweep-1")
    assert retried.status_code == 200
    assert retried.json["id"] == first.json["id"]
    assert submit(client, alice, spec, key="sweep-2").status_code == 429  # a new key is a new job


def test_a_users_override_replaces_the_default_for_them_alone(client, alice, bob, spec, sessions):
    set_quotas(sessions, "alice", {"queued_jobs": 1})
    assert submit(client, alice, spec).status_code == 201
    assert_quota_problem(submit(client, alice, spec), 429, "queued_jobs", 1, 1)
    assert [submit(client, bob, spec).status_code for _ in range(QUEUED)] == [201] * QUEUED


def test_concurrent_submits_of_one_user_get_exactly_the_quota(app, alice, spec, sessions):
    threads, statuses = 8, []
    barrier = threading.Barrier(threads)

    def one():
        client = app.test_client()
        barrier.wait()  # all at once: on PostgreSQL their transactions interleave but for the user's row lock
        statuses.append(submit(client, alice, spec).status_code)

    workers = [threading.Thread(target=one) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    assert sorted(statuses) == [201] * QUEUED + [429] * (threads - QUEUED)
    assert count(sessions, Job) == QUEUED


# --- storage ----------------------------------------------------------------------------------------


def upload(client, headers: dict, data: bytes, name: str = "d.csv"):
    return client.post(f"{API}/datasets", data={"file": (io.BytesIO(data), name)}, headers=headers,
                       content_type="multipart/form-data")


def csv_of(size: int) -> bytes:
    """A CSV file of exactly ``size`` bytes (a multiple of 4): a feature and a class label of two classes."""
    rows = (size - 4) // 4
    data = b"x,y\n" + b"".join(b"%d,%d\n" % (i % 10, i % 2) for i in range(rows))
    assert len(data) == size
    return data


def stored_files(store) -> list[Path]:
    return [path for path in Path(store.root).rglob("*") if path.is_file()]


def test_an_upload_past_the_storage_quota_is_a_403_and_leaves_no_row_and_no_file(client, alice, sessions, store):
    assert upload(client, alice, csv_of(600)).status_code == 201

    refused = upload(client, alice, csv_of(600))  # within Content-Length's slack: refused at its stored size

    problem = assert_quota_problem(refused, 403, "storage_bytes", STORAGE, 600)
    assert "needs 600 more" in problem["detail"]
    assert "Retry-After" not in refused.headers  # waiting frees no storage
    assert count(sessions, Dataset) == 1
    assert len(stored_files(store)) == 1


def test_storage_counts_job_artifacts_too(client, alice, spec, add_artifact, sessions):
    job_id = submit(client, alice, spec).json["id"]
    add_artifact(job_id, "weights", "weights.safetensors", b"w" * 900)
    assert_quota_problem(upload(client, alice, csv_of(200)), 403, "storage_bytes", STORAGE, 900)
    assert count(sessions, Dataset) == 0


def test_deleting_a_finished_job_gives_its_artifacts_bytes_back(client, alice, bob, spec, add_artifact, set_job):
    mine, theirs = submit(client, alice, spec).json["id"], submit(client, bob, spec).json["id"]
    add_artifact(mine, "weights", "weights.safetensors", b"w" * 900)
    add_artifact(theirs, "weights", "weights.safetensors", b"w" * 700)
    set_job(mine, status="succeeded")
    assert_quota_problem(upload(client, alice, csv_of(200)), 403, "storage_bytes", STORAGE, 900)

    assert client.delete(f"{API}/jobs/{mine}", headers=alice).status_code == 204

    assert upload(client, alice, csv_of(200)).status_code == 201
    assert storage_use(client, alice) == 200
    assert storage_use(client, bob) == 700  # not theirs


def test_restating_a_jobs_bytes_again_changes_nothing_and_a_second_job_adds_to_its_users_total(
    client, alice, spec, add_artifact, sessions
):
    from models.quotas import restate_stored_bytes

    first, second = (submit(client, alice, spec).json["id"] for _ in range(2))
    add_artifact(first, "weights", "weights.safetensors", b"w" * 300)  # the user's first bytes: the total's row
    add_artifact(first, "checkpoint", "epoch-1.pt", b"c" * 50, epoch=1)
    add_artifact(second, "weights", "weights.safetensors", b"w" * 20)
    with sessions() as session:
        restate_stored_bytes(session, first)  # a retried transaction that had landed
        session.commit()
    assert storage_use(client, alice) == 370


def storage_use(client, headers: dict) -> int:
    return next(quota["use"] for quota in client.get(f"{API}/me", headers=headers).json["quotas"]
                if quota["name"] == "storage_bytes")


def test_an_upload_whose_content_length_is_past_the_room_is_refused_before_its_body_is_read(
    live_server, tokens, sessions
):
    url = urllib.parse.urlsplit(live_server)
    with socket.create_connection((url.hostname, url.port), timeout=10) as sock:
        sock.sendall((f"POST {API}/datasets HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {tokens['alice']}\r\n"
                      "Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 10000000\r\n\r\n").encode())
        # Not a byte of the body is sent: a server that waited for it would not answer within the timeout.
        response = http.client.HTTPResponse(sock, method="POST")
        response.begin()
        problem = json.loads(response.read())
    assert response.status == 403
    assert (problem["quota"], problem["limit"], problem["use"]) == ("storage_bytes", STORAGE, 0)
    assert count(sessions, Dataset) == 0


# --- streams ------------------------------------------------------------------------------------------


def test_a_users_streams_quota_override_is_what_their_streams_are_held_to(client, alice, bob, spec, sessions,
                                                                           set_job):
    job_ids = {name: submit(client, headers, spec).json["id"] for name, headers in (("alice", alice), ("bob", bob))}
    for job_id in job_ids.values():
        set_job(job_id, status="succeeded", stop_reason="completed")  # so that an admitted stream ends at once
    set_quotas(sessions, "alice", {"streams": 0})

    refused = client.get(f"{API}/jobs/{job_ids['alice']}/metrics?stream=1", headers=alice)
    assert_quota_problem(refused, 429, "streams", 0, 0)
    assert refused.headers["Retry-After"] == str(QUOTA_RETRY_AFTER["streams"])
    admitted = client.get(f"{API}/jobs/{job_ids['bob']}/metrics?stream=1", headers=bob)
    assert admitted.status_code == 200
    assert "event: status" in admitted.get_data(as_text=True)


def test_every_quota_that_waiting_frees_has_a_retry_after():
    assert set(QUOTA_RETRY_AFTER) == {name for name, (_what, waiting_helps) in QUOTAS.items() if waiting_helps}
