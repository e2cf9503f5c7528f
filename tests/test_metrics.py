"""GET /metrics: what Prometheus scrapes (api/metrics.py, models/monitoring.py, api/gunicorn_hooks.py).

A real job through a real worker, then the figures it left; exact buckets of arranged jobs on SQLite and
PostgreSQL; who may scrape; the request histograms of two gunicorn processes summed by either; and the
Grafana dashboard asking only for what the endpoint exports.
"""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import json
import os
import re
import signal
import urllib.request
from pathlib import Path

import pytest
from conftest import CIRCLES_SPEC, running_service, settings_env, wait_for, worker_settings
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from models import accounts
from models.db import make_engine, make_sessionmaker
from models.tables import EpochMetrics, Job, User, utcnow

ROOT = Path(__file__).resolve().parents[1]
GRAFANA = ROOT / "deploy" / "grafana" / "torchyard.json"
REQUESTS = "torchyard_http_request_duration_seconds"
STATES = ("queued", "running", "succeeded", "failed", "cancelled")


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of a scrape by (name, labels)."""
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def value(scraped: dict, name: str, **labels: str) -> float:
    """The sample ``name`` with exactly ``labels``; fails naming what the scrape has under that name."""
    key = (name, frozenset(labels.items()))
    if key not in scraped:
        have = sorted(dict(found) for found_name, found in scraped if found_name == name)
        pytest.fail(f"no {name}{labels} in the scrape; it has {name} with {have}")
    return scraped[key]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def admin_key(sessions, name: str = "root") -> str:
    with sessions() as session:
        accounts.create_user(session, name, role="admin")
        return accounts.create_api_key(session, name, "prometheus")


def _when(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text)


# --- a real job through a real worker ------------------------------------------------------------------


def test_after_a_job_the_metrics_show_its_state_epochs_wait_run_and_requests(tmp_path):
    with running_service(worker_settings(tmp_path / "home")) as service:
        job_id = service.submit({**CIRCLES_SPEC, "name": "secret-project-x"})
        job = service.wait_status(job_id)
        assert job["status"] == "succeeded", job
        response = service.client.get("/metrics", headers=bearer(admin_key(service.sessions)))

    assert response.status_code == 200
    assert response.content_type == "text/plain; version=0.0.4; charset=utf-8"
    text = response.get_data(as_text=True)
    scraped = samples(text)
    for state in STATES:
        assert value(scraped, "torchyard_jobs", queue="cpu", state=state) == (state == "succeeded")
    assert job["progress"]["epoch"] == 5
    assert value(scraped, "torchyard_epochs_trained", queue="cpu") == 5
    waited = (_when(job["started_at"]) - _when(job["created_at"])).total_seconds()
    ran = (_when(job["finished_at"]) - _when(job["started_at"])).total_seconds()
    assert value(scraped, "torchyard_job_queue_wait_seconds_gcount", queue="cpu") == 1
    assert value(scraped, "torchyard_job_queue_wait_seconds_gsum", queue="cpu") == pytest.approx(waited, abs=1e-6)
    assert value(scraped, "torchyard_job_run_seconds_gcount", queue="cpu", state="succeeded") == 1
    ran_sum = value(scraped, "torchyard_job_run_seconds_gsum", queue="cpu", state="succeeded")
    assert ran_sum == pytest.approx(ran, abs=1e-6)
    assert value(scraped, "torchyard_job_run_seconds_gcount", queue="cpu", state="failed") == 0
    assert value(scraped, "torchyard_workers_live", queue="cpu") == 1
    assert value(scraped, "torchyard_worker_slots", queue="cpu") == 1
    assert value(scraped, "torchyard_worker_slots_free", queue="cpu") == 1
    # The request histogram is labelled by URL rule: the submit once, the polls of the job under its rule.
    assert value(scraped, f"{REQUESTS}_count", route="/api/v1/jobs", method="POST", status="201") == 1
    assert value(scraped, f"{REQUESTS}_count", route="/api/v1/jobs/<job_id>", method="GET", status="200") >= 1
    # Counts only: no job id, job name or user name is a label.
    for private in (job_id, "secret-project-x", "alice"):
        assert private not in text


# --- exact figures of arranged jobs --------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request) -> str:
    return request.getfixturevalue("postgres_url" if request.param == "postgres" else "sqlite_url")


@pytest.fixture
def arranged(sessions, tokens, live_worker) -> dt.datetime:
    """Jobs of alice at known times (the window is 300 s): one that waited 3 s and ran 6 s just now, one
    running that waited 12 s, one queued, one that ended an hour ago; epochs in and out of the window."""
    now = utcnow()

    def ago(seconds: float | None) -> dt.datetime | None:
        return None if seconds is None else now - dt.timedelta(seconds=seconds)

    with sessions() as session:
        alice = session.query(User).filter_by(name="alice").one()

        def job(name: str, status: str, created: float, started: float | None = None, ended: float | None = None,
                **fields) -> Job:
            return Job(user_id=alice.id, name=name, status=status, spec={}, epochs=5, queue="cpu",
                       created_at=ago(created), started_at=ago(started), finished_at=ago(ended), **fields)

        jobs = [job("recent", "succeeded", 13, 10, 4, epoch=5), job("running", "running", 20, 8, epoch=2,
                                                                     worker_id=live_worker),
                job("waiting", "queued", 1), job("old", "failed", 7200, 7170, 3600, epoch=3)]
        session.add_all(jobs)
        session.flush()
        recent, running, _, old = jobs
        session.add_all([EpochMetrics(job_id=recent.id, epoch=e, attempt=1, values={}, created_at=ago(5))
                         for e in range(1, 6)])
        session.add_all([EpochMetrics(job_id=running.id, epoch=e, attempt=1, values={}, created_at=ago(1))
                         for e in range(1, 3)])
        session.add_all([EpochMetrics(job_id=old.id, epoch=e, attempt=1, values={}, created_at=ago(3700))
                         for e in range(1, 4)])
        session.commit()
    return now


def test_the_metrics_count_jobs_by_state_and_bucket_the_recent_ones_exactly(client, arranged, alice, admin):
    response = client.get("/metrics", headers=admin)
    assert response.status_code == 200
    scraped = samples(response.get_data(as_text=True))
    counts = {state: value(scraped, "torchyard_jobs", queue="cpu", state=state) for state in STATES}
    assert counts == {"queued": 1, "running": 1, "succeeded": 1, "failed": 1, "cancelled": 0}
    # Waits of the jobs that started within the window: 3 s and 12 s (the old job's is out of it).
    wait = {le: value(scraped, "torchyard_job_queue_wait_seconds_bucket", queue="cpu", le=le)
            for le in ("2.5", "5.0", "10.0", "30.0", "+Inf")}
    assert wait == {"2.5": 0, "5.0": 1, "10.0": 1, "30.0": 2, "+Inf": 2}
    assert value(scraped, "torchyard_job_queue_wait_seconds_gsum", queue="cpu") == pytest.approx(15)
    # Run times of the jobs that ended within the window: the recent one's 6 s; the old failure is out of it.
    assert value(scraped, "torchyard_job_run_seconds_bucket", queue="cpu", state="succeeded", le="5.0") == 0
    assert value(scraped, "torchyard_job_run_seconds_bucket", queue="cpu", state="succeeded", le="10.0") == 1
    assert value(scraped, "torchyard_job_run_seconds_gsum", queue="cpu", state="succeeded") == pytest.approx(6)
    assert value(scraped, "torchyard_job_run_seconds_gcount", queue="cpu", state="failed") == 0
    assert value(scraped, "torchyard_epochs_trained", queue="cpu") == 5 + 2
    assert value(scraped, "torchyard_metrics_window_seconds") == 300
    # The test worker serves many queues with 100000 slots; the running job holds one.
    assert value(scraped, "torchyard_workers_live", queue="cpu") == 1
    assert value(scraped, "torchyard_worker_slots", queue="cpu") == 100_000
    assert value(scraped, "torchyard_worker_slots_free", queue="cpu") == 99_999
    assert value(scraped, "torchyard_worker_slots_free", queue="gpu") == 99_999
    # A queue that a live worker serves has every series, zeros where it has no jobs.
    assert value(scraped, "torchyard_jobs", queue="gpu", state="queued") == 0
    assert value(scraped, "torchyard_job_run_seconds_gcount", queue="gpu", state="succeeded") == 0
    assert value(scraped, "torchyard_epochs_trained", queue="gpu") == 0


def test_only_an_admin_key_may_scrape(client, alice, admin):
    refused = client.get("/metrics")
    assert refused.status_code == 401
    assert refused.headers["WWW-Authenticate"].startswith("Bearer")
    assert refused.get_json()["type"].endswith("/unauthorized")
    assert client.get("/metrics", headers={"Authorization": "Bearer ty_not-a-key"}).status_code == 401
    forbidden = client.get("/metrics", headers=alice)
    assert forbidden.status_code == 403
    assert forbidden.get_json()["detail"] == "admins only"
    assert client.get("/metrics", headers=admin).status_code == 200


def test_a_scraper_that_asks_for_openmetrics_gets_it(client, admin):
    response = client.get("/metrics", headers={**admin, "Accept": "application/openmetrics-text; version=1.0.0"})
    assert response.status_code == 200
    assert response.content_type.startswith("application/openmetrics-text; version=1.0.0")
    text = response.get_data(as_text=True)
    assert text.endswith("# EOF\n")
    assert "# TYPE torchyard_job_queue_wait_seconds gaugehistogram" in text


def test_the_window_histograms_are_gauge_histograms_in_openmetrics_and_histograms_with_two_gauges_in_text(
        client, alice, admin, spec):
    assert client.post("/api/v1/jobs", json=spec, headers=alice).status_code == 201  # a queue with a series

    def scrape(accept: str) -> tuple[dict[str, str], set[str]]:
        """The declared types of the wait's families, and the names of its samples."""
        text = client.get("/metrics", headers={**admin, "Accept": accept}).get_data(as_text=True)
        wait = r"torchyard_job_queue_wait_seconds\w*"
        return (dict(re.findall(rf"^# TYPE ({wait}) (\w+)$", text, re.MULTILINE)),
                set(re.findall(rf"^({wait}){{", text, re.MULTILINE)))

    # OpenMetrics has the type: one family, its _bucket, _gcount and _gsum samples under it.
    samples_of = {f"torchyard_job_queue_wait_seconds_{end}" for end in ("bucket", "gcount", "gsum")}
    assert scrape("application/openmetrics-text; version=1.0.0") == (
        {"torchyard_job_queue_wait_seconds": "gaugehistogram"}, samples_of)
    # Prometheus' text format has none: a histogram of _bucket samples (no _count, no _sum), and _gcount and
    # _gsum as two gauges of their own.
    assert scrape("text/plain") == ({"torchyard_job_queue_wait_seconds": "histogram",
                                     "torchyard_job_queue_wait_seconds_gcount": "gauge",
                                     "torchyard_job_queue_wait_seconds_gsum": "gauge"}, samples_of)


