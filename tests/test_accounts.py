"""Users and API keys: the CLI makes and changes them (real ``torchyard`` processes over PostgreSQL, each
change in the audit log as the command line's), the API refuses a revoked or expired key from the very next
request and records a key's use at most once a minute, and ``torchyard serve``'s key stays an admin's."""

from __future__ import annotations

import datetime as dt
import re

import pytest
from sqlalchemy import select, update
from test_cli_service import cli_env, torchyard

from api import create_app
from api.schemas import as_utc
from models import accounts, audit
from models.settings import Settings
from models.tables import ApiKey, AuditEvent, User, utcnow
from torchyard.serve import local_token

API = "/api/v1"


def ok(*args, env) -> str:
    done = torchyard(*args, env=env)
    assert done.returncode == 0, (args, done.stderr)
    return done.stdout


def refused(*args, env) -> str:
    done = torchyard(*args, env=env)
    assert done.returncode == 2, (args, done.stdout, done.stderr)
    return done.stderr


@pytest.fixture
def deployment(postgres_url, tmp_path):
    """The CLI's environment and an API app over one migrated PostgreSQL database."""
    app = create_app({"TESTING": True, "database_url": postgres_url, "artifacts_url": str(tmp_path / "artifacts")})
    yield cli_env(tmp_path, TORCHYARD_DATABASE_URL=postgres_url), app
    app.extensions["torchyard"].engine.dispose()


def cli_events(app) -> list[tuple]:
    with app.extensions["torchyard"].sessions() as session:
        events = session.scalars(select(AuditEvent).order_by(AuditEvent.at, AuditEvent.id)).all()
    assert {(e.user_id, e.user_name) for e in events} == {("cli", audit.cli_actor().name)}
    return [(e.action, e.detail) for e in events]


def test_the_cli_makes_users_sets_their_quota_share_and_role_and_lists_them(deployment):
    env, app = deployment
    assert ok("user", "create", "alice", "--share", "2", env=env) == "created user alice\n"
    assert ok("user", "create", "root", "--admin", env=env) == "created admin root\n"
    assert ok("user", "set-quota", "alice", "running_jobs", "4", env=env) == "alice: running_jobs=4\n"
    assert ok("user", "set-share", "alice", "0.5", env=env) == "alice: share 0.5\n"
    assert ok("user", "set-role", "alice", "admin", env=env) == "alice: role admin\n"
    assert "no user 'nobody' (torchyard user list shows the users)" in refused(
        "user", "set-quota", "nobody", "gpus", "1", env=env)

    lines = ok("user", "list", env=env).splitlines()
    assert re.split(r"\s{2,}", lines[0]) == ["name", "role", "share", "quotas", "keys", "created"]
    assert set(lines[1]) == {"-", " "}
    rows = [re.split(r"\s{2,}", line) for line in lines[2:]]
    assert [row[:5] for row in rows] == [["alice", "admin", "0.5", "running_jobs=4", "0"],
                                         ["root", "admin", "1", "-", "0"]]
    with app.extensions["torchyard"].sessions() as session:
        alice = session.scalar(select(User).where(User.name == "alice"))
        assert (alice.role, alice.share, alice.quotas) == ("admin", 0.5, {"running_jobs": 4})
    assert cli_events(app) == [
        ("user_create", {"user": "alice", "role": "user", "share": 2.0}),
        ("user_create", {"user": "root", "role": "admin", "share": 1.0}),
        ("user_set_quota", {"user": "alice", "quota": "running_jobs", "value": 4}),
        ("user_set_share", {"user": "alice", "share": 0.5}),
        ("user_set_role", {"user": "alice", "role": "admin"}),
    ]


