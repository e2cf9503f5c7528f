"""Metrics streams never starve other requests: bounded per user (across API processes) and per API process,
refused with a 429 problem, and a closed client's slot freed promptly.

The gunicorn tests run the API exactly as ``torchyard api`` starts it (2 processes × 16 threads) over
PostgreSQL, the production database, and hold their streams open over real sockets. No test measures time:
a request that a starved server never answers fails on its socket timeout (ANSWER_SECONDS).
"""

from __future__ import annotations

import datetime as dt
import http.client
import json
import os
import subprocess
import sys
import urllib.parse

import pytest
import requests
from conftest import settings_env, wait_for, worker_settings
from sqlalchemy import func, select

from api.auth import create_api_key
from models.settings import Settings
from models.tables import StreamSlot, User, utcnow

JOBS = "/api/v1/jobs"
# Generous: only a server whose threads are all taken misses it.
ANSWER_SECONDS = 10
STREAMS = 100
PER_USER = Settings.model_fields["quota_streams"].default
USER_QUOTA = "quota_streams"  # the setting a per-user refusal names (models.quotas)
PER_PROCESS = Settings.model_fields["max_streams_per_process"].default
GUNICORN_PROCESSES = 2  # what ApiServer starts; each serves at most PER_PROCESS streams


class StreamRequest:
    """A metrics-stream request on a connection of its own: sent at once, its answer read later."""

    def __init__(self, base_url: str, token: str, job_id: str):
        url = urllib.parse.urlsplit(base_url)
        self.connection = http.client.HTTPConnection(url.hostname, url.port, timeout=ANSWER_SECONDS)
        self.connection.request("GET", f"{JOBS}/{job_id}/metrics",
                                headers={"Authorization": f"Bearer {token}", "Accept": "text/event-stream"})
        self.response: http.client.HTTPResponse | None = None

    def answer(self) -> http.client.HTTPResponse:
        """The status line and headers; a server with no thread left never sends them."""
        if self.response is None:
            try:
                self.response = self.connection.getresponse()
            except TimeoutError:
                pytest.fail(f"a stream request got no answer within {ANSWER_SECONDS} s: the server is starved")
        return self.response

    @property
    def open(self) -> bool:
        return self.answer().status == 200

    def problem(self) -> dict:
        response = self.answer()
        assert response.headers["Content-Type"] == "application/problem+json"
        return json.loads(response.read())

    def next_comment(self) -> str:
        """Read the stream up to its next comment line (a keep-alive): the stream is still served."""
        while True:
            line = self.answer().readline().decode()
            assert line, "the stream ended"
            if line.startswith(":"):
                return line[1:].strip()

    def close(self) -> None:
        """Hang up as a browser tab does: the server only learns of it when a write fails."""
        if self.response is not None:
            self.response.close()
        self.connection.close()


@pytest.fixture
def streams():
    """Collects StreamRequests and closes whatever a test left open."""
    opened: list[StreamRequest] = []
    yield opened
    for stream in opened:
        stream.close()


def submit(base_url: str, token: str, spec: dict) -> str:
    response = requests.post(f"{base_url}{JOBS}", json=spec, headers={"Authorization": f"Bearer {token}"},
                             timeout=ANSWER_SECONDS)
    assert response.status_code == 201, response.text
    return response.json()["id"]


def assert_answers(base_url: str, token: str, job_id: str) -> None:
    """/health and the caller's job list both answer while the streams are open."""
    health = requests.get(f"{base_url}/api/v1/health", timeout=ANSWER_SECONDS)
    assert health.status_code == 200, health.text
    jobs = requests.get(f"{base_url}{JOBS}", headers={"Authorization": f"Bearer {token}"}, timeout=ANSWER_SECONDS)
    assert jobs.status_code == 200, jobs.text
    assert [job["id"] for job in jobs.json()["jobs"]] == [job_id]