def test_requests_are_labelled_by_url_rule_and_an_odd_method_or_path_adds_no_series(client, alice, admin):
    client.get("/api/v1/jobs/job_one", headers=alice)
    client.get("/api/v1/jobs/job_two", headers=alice)
    client.get("/no/such/path/1")
    client.open("/no/such/path/2", method="BREW")
    # A method the path's rule doesn't allow (405): labelled with that rule, for its path did match one.
    client.put("/docs")
    client.open("/api/v1/jobs/job_three", method="BREW", headers=alice)
    scraped = samples(client.get("/metrics", headers=admin).get_data(as_text=True))
    assert value(scraped, f"{REQUESTS}_count", route="/api/v1/jobs/<job_id>", method="GET", status="404") == 2
    assert value(scraped, f"{REQUESTS}_count", route="unmatched", method="GET", status="404") == 1
    assert value(scraped, f"{REQUESTS}_count", route="unmatched", method="other", status="404") == 1
    assert value(scraped, f"{REQUESTS}_count", route="/docs", method="PUT", status="405") == 1
    assert value(scraped, f"{REQUESTS}_count", route="/api/v1/jobs/<job_id>", method="other", status="405") == 1
    assert not any(dict(labels).get("status") == "405" and dict(labels)["route"] == "unmatched"
                   for name, labels in scraped if name == f"{REQUESTS}_count")
    routes = {dict(labels)["route"] for name, labels in scraped if name == f"{REQUESTS}_count"}
    assert not any("job_one" in route or "no/such" in route for route in routes)