def test_a_cli_key_expires_as_asked_is_listed_by_prefix_only_and_is_refused_once_revoked(deployment):
    env, app = deployment
    client = app.test_client()
    token = ok("token", "create", "laptop", "--user", "carol", "--expires", "30d", env=env).strip()
    headers = {"Authorization": f"Bearer {token}"}
    assert client.get(f"{API}/jobs", headers=headers).status_code == 200
    with app.extensions["torchyard"].sessions() as session:
        key = session.scalar(select(ApiKey))
    assert key.prefix == token[:10] and token.startswith("ty_")
    expected = utcnow() + dt.timedelta(days=30)
    assert abs(as_utc(key.expires_at) - expected) < dt.timedelta(minutes=1)

    listing = ok("token", "list", "--user", "carol", env=env)
    header, _, row = listing.splitlines()
    assert re.split(r"\s{2,}", header) == ["name", "user", "prefix", "created", "last used", "expires", "revoked"]
    assert re.split(r"\s{2,}", row)[:3] == ["laptop", "carol", token[:10]]
    assert row.endswith(" -") and expected.strftime("%Y-%m-%d") in row  # not revoked, expiring in 30 days
    assert token[10:14] not in listing and key.key_hash[:8] not in listing

    assert ok("token", "revoke", "laptop", env=env) == f"revoked laptop ({token[:10]}…) of carol\n"
    answer = client.get(f"{API}/jobs", headers=headers)
    assert answer.status_code == 401
    assert answer.json["detail"].startswith("this API key was revoked on ")
    assert [action for action, _ in cli_events(app)] == ["user_create", "token_create", "token_revoke"]
    assert cli_events(app)[1][1]["prefix"] == token[:10]


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request) -> str:
    return request.getfixturevalue(f"{request.param}_url")


def test_an_expired_key_is_refused_saying_when(client, sessions):
    with sessions() as session:
        token = accounts.create_api_key(session, "dora", "ci", expires_at=utcnow() + dt.timedelta(hours=1))
    headers = {"Authorization": f"Bearer {token}"}
    assert client.get(f"{API}/me", headers=headers).status_code == 200
    with sessions() as session:
        session.execute(update(ApiKey).values(expires_at=dt.datetime(2026, 1, 31, tzinfo=dt.timezone.utc)))
        session.commit()
    answer = client.get(f"{API}/me", headers=headers)
    assert (answer.status_code, answer.json["detail"]) == (401, "this API key expired on 2026-01-31T00:00:00Z")
    assert answer.headers["WWW-Authenticate"] == 'Bearer realm="torchyard"'


def test_a_key_s_last_use_is_written_at_most_once_a_minute(client, alice, sessions):
    def last_used() -> dt.datetime:
        with sessions() as session:
            return as_utc(session.scalar(select(ApiKey.last_used_at).join(User).where(User.name == "alice")))

    def used_ago(seconds: float) -> dt.datetime:
        moment = utcnow() - dt.timedelta(seconds=seconds)
        with sessions() as session:
            session.execute(update(ApiKey).where(ApiKey.key_hash == accounts.hash_token(
                alice["Authorization"].removeprefix("Bearer "))).values(last_used_at=moment))
            session.commit()
        return moment

    assert client.get(f"{API}/me", headers=alice).status_code == 200
    first = last_used()
    assert client.get(f"{API}/me", headers=alice).status_code == 200
    assert last_used() == first  # a second request within the minute writes nothing
    recent = used_ago(50)
    client.get(f"{API}/me", headers=alice)
    assert abs(last_used() - recent) < dt.timedelta(milliseconds=1)  # still within the minute
    stale = used_ago(61)
    client.get(f"{API}/me", headers=alice)
    assert last_used() > stale + dt.timedelta(seconds=60)


def test_expiry_and_quota_values_are_read_as_the_cli_takes_them():
    now = dt.datetime(2026, 12, 1, 9, 30, tzinfo=dt.timezone.utc)
    assert accounts.expiry("30d", now) == now + dt.timedelta(days=30)
    assert accounts.expiry("2027-01-31", now) == dt.datetime(2027, 1, 31, tzinfo=dt.timezone.utc)
    assert accounts.expiry("2027-01-31T12:00:00+02:00", now) == dt.datetime(2027, 1, 31, 10, tzinfo=dt.timezone.utc)
    assert accounts.expiry("2027-01-31T12:00:00Z", now) == dt.datetime(2027, 1, 31, 12, tzinfo=dt.timezone.utc)
    for text, message in [("0d", "from 1d to 36500d"), ("30 days", "a number of days (30d)"),
                          ("2026-11-30", "2026-11-30T00:00:00Z is not in the future")]:
        with pytest.raises(accounts.AccountError, match=re.escape(message)):
            accounts.expiry(text, now)
    assert (accounts.quota_value("4"), accounts.quota_value("default")) == (4, None)
    for text in ("-1", "1.5", "4k", "", "1" * 20):
        with pytest.raises(accounts.AccountError, match="a quota is a whole number or 'default'"):
            accounts.quota_value(text)


