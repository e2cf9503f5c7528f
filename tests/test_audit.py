"""The audit log: each action on a job or dataset is recorded in the action's own transaction (a refused
request leaves nothing), admins read it newest first a page at a time with validated filters, and prune
deletes what is past the retention. On SQLite and on PostgreSQL. (The CLI's events: tests/test_accounts.py.)"""

from __future__ import annotations

import datetime as dt
import io

import pytest
from sqlalchemy import delete, select

from models import audit
from models.settings import Settings
from models.tables import AuditEvent, utcnow

API = "/api/v1"
CSV = b"a,b,label\n0,1,0\n1,0,1\n1,1,0\n0,0,1\n"
# Made by the fixtures that make users and keys: not what these tests look at.
SETUP_ACTIONS = ("user_create", "token_create")


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request) -> str:
    return request.getfixturevalue(f"{request.param}_url")


def recorded(sessions) -> list[tuple]:
    """(user, action, target, detail) of each event but the fixtures', oldest first."""
    with sessions() as session:
        events = session.scalars(select(AuditEvent).where(AuditEvent.action.not_in(SETUP_ACTIONS))
                                 .order_by(AuditEvent.at, AuditEvent.id)).all()
    return [(e.user_name, e.action, e.target, e.detail) for e in events]


def test_actions_on_jobs_and_datasets_are_recorded_with_who_and_what_and_refusals_are_not(
        client, alice, bob, spec, sessions, set_job, add_artifact):
    headers = {**alice, "Idempotency-Key": "once"}
    job = client.post(f"{API}/jobs", json=spec, headers=headers).json["id"]
    assert client.post(f"{API}/jobs", json=spec, headers=headers).status_code == 200  # a replay: no event
    assert client.post(f"{API}/jobs", json={**spec, "task": "nope"}, headers=alice).status_code == 422
    other = client.post(f"{API}/jobs", json={**spec, "name": "other"}, headers=alice).json["id"]
    assert client.post(f"{API}/jobs/{other}/cancel", headers=alice).status_code == 200
    assert client.post(f"{API}/jobs/{other}/cancel", headers=alice).status_code == 409  # cancelled already
    assert client.post(f"{API}/jobs/{job}/cancel", headers=bob).status_code == 404  # not bob's
    set_job(job, status="succeeded", finished_at=utcnow())
    for kind, name in [("weights", "weights.safetensors"), ("model_card", "model.json"), ("metrics", "m.jsonl")]:
        add_artifact(job, kind, name, b"{}")
    add_artifact(job, "checkpoint", "checkpoints/epoch-0003.pt", b"three", epoch=3)
    for path in ["weights", "weights?format=bundle", "checkpoints/3"]:
        assert client.get(f"{API}/jobs/{job}/{path}", headers=alice).status_code == 200, path
    assert client.get(f"{API}/jobs/{job}/checkpoints/4", headers=alice).status_code == 404
    assert client.get(f"{API}/jobs/{job}/checkpoints", headers=alice).status_code == 200  # a listing: no event
    assert client.delete(f"{API}/jobs/{job}", headers=alice).status_code == 204
    upload = client.post(f"{API}/datasets", data={"file": (io.BytesIO(CSV), "d.csv"), "name": "points"},
                         headers=alice, content_type="multipart/form-data").json
    assert client.post(f"{API}/datasets", data={"file": (io.BytesIO(b"a\n1\n"), "bad.csv")}, headers=alice,
                       content_type="multipart/form-data").status_code == 422
    assert client.delete(f"{API}/datasets/{upload['id']}", headers=alice).status_code == 204

    assert recorded(sessions) == [
        ("alice", "submit", job, {"name": "circles-mlp", "queue": "cpu"}),
        ("alice", "submit", other, {"name": "other", "queue": "cpu"}),
        ("alice", "cancel", other, {"name": "other", "outcome": "cancelled"}),
        ("alice", "download", job, {"what": "weights"}),
        ("alice", "download", job, {"what": "bundle"}),
        ("alice", "download", job, {"what": "checkpoint", "epoch": 3}),
        ("alice", "delete", job, {"name": "circles-mlp"}),
        ("alice", "upload", upload["id"], {"name": "points", "format": "csv", "size": len(CSV)}),
        ("alice", "delete", upload["id"], {"name": "points"}),
    ]
    with sessions() as session:
        alices_id = session.scalars(select(AuditEvent.user_id).where(AuditEvent.action == "submit")).all()
    assert len(set(alices_id)) == 1 and alices_id[0].startswith("usr_")


