"""Following a job's metrics live as Server-Sent Events, over real HTTP."""

from __future__ import annotations

import contextlib
import json
import threading
import time
import urllib.error
import urllib.request

import pytest
from sqlalchemy import insert

from api.epoch_rows import METRICS_PAGE
from models.tables import EpochMetrics

JOBS = "/api/v1/jobs"


@pytest.fixture
def app(make_app):
    """The API with a fast poll, frequent keep-alives and a short stream limit, so tests run in seconds."""
    return make_app(
        METRICS_STREAM_POLL_SECONDS=0.05, METRICS_STREAM_KEEPALIVE_SECONDS=0.3, METRICS_STREAM_MAX_SECONDS=30
    )


def open_stream(url: str, token: str, headers: dict[str, str] | None = None):
    """The HTTP response of a metrics stream (the caller reads it), or the error response."""
    headers = {"Authorization": f"Bearer {token}", "Accept": "text/event-stream", **(headers or {})}
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=20)
    except urllib.error.HTTPError as error:
        return error


def read_events(response) -> list[dict]:
    """Every event and comment until the server ends the stream: {"event", "id", "data"} or {"comment"}."""
    events, current = [], {}
    for raw in response:
        line = raw.decode().rstrip("\r\n")
        if line == "":
            if current:
                events.append(current)
            current = {}
        elif line.startswith(":"):
            events.append({"comment": line[1:].strip()})
        else:
            field, _, value = line.partition(": ")
            current[field] = json.loads(value) if field == "data" else value
    return events


def submit(live_server, token, spec) -> str:
    request = urllib.request.Request(
        f"{live_server}{JOBS}",
        data=json.dumps(spec).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())["id"]


def add_epoch(sessions, job_id: str, epoch: int) -> None:
    with sessions() as session:
        session.add(EpochMetrics(job_id=job_id, epoch=epoch, attempt=1, values={"loss": 1 / epoch}))
        session.commit()


def test_the_stream_follows_new_epochs_in_order_and_ends_when_the_job_finishes(
    live_server, app, tokens, spec, sessions, set_job
):
    job_id = submit(live_server, tokens["alice"], spec)
    set_job(job_id, status="running", attempts=1)
    add_epoch(sessions, job_id, 1)
    engine = app.extensions["torchyard"].engine

    def train():
        # A worker's part, from another thread while the stream is read.
        for epoch in (2, 3, 4, 5):
            time.sleep(0.15)
            add_epoch(sessions, job_id, epoch)
            set_job(job_id, epoch=epoch)
        time.sleep(0.15)
        set_job(job_id, status="succeeded", stop_reason="completed")

    response = open_stream(f"{live_server}{JOBS}/{job_id}/metrics", tokens["alice"])
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/event-stream")
    assert response.headers["Cache-Control"] == "no-cache"
    worker = threading.Thread(target=train)
    worker.start()
    # Between polls the stream holds no database connection (a fresh session per poll).
    samples = []
    for _ in range(20):
        samples.append(engine.pool.checkedout())
        time.sleep(0.01)
    events = [e for e in read_events(response) if "comment" not in e]
    worker.join()

    assert min(samples) == 0
    assert events[0] == {"retry": "1000"}
    metrics = [e for e in events if e.get("event") == "metrics"]
    assert [e["id"] for e in metrics] == ["1", "2", "3", "4", "5"]
    assert metrics[1]["data"] == {"epoch": 2, "loss": 0.5}
    assert events[-1]["event"] == "status"
    assert "id" not in events[-1]
    assert events[-1]["data"]["id"] == job_id
    assert events[-1]["data"]["status"] == "succeeded"
    assert events[-1]["data"]["progress"] == {"epoch": 5, "epochs": 5}


def test_a_reconnect_gets_only_the_later_epochs(live_server, tokens, spec, sessions, set_job):
    job_id = submit(live_server, tokens["alice"], spec)
    for epoch in (1, 2, 3, 4):
        add_epoch(sessions, job_id, epoch)
    set_job(job_id, status="failed", error="out of memory", epoch=4)
    url = f"{live_server}{JOBS}/{job_id}/metrics"

    def epochs(response) -> list[str]:
        return [e["id"] for e in read_events(response) if e.get("event") == "metrics"]

    assert epochs(open_stream(url, tokens["alice"], {"Last-Event-ID": "2"})) == ["3", "4"]
    # The header of a reconnect wins over the since_epoch of the URL the stream was first opened with.
    assert epochs(open_stream(f"{url}?since_epoch=1", tokens["alice"], {"Last-Event-ID": "3"})) == ["4"]
    events = read_events(open_stream(f"{url}?stream=1&since_epoch=4", tokens["alice"], {"Accept": "*/*"}))
    assert [e.get("event") for e in events if "event" in e] == ["status"]
    assert events[-1]["data"]["error"] == "out of memory"