@pytest.mark.parametrize("user, key, message", [
    ("bidi\u202eeve", "laptop", "user name 'bidi\\u202eeve': '\\u202e' at position 4 is an invisible format character"),
    ("eve", "lap\u2066top\u2069", "key name 'lap\\u2066top\\u2069': '\\u2066' at position 3 is an invisible format"),
    ("eve", "\u200blaptop", "key name '\\u200blaptop': '\\u200b' at position 0 is an invisible format character"),
    (" ", "laptop", "user name ' ': blank: only spaces"),
    ("eve", "laptop ", "key name 'laptop ': no spaces around it"),
])
def test_a_user_or_key_name_that_disguises_itself_is_refused_and_nothing_is_stored(sessions, user, key, message):
    with sessions() as session:
        with pytest.raises(accounts.AccountError, match=re.escape(message)):
            accounts.create_api_key(session, user, key)
        assert session.scalars(select(User)).all() == [] and session.scalars(select(ApiKey)).all() == []


def test_quota_share_and_role_changes_check_their_values_and_default_drops_an_override(sessions):
    with sessions() as session:
        accounts.create_user(session, "erin")
        accounts.set_quota(session, "erin", "gpus", 2)
        accounts.set_quota(session, "erin", "streams", 1)
        assert accounts.set_quota(session, "erin", "gpus", None).quotas == {"streams": 1}
        assert accounts.set_quota(session, "erin", "streams", None).quotas is None
        for change, message in [
            (lambda: accounts.set_quota(session, "erin", "gpu", 1), "'gpu' is not a quota; did you mean 'gpus'?"),
            (lambda: accounts.set_share(session, "erin", 0.0), "a share is a number from 0.001 to 1000, not 0.0"),
            (lambda: accounts.set_share(session, "erin", float("inf")),
             "a share is a number from 0.001 to 1000, not inf"),
            (lambda: accounts.set_share(session, "erin", 1e308),
             "a share is a number from 0.001 to 1000, not 1e+308"),
            (lambda: accounts.create_user(session, "cli:root"), "'cli' names the command line in the audit log"),
            (lambda: accounts.create_user(session, " spaced "), "no spaces around it"),
            (lambda: accounts.set_role(session, "erin", "root"), "'root' is not a role; allowed: admin, user"),
            (lambda: accounts.create_user(session, "erin"), "user 'erin' exists already"),
            (lambda: accounts.revoke_key(session, "none"), "no unrevoked API key 'none'"),
        ]:
            with pytest.raises(accounts.AccountError, match=re.escape(message)):
                change()
        accounts.create_api_key(session, "erin", "laptop")
        accounts.create_api_key(session, "fred", "laptop")
        with pytest.raises(accounts.AccountError, match="users 'erin', 'fred' each have an API key 'laptop'"):
            accounts.revoke_key(session, "laptop")
        assert [row.user_name for row in accounts.revoke_key(session, "laptop", "fred")] == ["fred"]
        assert [(row.user.name, row.keys) for row in accounts.users(session)] == [("erin", 1), ("fred", 0)]


def test_serve_s_key_is_an_admin_s_and_is_replaced_once_revoked_or_expired(sqlite_url, tmp_path):
    settings = Settings(home=tmp_path / "home", database_url=sqlite_url).resolved()
    first = local_token(settings)
    assert local_token(settings) == first
    app = create_app({"TESTING": True, "database_url": sqlite_url, "artifacts_url": str(tmp_path / "artifacts")})
    sessions = app.extensions["torchyard"].sessions
    with sessions() as session:
        assert session.scalar(select(User.role).where(User.name == "local")) == "admin"
        accounts.revoke_key(session, "torchyard serve", "local")
    second = local_token(settings)
    assert second != first and (settings.home / "token").read_text().strip() == second
    with sessions() as session:
        session.execute(update(ApiKey).where(ApiKey.revoked_at.is_(None)).values(expires_at=utcnow()))
        session.commit()
    third = local_token(settings)
    assert third not in (first, second)
    assert app.test_client().get(f"{API}/me", headers={"Authorization": f"Bearer {third}"}).json["role"] == "admin"
    app.extensions["torchyard"].engine.dispose()
