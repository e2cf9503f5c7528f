"""Rate limits per API key, with Flask-Limiter: the one owner of who counts against which budget.

Three budgets, each a setting in Flask-Limiter's notation: submissions (``rate_limit_submit``: POST /jobs and /sweeps),
uploads (``rate_limit_upload``: POST /datasets) and every other request (``rate_limit_read``: reads, mostly).
They are counted per API key, not per address (many users share a NAT); a request without a valid key
counts against its address's read budget. ``/health`` counts against none: a probe is never refused.

Every counted answer carries the fields of draft-ietf-httpapi-ratelimit-headers: ``RateLimit-Limit``,
``RateLimit-Remaining``, ``RateLimit-Reset`` (seconds, not a date: no clock to agree on) and
``RateLimit-Policy``. One past its budget is a 429 problem naming the budget, with ``Retry-After``.

The counts live where every API process sees them (``storage_url``: the broker's Redis in production). A
Redis that fails makes each process count in its own memory until Redis answers again (Flask-Limiter's
in-memory fallback, which re-checks it every few seconds): the API stays up and limited, though each process
then allows a whole budget.
"""

from __future__ import annotations

import logging
import math
import time

from flask import Flask, Response, current_app, g, has_app_context, request
from flask_limiter import Limit, Limiter, RateLimitExceeded, RequestLimit
from limits import RateLimitItem
from limits.errors import StorageError
from limits.storage import RedisStorage
from limits.strategies import STRATEGIES, FixedWindowRateLimiter
from limits.util import WindowStats

from api.auth import bearer_key
from api.errors import problem_response
from models.accounts import refusal
from models.settings import Settings
from models.tables import utcnow

log = logging.getLogger(__name__)

EXTENSION = "torchyard.rate_limits"
BUDGETS = ("submit", "upload", "read")
# The requests of the budgets other than read, by method and endpoint.
WRITES = {("POST", "jobs.submit"): "submit", ("POST", "sweeps.submit"): "submit", ("POST", "datasets.upload"): "upload"}
EXEMPT = frozenset({"health.health"})
# A Redis that doesn't answer within this is down for the limiter, which falls back rather than hang (as long
# as /health waits for the broker).
STORAGE_TIMEOUT_SECONDS = 2.0
STRATEGY = "torchyard-fixed-window"  # OneTripFixedWindow's name among limits' strategies
# limits' incr_expire.lua, returning the key's time to live beside the count.
INCR_EXPIRE_TTL = """
local amount = tonumber(ARGV[2])
local current = redis.call("incrby", KEYS[1], amount)
if tonumber(current) == amount then
    redis.call("expire", KEYS[1], ARGV[1])
end
return {current, redis.call("ttl", KEYS[1])}
"""


class OneTripFixedWindow(FixedWindowRateLimiter):
    """limits' fixed window, whose hit on Redis also reads the window's time to live in the same script and keeps
    the count and the reset for the request's RateLimit fields: one round trip to Redis a request instead of
    three (the hit, then GET and TTL for the fields). Other storages (the in-memory fallback) count as limits does."""

    def __init__(self, storage):
        super().__init__(storage)
        self.script = storage.get_connection().register_script(INCR_EXPIRE_TTL) \
            if isinstance(storage, RedisStorage) else None

    def hit(self, item: RateLimitItem, *identifiers: str, cost: int = 1) -> bool:
        """Count ``cost`` against the limit; True while within it."""
        if self.script is None or not has_app_context():
            return super().hit(item, *identifiers, cost=cost)
        key = item.key_for(*identifiers)
        # An error is Flask-Limiter's to handle (it falls back to memory), as limits' own would be.
        count, ttl = self.script([self.storage.prefixed_key(key)], [item.get_expiry(), cost])
        g.setdefault("rate_limit_windows", {})[key] = WindowStats(time.time() + max(ttl, 0),
                                                                  max(0, item.amount - int(count)))
        return int(count) <= item.amount

    def get_window_stats(self, item: RateLimitItem, *identifiers: str) -> WindowStats:
        """The reset time and what remains of the limit: as this request's hit left them, else asked of the storage."""
        known = g.get("rate_limit_windows", {}).get(item.key_for(*identifiers)) if has_app_context() else None
        return known or super().get_window_stats(item, *identifiers)


