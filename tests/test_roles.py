"""Roles: a user sees their own jobs and datasets (another's is a 404), an admin sees every user's; every job
document names its owner; ``GET /me`` shows the caller's role, share, quotas and fair-share standing. On
SQLite and on PostgreSQL. (``GET /workers`` by role: tests/test_api_meta.py.)"""

from __future__ import annotations

import datetime as dt
import io

import pytest

from models import accounts
from models.tables import utcnow

API = "/api/v1"
CSV = b"a,b,label\n0,1,0\n1,0,1\n1,1,0\n0,0,1\n"


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request) -> str:
    return request.getfixturevalue(f"{request.param}_url")


def upload(client, headers) -> str:
    response = client.post(f"{API}/datasets", data={"file": (io.BytesIO(CSV), "d.csv")}, headers=headers,
                           content_type="multipart/form-data")
    assert response.status_code == 201, response.json
    return response.json["id"]


def submit(client, headers, spec) -> str:
    response = client.post(f"{API}/jobs", json=spec, headers=headers)
    assert response.status_code == 201, response.json
    return response.json["id"]


def test_a_user_sees_only_their_own_jobs_and_datasets_and_another_s_is_a_404(client, alice, bob, spec):
    alices, bobs = submit(client, alice, spec), submit(client, bob, spec)
    bobs_data = upload(client, bob)

    listed = client.get(f"{API}/jobs", headers=alice).json["jobs"]
    assert [(job["id"], job["owner"]) for job in listed] == [(alices, "alice")]
    assert client.get(f"{API}/jobs/{alices}", headers=alice).json["owner"] == "alice"
    for method, path in [("GET", f"jobs/{bobs}"), ("GET", f"jobs/{bobs}/metrics"), ("GET", f"jobs/{bobs}/weights"),
                         ("GET", f"jobs/{bobs}/checkpoints"), ("POST", f"jobs/{bobs}/cancel"),
                         ("DELETE", f"jobs/{bobs}"), ("GET", f"datasets/{bobs_data}"),
                         ("DELETE", f"datasets/{bobs_data}")]:
        response = client.open(f"{API}/{path}", method=method, headers=alice)
        assert response.status_code == 404, (method, path, response.json)
    assert client.get(f"{API}/jobs/{bobs}", headers=bob).json["status"] == "queued"  # untouched


def test_an_admin_sees_every_user_s_jobs_and_datasets_and_may_act_on_them(client, admin, alice, bob, spec,
                                                                            set_job, add_artifact):
    alices, bobs = submit(client, alice, spec), submit(client, bob, spec)
    bobs_data = upload(client, bob)
    set_job(alices, status="succeeded", finished_at=utcnow())
    add_artifact(alices, "weights", "weights.safetensors", b"alice's weights")

    listed = client.get(f"{API}/jobs", headers=admin).json["jobs"]
    assert [(job["id"], job["owner"]) for job in listed] == [(bobs, "bob"), (alices, "alice")]
    page = client.get(f"{API}/jobs?limit=1", headers=admin).json
    assert [job["id"] for job in page["jobs"]] == [bobs]
    rest = client.get(f"{API}/jobs?limit=1&cursor={page['next_cursor']}", headers=admin).json
    assert [job["id"] for job in rest["jobs"]] == [alices] and rest["next_cursor"] is None
    assert client.get(f"{API}/jobs", headers=admin).json["jobs"][0]["owner"] == "bob"
    assert client.get(f"{API}/jobs/{bobs}", headers=admin).json["owner"] == "bob"
    assert client.get(f"{API}/jobs/{alices}/weights", headers=admin).data == b"alice's weights"
    cancelled = client.post(f"{API}/jobs/{bobs}/cancel", headers=admin)
    assert (cancelled.status_code, cancelled.json["status"], cancelled.json["owner"]) == (200, "cancelled", "bob")
    assert client.get(f"{API}/datasets/{bobs_data}", headers=admin).json["name"] == "d.csv"
    assert client.delete(f"{API}/datasets/{bobs_data}", headers=admin).status_code == 204
    assert client.get(f"{API}/datasets/{bobs_data}", headers=bob).status_code == 404


def test_me_shows_the_caller_s_role_share_quotas_with_their_use_and_overrides_and_fair_share(
        client, alice, admin, spec, sessions, set_job):
    jobs = [submit(client, alice, spec) for _ in range(3)]
    set_job(jobs[0], status="running", started_at=utcnow() - dt.timedelta(seconds=100), worker_id="w")
    with sessions() as session:
        accounts.set_quota(session, "alice", "queued_jobs", 5)
        accounts.set_share(session, "alice", 2.5)

    me = client.get(f"{API}/me", headers=alice).json
    assert (me["name"], me["role"], me["share"]) == ("alice", "user", 2.5)
    quotas = {q["name"]: (q["limit"], q["use"], q["overridden"]) for q in me["quotas"]}
    assert quotas == {"queued_jobs": (5, 2, True), "running_jobs": (8, 1, False), "gpus": (8, 0, False),
                      "storage_bytes": (10 << 30, 0, False), "streams": (4, 0, False)}
    assert me["quotas"][0]["counts"] == "jobs waiting in the queue"
    standing = me["fair_share"]
    assert standing["active_jobs"] == 1 and standing["half_life_seconds"] == 3600
    assert 100 <= standing["usage_seconds"] < 160  # the running job's 100 s and this test's own, undecayed
    root = client.get(f"{API}/me", headers=admin).json
    assert (root["name"], root["role"], root["fair_share"]["active_jobs"]) == ("root", "admin", 0)
    assert {q["name"]: q["use"] for q in root["quotas"]}["queued_jobs"] == 0
    assert client.get(f"{API}/me").status_code == 401