def assert_refused(stream: StreamRequest, setting: str) -> None:
    """A 429 problem naming the limit's setting, with a Retry-After: the user's streams quota (the one answer
    of every quota), or the process's limit."""
    response = stream.answer()
    assert response.status == 429
    assert int(response.headers["Retry-After"]) > 0
    problem = stream.problem()
    assert problem["status"] == 429
    kind = "quota-exceeded" if setting == USER_QUOTA else "too-many-streams"
    assert problem["type"] == f"/problems/{kind}"
    assert setting in problem["detail"]


def two_users(service) -> dict[str, str]:
    """Tokens of alice (the deployment's key) and bob."""
    with service.sessions() as session:
        bob = create_api_key(session, "bob", "test")
    return {"alice": service.headers["Authorization"].removeprefix("Bearer "), "bob": bob}


def test_a_hundred_streams_from_two_users_leave_health_and_job_lists_answering(
    postgres_url, http_deployment, spec, streams, tmp_path
):
    from private_servers import ApiServer

    # Two API machines over one database: a user's streams count across every API process.
    service = http_deployment(postgres_url, "filesystem://", workers=0)
    second = ApiServer(settings_env(service.settings), tmp_path / "api-2.log")
    try:
        servers = [service.api.url, second.url]
        tokens = two_users(service)
        jobs = {user: submit(servers[0], token, spec) for user, token in tokens.items()}
        users = ["alice", "bob"] * (STREAMS // 2)
        # Every request is sent before any answer is read, as a crowd of browser tabs would.
        sent = [(user, StreamRequest(servers[i % 2], tokens[user], jobs[user])) for i, user in enumerate(users)]
        streams.extend(stream for _, stream in sent)
        open_ = {user: [s for u, s in sent if u == user and s.open] for user in tokens}

        assert {user: len(held) for user, held in open_.items()} == {"alice": PER_USER, "bob": PER_USER}
        for _, stream in sent:
            if not stream.open:
                assert_refused(stream, USER_QUOTA)
        for base_url in servers:
            for user, token in tokens.items():
                assert_answers(base_url, token, jobs[user])
        for held in open_.values():
            for stream in held:
                assert stream.next_comment() == "keep-alive"

        # Hanging up frees the slots: alice may open streams again, on either machine.
        for stream in open_["alice"][:2]:
            stream.close()

        def reopened(base_url: str) -> StreamRequest | None:
            stream = StreamRequest(base_url, tokens["alice"], jobs["alice"])
            streams.append(stream)
            if stream.open:
                return stream
            assert_refused(stream, USER_QUOTA)
            stream.close()
            return None

        for base_url in servers:
            wait_for(lambda url=base_url: reopened(url), 30, "a closed stream's slot to be freed", service.log)
        assert_refused(StreamRequest(servers[1], tokens["alice"], jobs["alice"]), USER_QUOTA)
    finally:
        for stream in streams:  # hung up first, so the server's graceful stop need not wait for them
            stream.close()
        second.stop()


def test_each_api_process_keeps_threads_free_however_many_streams_its_users_may_open(
    postgres_url, http_deployment, spec, streams
):
    service = http_deployment(postgres_url, "filesystem://", workers=0, quota_streams=STREAMS)
    tokens = two_users(service)
    base_url = service.api.url
    jobs = {user: submit(base_url, token, spec) for user, token in tokens.items()}
    streams.extend(StreamRequest(base_url, tokens[user], jobs[user]) for user in ["alice", "bob"] * (STREAMS // 2))
    held = [stream for stream in streams if stream.open]

    # A process refuses only once it holds PER_PROCESS streams, and the refusals prove that one did.
    assert PER_PROCESS <= len(held) <= GUNICORN_PROCESSES * PER_PROCESS
    for stream in streams:
        if not stream.open:
            assert_refused(stream, "TORCHYARD_MAX_STREAMS_PER_PROCESS")
    for user, token in tokens.items():
        assert_answers(base_url, token, jobs[user])
    for stream in held:
        assert stream.next_comment() == "keep-alive"


# --- under werkzeug's threaded server, as `torchyard serve` runs the API -------------------------


@pytest.fixture
def app(make_app):
    """Small limits and a fast stream, so a closed client is noticed at once."""
    return make_app(quota_streams=2, max_streams_per_process=3, METRICS_STREAM_POLL_SECONDS=0.05,
                    METRICS_STREAM_KEEPALIVE_SECONDS=0.1, METRICS_STREAM_SLOT_LEASE_SECONDS=0.6)


def slots(sessions) -> dict[str, int]:
    """Live stream slots by user name."""
    with sessions() as session:
        rows = session.execute(select(User.name, func.count()).join(StreamSlot, StreamSlot.user_id == User.id)
                               .where(StreamSlot.expires_at > utcnow()).group_by(User.name)).all()
    return dict(rows)


def test_serve_bounds_streams_per_user_and_per_process_and_frees_a_closed_clients_slot(
    live_server, tokens, spec, sessions, streams
):
    jobs = {user: submit(live_server, token, spec) for user, token in tokens.items()}

    def stream(user: str) -> StreamRequest:
        streams.append(StreamRequest(live_server, tokens[user], jobs[user]))
        return streams[-1]

    alice = [stream("alice"), stream("alice")]
    assert [s.answer().status for s in alice] == [200, 200]
    assert_refused(stream("alice"), USER_QUOTA)
    assert stream("bob").answer().status == 200
    assert_refused(stream("bob"), "TORCHYARD_MAX_STREAMS_PER_PROCESS")
    assert slots(sessions) == {"alice": 2, "bob": 1}

    alice[0].close()
    wait_for(lambda: slots(sessions) == {"alice": 1, "bob": 1}, 30, "the closed stream's slot to be freed")
    assert stream("bob").answer().status == 200
    assert slots(sessions) == {"alice": 1, "bob": 2}


def test_a_stream_renews_its_slot_and_a_dead_processs_slot_lapses(live_server, tokens, spec, sessions, streams):
    job_id = submit(live_server, tokens["alice"], spec)
    with sessions() as session:
        alice = session.scalar(select(User.id).where(User.name == "alice"))
        # Slots left behind by an API process that died without closing its streams.
        session.add_all(StreamSlot(user_id=alice, process="gone:1", expires_at=utcnow() - dt.timedelta(seconds=1))
                        for _ in range(2))
        session.commit()
    streams.append(StreamRequest(live_server, tokens["alice"], job_id))
    assert streams[-1].answer().status == 200

    def expiry() -> dt.datetime:
        with sessions() as session:
            return session.scalar(select(func.max(StreamSlot.expires_at)).where(StreamSlot.user_id == alice))

    first = expiry()
    # The lease (0.6 s) is renewed while the stream runs, so the slot outlives it.
    wait_for(lambda: expiry() > first + dt.timedelta(seconds=1), 30, "the stream's slot to be renewed")
    assert slots(sessions) == {"alice": 1}
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(StreamSlot)) == 1  # the lapsed ones were purged


def test_a_finished_stream_gives_its_slot_back(live_server, tokens, spec, sessions, set_job, streams):
    job_id = submit(live_server, tokens["alice"], spec)
    set_job(job_id, status="succeeded", stop_reason="completed")

    def rows() -> int:
        with sessions() as session:
            return session.scalar(select(func.count()).select_from(StreamSlot))

    for _ in range(4):  # more than either limit, one after another
        streams.append(StreamRequest(live_server, tokens["alice"], job_id))
        assert streams[-1].answer().status == 200
        assert "event: status" in streams[-1].answer().read().decode()
        wait_for(lambda: rows() == 0, 30, "the finished stream's slot to be deleted")


def test_the_api_command_refuses_a_stream_limit_that_leaves_no_thread(tmp_path):
    settings = worker_settings(tmp_path / "home", max_streams_per_process=16, api_threads=16)
    result = subprocess.run([sys.executable, "-m", "torchyard.cli", "api", "--bind", "127.0.0.1:1"],
                            env={**settings_env(settings), "PATH": os.environ["PATH"]}, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode != 0
    assert "TORCHYARD_MAX_STREAMS_PER_PROCESS (16) must be below TORCHYARD_API_THREADS (16)" in result.stderr