def test_the_grafana_dashboard_asks_only_for_metrics_the_endpoint_exports(client, arranged, alice, admin):
    client.get("/api/v1/jobs", headers=alice)
    exported = {name for name, _ in samples(client.get("/metrics", headers=admin).get_data(as_text=True))}
    dashboard = json.loads(GRAFANA.read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    asked = {name for expr in exprs for name in re.findall(r"\btorchyard_[a-z0-9_]+", expr)}
    assert asked, "the dashboard queries no torchyard metric"
    assert asked <= exported, f"the dashboard asks for what /metrics lacks: {sorted(asked - exported)}"
    titles = " | ".join(panel["title"] for panel in dashboard["panels"])
    for wanted in ("Jobs by state", "Queue wait p50 / p95", "Run time", "Epochs per second",
                   "Live workers and free slots", "Request latency", "by route and status"):
        assert wanted in titles


# --- two gunicorn processes, one sum --------------------------------------------------------------------


def _route_counts(directory: Path, route: str) -> dict[int, float]:
    """Per gunicorn process (by pid, from its file's name): the requests it counted for ``route``."""
    counts = {}
    for path in directory.glob("histogram_*.db"):
        for metric in MultiProcessCollector.merge([str(path)]):
            for sample in metric.samples:
                if sample.name == f"{REQUESTS}_count" and sample.labels["route"] == route:
                    pid = int(path.stem.split("_")[1])
                    counts[pid] = counts.get(pid, 0) + sample.value
    return counts


def _get(url: str, token: str) -> str:
    request = urllib.request.Request(url, headers=bearer(token))
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.read().decode()


def test_under_gunicorn_a_scrape_sums_every_process_even_one_that_died(tmp_path, sqlite_url):
    from private_servers import ApiServer

    settings = worker_settings(tmp_path / "home", database_url=sqlite_url)
    engine = make_engine(sqlite_url)
    sessions = make_sessionmaker(engine)
    root = admin_key(sessions)
    with sessions() as session:
        user = accounts.create_api_key(session, "alice", "test")
    engine.dispose()
    directory = tmp_path / "prometheus"
    api = ApiServer({**settings_env(settings), "PROMETHEUS_MULTIPROC_DIR": str(directory)}, tmp_path / "api.log",
                    workers=2)
    made = 0
    try:
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            def both_processes_answered():
                nonlocal made
                list(pool.map(lambda _: _get(f"{api.url}/api/v1/me", user), range(32)))
                made += 32
                return len(_route_counts(directory, "/api/v1/me")) >= 2

            wait_for(both_processes_answered, 120, "requests answered by both gunicorn processes", api.log)

        def scraped_count() -> float:
            return value(samples(_get(f"{api.url}/metrics", root)), f"{REQUESTS}_count", route="/api/v1/me",
                         method="GET", status="200")

        per_process = _route_counts(directory, "/api/v1/me")
        assert sum(per_process.values()) == made
        # Whichever process answers the scrape, it sums the files of both.
        assert [scraped_count() for _ in range(6)] == [made] * 6
        # A process that dies is replaced; what it counted still counts.
        victim = min(per_process, key=per_process.get)
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: not Path(f"/proc/{victim}").exists() or _zombie(victim), 30, "the worker to die")
        wait_for(api.answers, 60, "the API to answer after losing a worker", api.log)
        assert [scraped_count() for _ in range(6)] == [made] * 6
    finally:
        api.stop()
    assert not list(directory.glob("*.db")), "gunicorn's exit leaves no metric files behind"


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True