def test_a_stream_of_a_finished_job_longer_than_a_page_sends_every_epoch_once_then_its_status(
    live_server, tokens, spec, sessions, set_job
):
    job_id = submit(live_server, tokens["alice"], spec)
    with sessions() as session:  # the stream reads METRICS_PAGE rows a poll (api.epoch_rows)
        session.execute(insert(EpochMetrics), [dict(job_id=job_id, epoch=epoch, attempt=1, values={"loss": 1.0})
                                               for epoch in range(1, METRICS_PAGE + 2)])
        session.commit()
    set_job(job_id, status="succeeded", attempts=1)
    events = read_events(open_stream(f"{live_server}{JOBS}/{job_id}/metrics", tokens["alice"]))
    sent = [event for event in events if "event" in event]
    assert [event["data"]["epoch"] for event in sent[:-1]] == list(range(1, METRICS_PAGE + 2))
    assert sent[-1]["event"] == "status" and sent[-1]["data"]["status"] == "succeeded"


def test_without_a_stream_request_the_metrics_are_json(live_server, tokens, spec, sessions):
    job_id = submit(live_server, tokens["alice"], spec)
    add_epoch(sessions, job_id, 1)
    for url in (f"{live_server}{JOBS}/{job_id}/metrics", f"{live_server}{JOBS}/{job_id}/metrics?stream=false"):
        with open_stream(url, tokens["alice"], {"Accept": "application/json"}) as response:
            assert response.headers["Content-Type"] == "application/json"
            assert json.loads(response.read()) == {"metrics": [{"epoch": 1, "loss": 1.0}], "status": "queued",
                                                   "next_since_epoch": None}


def test_another_users_stream_and_bad_arguments_are_problems(live_server, tokens, spec):
    job_id = submit(live_server, tokens["alice"], spec)
    url = f"{live_server}{JOBS}/{job_id}/metrics"
    for token, query, headers, status in (
        (tokens["bob"], "", {}, 404),
        (tokens["alice"], "?stream=maybe", {}, 422),
        (tokens["alice"], "", {"Last-Event-ID": "epoch-3"}, 422),
        (tokens["alice"], "?since_epoch=99999999999999999999", {}, 422),
        (tokens["alice"], "?max_points=5", {}, 422),  # a sample of a stream
    ):
        response = open_stream(url + query, token, headers)
        assert response.status == status
        assert response.headers["Content-Type"] == "application/problem+json"
        assert json.loads(response.read())["status"] == status


@contextlib.contextmanager
def serving(app):
    """The app on a free port in a thread, for streams that need an app of their own settings; its URL."""
    from werkzeug.serving import make_server

    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join(timeout=10)


def test_a_quiet_stream_sends_keep_alives_and_ends_at_its_time_limit(make_app, tokens, spec):
    app = make_app(
        METRICS_STREAM_POLL_SECONDS=0.05, METRICS_STREAM_KEEPALIVE_SECONDS=0.2, METRICS_STREAM_MAX_SECONDS=1.0
    )
    with serving(app) as base:
        job_id = submit(base, tokens["alice"], spec)
        started = time.monotonic()
        events = read_events(open_stream(f"{base}{JOBS}/{job_id}/metrics", tokens["alice"]))
        elapsed = time.monotonic() - started
    assert 1.0 <= elapsed < 10
    assert {"comment": "keep-alive"} in events
    assert not [e for e in events if "event" in e]  # still queued: no metrics, no status


def test_a_stream_ends_soon_after_the_key_that_opened_it_is_revoked(make_app, tokens, spec, sessions):
    from models import accounts

    app = make_app(METRICS_STREAM_POLL_SECONDS=0.05, METRICS_STREAM_KEEPALIVE_SECONDS=0.2,
                   METRICS_STREAM_MAX_SECONDS=30, METRICS_STREAM_KEY_CHECK_SECONDS=0.1)
    with serving(app) as base:
        job_id = submit(base, tokens["alice"], spec)
        stream = open_stream(f"{base}{JOBS}/{job_id}/metrics", tokens["alice"])
        assert stream.readline().startswith(b"retry:")  # it is open
        with sessions() as session:
            accounts.revoke_key(session, "test", "alice")
        started = time.monotonic()
        events = read_events(stream)  # returns when the server ends the stream
        elapsed = time.monotonic() - started
    assert elapsed < 10  # the stream's limit is 30 s: it ended because the key no longer holds
    assert not [e for e in events if "event" in e]
