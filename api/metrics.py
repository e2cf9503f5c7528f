"""``GET /metrics`` for Prometheus (admins only), and the latency of every request this API answers.

Two kinds of figures, each observed where it is true:

- what the database knows (jobs by queue and state, recent waits, run times and epochs, live workers and
  slots): read at each scrape (models.monitoring), so every API process answers the same, whichever process or
  worker changed it;
- what only an API process sees, the latency of its requests by route, method and status: a histogram observed
  on every request. Under ``torchyard api`` (gunicorn) prometheus-client's multiprocess mode writes each
  process's histogram to files in PROMETHEUS_MULTIPROC_DIR (api/gunicorn_hooks.py manages them), and a scrape,
  whichever process answers it, sums them all.

Labels are ``queue``, ``state``, ``route`` (the URL rule, never the path: bounded), ``method`` and ``status``:
no user's, job's or dataset's name is ever a label.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from flask import Blueprint, Flask, Response, current_app, g, request, request_finished, request_started
from prometheus_client import CollectorRegistry, Histogram, values
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import GaugeHistogramMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.utils import floatToGoString
from werkzeug.exceptions import MethodNotAllowed

from api.auth import require_admin, require_user
from api.db import get_session, services
from models.monitoring import Snapshot, snapshot
from models.tables import FINISHED_STATUSES, JOB_STATUSES

EXTENSION = "torchyard.metrics"
PREFIX = "torchyard"
# Requests with another method (any token is one to HTTP) share one label value, so that none can grow the series.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UNMATCHED = "unmatched"  # the route of a request whose path no URL rule matches (a 404)
# Seconds. Requests: a read takes milliseconds, an upload of 100 MB seconds. Waits: a job on an idle cluster
# starts within a second, one behind a busy queue hours later. Runs: up to max_runtime_seconds (a day).
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, math.inf)
WAIT_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 86400, math.inf)
RUN_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 28800, 86400, math.inf)

bp = Blueprint("metrics", __name__)
bp.before_request(require_user)
bp.before_request(require_admin)


@dataclass(frozen=True)
class AppMetrics:
    """An app's request histogram, and the registry it is kept in when this process counts alone."""

    requests: Histogram
    local: CollectorRegistry | None  # None in multiprocess mode: the values are in the shared files


def init_metrics(app: Flask) -> AppMetrics:
    """Time every request of ``app`` (by route, method, status) and serve ``GET /metrics``."""
    local = None if multiprocess() else CollectorRegistry()
    requests = Histogram(f"{PREFIX}_http_request_duration_seconds",
                         "Time from a request's arrival at the app to its response's headers, by URL rule.",
                         ("route", "method", "status"), registry=local, buckets=REQUEST_BUCKETS)
    app.extensions[EXTENSION] = metrics = AppMetrics(requests, local)
    # Flask's signals bracket every request, a refusal by a before_request hook (401, 429) included.
    request_started.connect(_started, app)
    request_finished.connect(_finished, app)
    app.register_blueprint(bp)
    return metrics


def multiprocess() -> bool:
    """Whether this process writes its metric values to PROMETHEUS_MULTIPROC_DIR's files (prometheus-client
    decides when it is imported, by that variable); a scrape must then read them all."""
    return values.ValueClass is not values.MutexValue


@bp.get("/metrics")
def metrics():
    """The service's metrics in Prometheus' text format (OpenMetrics when the scraper asks for it); admins only."""
    registry = CollectorRegistry(auto_describe=False)
    local = current_app.extensions[EXTENSION].local
    if local is None:
        MultiProcessCollector(registry)
    else:
        registry.register(local)
    registry.register(DatabaseCollector(snapshot(get_session(), services())))
    encode, content_type = choose_encoder(request.headers.get("Accept", ""))
    return Response(encode(registry), content_type=content_type)


def _started(_app: Flask, **_extra) -> None:
    g.metrics_started = time.perf_counter()


