"""The API's index, liveness with dependency checks, and the OpenAPI document; none needs an API key."""

from __future__ import annotations

import logging

from flask import Blueprint, current_app, jsonify, url_for
from sqlalchemy import text

from api.db import get_session, services
from api.openapi import openapi_document
from api.rate_limits import storage_state
from api.schemas import API_PREFIX, HealthOut, IndexLinks, IndexOut, json_response
from models.liveness import NO_WORKER, Stalls, stalls
from models.version import torchyard_version

log = logging.getLogger(__name__)

bp = Blueprint("health", __name__, url_prefix=API_PREFIX)

BROKER_TIMEOUT_SECONDS = 2.0
# The index's links by name, each to the endpoint it names.
LINKS = {"dashboard": "dashboard.index", "docs": "dashboard.docs", "openapi": "health.openapi",
         "health": "health.health", "jobs": "jobs.list_jobs", "datasets": "datasets.list_datasets",
         "tags": "tags.list_tags", "workers": "workers.list_workers", "me": "me.me", "audit": "audit.list_events"}


@bp.get("/", strict_slashes=False)  # /api/v1 as well, the URL `serve` prints: no redirect
def index():
    """What this API is, and where the dashboard, its documents, its health and its collections are.

    Needs no API key and tells nothing of anyone's data: a newcomer's first request."""
    return json_response(IndexOut(
        name="torchyard", version=torchyard_version(), api_version="v1",
        authentication="Authorization: Bearer <API key> (torchyard token create, or the one serve saves in "
                       "TORCHYARD_HOME/token, by default ~/.torchyard/token), on every path but this index, "
                       "health, openapi.json, the dashboard and docs",
        links=IndexLinks(**{name: url_for(endpoint) for name, endpoint in LINKS.items()})))


@bp.get("/health")
def health():
    """Liveness with dependency checks, and whether the queued work can move.

    Each check says ``ok``, ``skipped …``, ``degraded: …`` or ``error: …``. ``error`` (503): the database or
    the broker doesn't answer, so this API can't serve. ``degraded`` (200): it serves, but jobs stall (no
    live worker for a queue with queued jobs, or expired leases that nobody reaps), or the rate limits count in
    each API process's memory (their Redis fails: each process allows a whole budget). 200 because what a
    probe does on 503, taking the API out of rotation or restarting it, would cure neither; watch ``status``.
    """
    checks = {"database": _check(_ping_database), "broker": _check(_ping_broker), "workers": _check(_workers),
              "rate_limits": _check(storage_state)}
    status = _overall(checks.values())
    return json_response(HealthOut(status=status, checks=checks), status=503 if status == "error" else 200)


@bp.get("/openapi.json")
def openapi():
    """The OpenAPI 3.1 document of this API."""
    return jsonify(openapi_document(current_app))


def _overall(checks) -> str:
    """The worst of the checks: ``error`` over ``degraded`` over ``ok``."""
    for worst in ("error", "degraded"):
        if any(check.startswith(worst) for check in checks):
            return worst
    return "ok"


def _check(ping) -> str:
    try:
        return ping()
    except Exception as exc:  # a failed check is the answer here, reported in the response and the log
        log.warning("health check %s failed", ping.__name__, exc_info=True)
        return f"error: {type(exc).__name__}"


def _ping_database() -> str:
    get_session().execute(text("SELECT 1"))
    return "ok"


def _ping_broker() -> str:
    url = services().settings.broker_url
    if not url.startswith(("redis://", "rediss://")):
        # The filesystem transport has no server to ask; other brokers are not checked.
        return f"skipped ({url.split(':', 1)[0]} transport)"
    import redis  # only deployments with a Redis broker need the client

    client = redis.Redis.from_url(
        url, socket_connect_timeout=BROKER_TIMEOUT_SECONDS, socket_timeout=BROKER_TIMEOUT_SECONDS
    )
    try:
        client.ping()
    finally:
        client.close()
    return "ok"


def _workers() -> str:
    """``ok``, or ``degraded: …`` naming what stalls (see ``models.liveness.stalls``)."""
    found = stalls(get_session(), services().settings)
    return f"degraded: {describe_stalls(found)}" if found else "ok"


def describe_stalls(found: Stalls) -> str:
    """``no live worker serves queue 'cpu' (2 queued jobs); 1 running job with an expired lease that nobody …``"""
    parts = [f"{NO_WORKER} {queue!r} ({_jobs(count, 'queued')})" for queue, count in found.unserved.items()]
    if found.unreaped:
        parts.append(f"{_jobs(found.unreaped, 'running')} with an expired lease that nobody reaps "
                     "(no worker and no `torchyard maintenance` is running)")
    return "; ".join(parts)


def _jobs(count: int, status: str) -> str:
    return f"{count} {status} job" + ("" if count == 1 else "s")