def test_an_event_commits_with_its_action_or_not_at_all(sessions):
    with sessions() as session:
        audit.record(session, audit.Actor("usr_x", "x"), "submit", "job_rolled_back")
        session.rollback()
        audit.record(session, audit.Actor("usr_x", "x"), "submit", "job_kept", name="kept")
        session.commit()
    assert recorded(sessions) == [("x", "submit", "job_kept", {"name": "kept"})]
    with sessions() as session, pytest.raises(ValueError, match="no audit action 'sumbit'"):
        audit.record(session, audit.Actor("usr_x", "x"), "sumbit")


def add_events(sessions, *events: tuple[str, str, dt.datetime]) -> None:
    with sessions() as session:
        for name, action, at in events:
            audit.record(session, audit.Actor(f"usr_{name}", name), action, f"job_{name}").at = at
        session.commit()


def test_the_audit_log_is_for_admins_newest_first_a_page_at_a_time_and_filtered(client, alice, admin, sessions):
    refused = client.get(f"{API}/audit", headers=alice)
    assert (refused.status_code, refused.mimetype, refused.json["detail"]) == (
        403, "application/problem+json", "admins only")
    with sessions() as session:  # the fixtures' events (making root, alice and their keys) aside
        session.execute(delete(AuditEvent))
        session.commit()
    start = dt.datetime(2026, 11, 1, 12, tzinfo=dt.timezone.utc)
    add_events(sessions, ("ann", "submit", start), ("ben", "submit", start + dt.timedelta(hours=1)),
               ("ann", "cancel", start + dt.timedelta(hours=2)), ("ann", "submit", start + dt.timedelta(hours=3)))

    def page(**args) -> tuple[list[str], str | None]:
        response = client.get(f"{API}/audit", query_string=args, headers=admin)
        assert response.status_code == 200, response.json
        body = response.json
        return [f"{e['user_name']} {e['action']} {e['at'][11:13]}" for e in body["events"]], body["next_cursor"]

    first, cursor = page(limit=3)
    assert first == ["ann submit 15", "ann cancel 14", "ben submit 13"]
    assert page(limit=3, cursor=cursor) == (["ann submit 12"], None)
    assert page(user="ann", action="submit") == (["ann submit 15", "ann submit 12"], None)
    assert page(user="ann", since="2026-11-01T13:00:00Z") == (["ann submit 15", "ann cancel 14"], None)
    assert page(user="ann", since="2026-11-01T14:30:00+01:00") == (["ann submit 15", "ann cancel 14"], None)
    assert page(user="ann", since="2026-11-02") == ([], None)
    assert page(user="nobody") == ([], None)
    event = client.get(f"{API}/audit", query_string={"user": "ben"}, headers=admin).json["events"][0]
    assert set(event) == {"id", "at", "user_id", "user_name", "action", "target", "detail"}
    assert (event["user_id"], event["target"], event["detail"]) == ("usr_ben", "job_ben", None)


BAD_FILTERS = [
    ({"user": ""}, "user"), ({"user": "a\x00b"}, "user"), ({"user": "u" * 201}, "user"),
    ({"action": "sumbit"}, "action"), ({"since": "yesterday"}, "since"), ({"since": "9" * 50}, "since"),
    ({"since": "2026-13-01"}, "since"), ({"since": "0001-01-01T00:00:00+01:00"}, "since"),
    ({"limit": "0"}, "limit"), ({"cursor": "nope"}, "cursor"),
]


def test_a_bad_audit_filter_is_a_422_naming_it(client, admin):
    for args, field in BAD_FILTERS:
        response = client.get(f"{API}/audit", query_string=args, headers=admin)
        assert response.status_code == 422, (args, response.json)
        assert [e["path"] for e in response.json["errors"]] == [field], args
    sumbit = client.get(f"{API}/audit", query_string={"action": "sumbit"}, headers=admin).json
    assert "'sumbit' is not an audit action; did you mean 'submit'?" in sumbit["detail"]


def test_prune_deletes_the_events_past_the_retention_and_nothing_newer(sessions):
    now = dt.datetime(2026, 12, 1, tzinfo=dt.timezone.utc)
    add_events(sessions, ("old", "submit", now - dt.timedelta(days=91)),
               ("kept", "submit", now - dt.timedelta(days=89)), ("new", "submit", now))
    with sessions() as session:
        assert audit.prune(session, Settings(), now) == 1  # the default: 90 days
        session.commit()
    assert [user for user, *_ in recorded(sessions)] == ["kept", "new"]
    with sessions() as session:
        assert audit.prune(session, Settings(audit_retention_days=30), now) == 1
        session.rollback()  # the caller's transaction: nothing deleted without its commit
    assert [user for user, *_ in recorded(sessions)] == ["kept", "new"]