def _finished(app: Flask, response: Response, **_extra) -> None:
    started = g.pop("metrics_started", None)
    if started is None:
        return
    method = request.method if request.method in METHODS else "other"
    app.extensions[EXTENSION].requests.labels(_route(app), method, str(response.status_code)).observe(
        time.perf_counter() - started)


def _route(app: Flask) -> str:
    """The URL rule of the request: the one it matched, or for a method the rule doesn't allow (a 405), the
    rule its path matched; UNMATCHED when no rule matches its path."""
    if request.url_rule is not None:
        return request.url_rule.rule
    refused = request.routing_exception
    if not (isinstance(refused, MethodNotAllowed) and refused.valid_methods):
        return UNMATCHED
    # Werkzeug raises MethodNotAllowed only once a rule matched the path: asked with a method it allows, the
    # same path finds that rule.
    rule, _ = app.create_url_adapter(request).match(method=refused.valid_methods[0], return_rule=True)
    return rule.rule


class DatabaseCollector:
    """The figures of one scrape (models.monitoring.Snapshot) as Prometheus metric families."""

    def __init__(self, found: Snapshot):
        self.found = found

    def collect(self) -> Iterable[Metric]:
        """Jobs, recent waits, run times and epochs, workers and slots; every queue known gets every series."""
        found = self.found
        jobs = GaugeMetricFamily(f"{PREFIX}_jobs", "Jobs in the database, by queue and state.",
                                 labels=("queue", "state"))
        for queue in found.queues:
            for state in JOB_STATUSES:
                jobs.add_metric((queue, state), found.jobs.get((queue, state), 0))
        yield jobs
        window = f"within the last metrics window (TORCHYARD_METRICS_WINDOW_SECONDS, {found.window_seconds} s)"
        waits = GaugeHistogramMetricFamily(
            f"{PREFIX}_job_queue_wait_seconds", f"From submit to start, of the jobs that started {window}.",
            labels=("queue",))
        runs = GaugeHistogramMetricFamily(
            f"{PREFIX}_job_run_seconds", f"From start to end, of the jobs that ended {window}, by final state.",
            labels=("queue", "state"))
        epochs = GaugeMetricFamily(f"{PREFIX}_epochs_trained", f"Epochs that ended {window}, by queue.",
                                   labels=("queue",))
        for queue in found.queues:
            waits.add_metric((queue,), *_buckets(found.waits.get(queue, ()), WAIT_BUCKETS))
            epochs.add_metric((queue,), found.epochs.get(queue, 0))
            for state in FINISHED_STATUSES:
                runs.add_metric((queue, state), *_buckets(found.runs.get((queue, state), ()), RUN_BUCKETS))
        yield from (waits, runs, epochs)
        yield GaugeMetricFamily(f"{PREFIX}_metrics_window_seconds",
                                "The window of the job_queue_wait, job_run and epochs_trained figures (epochs per "
                                "second: epochs_trained divided by this).", value=found.window_seconds)
        yield from self._capacity()

    def _capacity(self) -> Iterable[Metric]:
        capacity = self.found.capacity
        for name, what, attribute in (("workers_live", "Live workers serving the queue", "workers"),
                                      ("worker_slots", "Job slots of the live workers serving the queue", "slots"),
                                      ("worker_slots_free", "Of those slots, the ones running no job", "free")):
            family = GaugeMetricFamily(f"{PREFIX}_{name}", f"{what} (a worker of several queues counts in each).",
                                       labels=("queue",))
            for queue in sorted(capacity):
                family.add_metric((queue,), getattr(capacity[queue], attribute))
            yield family


def _buckets(observed: Sequence[float], bounds: Sequence[float]) -> tuple[list[tuple[str, float]], float]:
    """Cumulative (le, count) pairs of ``observed`` over ``bounds`` (the last one +Inf), and their sum."""
    pairs = [(floatToGoString(bound), float(sum(1 for value in observed if value <= bound))) for bound in bounds]
    return pairs, float(sum(observed))