def init_rate_limits(app: Flask, settings: Settings) -> Limiter:
    """Count every request but /health against its budget; answer 429 past it; write the RateLimit fields."""
    # Before the limiter's own hook (registered by init_app below): a failed key lookup (the database is
    # down) then fails the request as require_user would, rather than inside the limiter, which would take
    # it for a failed Redis.
    app.before_request(_identify_caller)
    STRATEGIES.setdefault(STRATEGY, OneTripFixedWindow)
    url = storage_url(settings)
    limiter = Limiter(
        key_func=caller,
        default_limits=[Limit(lambda: _rate(settings), scope=lambda _endpoint: budget(), shared=True)],
        storage_uri=url,
        storage_options=_storage_options(url),
        # One counter per key and window: on Redis one script a request counts and reads what the fields say
        # (OneTripFixedWindow); an exact reset.
        strategy=STRATEGY,
        in_memory_fallback_enabled=True,
        key_prefix="torchyard",
        headers_enabled=False,  # its X-RateLimit-Reset is a timestamp; the draft's fields are written here
    )
    limiter.request_filter(_exempt)
    limiter.init_app(app)
    app.after_request(_rate_limit_fields)
    app.register_error_handler(RateLimitExceeded, _rate_limited)
    app.extensions[EXTENSION] = limiter
    return limiter


def storage_url(settings: Settings) -> str:
    """Where the counts live: ``rate_limit_storage_url``, else the broker when it is Redis (every API process
    reaches it), else this process's memory (``serve`` runs one API process)."""
    if settings.rate_limit_storage_url:
        return settings.rate_limit_storage_url
    if settings.broker_url.startswith(("redis://", "rediss://")):
        return settings.broker_url
    return "memory://"


def budget() -> str:
    """The budget this request counts against: ``submit``, ``upload`` or ``read`` (any request without a
    valid key)."""
    if caller_key_id() is None:
        return "read"
    return WRITES.get((request.method, request.endpoint or ""), "read")


def caller() -> str:
    """Whose budget: ``key:<id>`` of a valid API key, else ``ip:<address>``."""
    key_id = caller_key_id()
    return f"key:{key_id}" if key_id else f"ip:{request.remote_addr}"


def caller_key_id() -> str | None:
    """The id of the API key this request authenticates with (models.accounts's rules), or None; decided once a
    request (the limiter asks four times)."""
    if "caller_key_id" not in g:
        key = bearer_key()
        g.caller_key_id = key.id if key is not None and refusal(key, utcnow()) is None else None
    return g.caller_key_id


def rate_limited(endpoint: str) -> bool:
    """Whether requests to ``endpoint`` count against a budget (and may be answered 429)."""
    return endpoint not in EXEMPT


def _exempt() -> bool:
    return request.endpoint is None or not rate_limited(request.endpoint)


def _identify_caller() -> None:
    if not _exempt():
        caller_key_id()


def _rate(settings: Settings) -> str:
    return getattr(settings, f"rate_limit_{budget()}")


def _storage_options(url: str) -> dict:
    if url.startswith("memory://"):
        return {}
    # wrap_exceptions: a Redis failure is limits' StorageError, which the headers below can tell apart.
    return {"socket_connect_timeout": STORAGE_TIMEOUT_SECONDS, "socket_timeout": STORAGE_TIMEOUT_SECONDS,
            "wrap_exceptions": True}


def _limiter() -> Limiter:
    return current_app.extensions[EXTENSION]


def _rate_limit_fields(response: Response) -> Response:
    """after_request: the draft's fields on every counted answer (a refusal's too)."""
    counted = _limiter().current_limits
    if not counted:
        return response
    try:
        response.headers.update(rate_limit_fields(counted))
    except StorageError as error:  # Redis failed since the count; the next request falls back to memory
        log.warning("rate-limit fields left out: the storage failed (%s)", error)
    return response


def rate_limit_fields(counted: list[RequestLimit]) -> dict[str, str]:
    """``RateLimit-*`` of the limit nearest to exhaustion (a budget may have several: "10/second;1000/hour")."""
    nearest = next((limit for limit in counted if limit.breached), None) or min(counted, key=_remaining)
    return {
        "RateLimit-Limit": str(nearest.limit.amount),
        "RateLimit-Remaining": str(_remaining(nearest)),
        "RateLimit-Reset": str(_seconds_to_reset(nearest)),
        "RateLimit-Policy": ", ".join(f"{limit.limit.amount};w={limit.limit.get_expiry()}" for limit in counted),
    }


def _remaining(limit: RequestLimit) -> int:
    return max(limit.remaining, 0)


def _seconds_to_reset(limit: RequestLimit) -> int:
    # Whole seconds, rounded up and at least 1: a client that waits this long finds the window renewed.
    return max(1, math.ceil(limit.window.reset_time - time.time()))


def _rate_limited(_error: RateLimitExceeded) -> Response:
    name = budget()
    breached = _limiter().current_limit  # on a breach, the limit breached
    seconds = _seconds_to_reset(breached)
    whose = "this API key" if caller_key_id() else "requests without a valid API key from this address"
    detail = f"{whose} used its {name} budget, {breached.limit} (rate_limit_{name}); retry after {seconds} s"
    return problem_response(429, "Rate limit exceeded", detail, "rate-limited",
                            headers={"Retry-After": str(seconds)},
                            extensions={"budget": name, "limit": breached.limit.amount,
                                        "window": breached.limit.get_expiry()})
