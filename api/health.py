"""Liveness with dependency checks, and the OpenAPI document; both need no API key."""

from __future__ import annotations

import logging

from flask import Blueprint, current_app, jsonify
from sqlalchemy import text

from api.db import get_session, services
from api.openapi import openapi_document
from api.schemas import API_PREFIX, HealthOut, json_response

log = logging.getLogger(__name__)

bp = Blueprint("health", __name__, url_prefix=API_PREFIX)

BROKER_TIMEOUT_SECONDS = 2.0


@bp.get("/health")
def health():
    """Liveness with dependency checks.

    200 when every dependency answers, else 503; each check says ``ok``, ``skipped …`` or ``error: …``."""
    checks = {"database": _check(_ping_database), "broker": _check(_ping_broker)}
    ok = all(not value.startswith("error") for value in checks.values())
    return json_response(HealthOut(status="ok" if ok else "error", checks=checks), status=200 if ok else 503)


@bp.get("/openapi.json")
def openapi():
    """The OpenAPI 3.1 document of this API."""
    return jsonify(openapi_document(current_app))


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
