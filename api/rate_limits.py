"""Rate limits per API key: the one owner of who counts against which budget.

Three budgets, each a setting in the notation of the ``limits`` library: submissions (``rate_limit_submit``: POST
/jobs and /sweeps), uploads (``rate_limit_upload``: POST /datasets) and every other request (``rate_limit_read``:
reads, mostly). They are counted per API key, not per address (many users share a NAT); a request without a
valid key counts against its address's read budget. ``/health`` and static files count against none: a probe is
never refused.

Every counted answer carries the fields of draft-ietf-httpapi-ratelimit-headers: ``RateLimit-Limit``,
``RateLimit-Remaining``, ``RateLimit-Reset`` (seconds, not a date: no clock to agree on) and
``RateLimit-Policy``. One past its budget is a 429 problem naming the budget, with ``Retry-After``.

The counts are fixed windows that live where every API process sees them (``storage_url``: the broker's Redis in
production), one counter per key, budget and limit. A process takes units from a counter in leases (``Leases``):
one unit at a time under 100 a window, else a hundredth of the limit (at most 100), which it spends on its next
requests without asking Redis again. No window ever admits more than its limit across all processes; a process
may refuse while others still hold units they leased, at most a hundredth of the limit each. Once a window is
spent, a process refuses until it ends without asking Redis (a count only grows). A Redis that fails makes each
process count in its own memory (``Counters``) until Redis answers again, which it asks after a pause that
doubles (1 s, 2 s, … 60 s): the API stays up and limited, though each process then allows a whole budget.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass

import redis
from flask import Flask, Response, current_app, g, request
from limits import RateLimitItem, parse_many

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
EXEMPT = frozenset({"health.health", "dashboard.static"})
KEY_PREFIX = "LIMITS:"  # the counters' names in Redis, as Flask-Limiter named them before (LIMITS:LIMITER/…)
# A Redis that doesn't answer within this is down for the limiter, which falls back rather than hang (as long
# as /health waits for the broker).
STORAGE_TIMEOUT_SECONDS = 2.0
# After a failure the counts stay in memory this long before Redis is asked again; it doubles while Redis fails.
RETRY_FIRST_SECONDS, RETRY_MOST_SECONDS = 1.0, 60.0
LEASE_SHARE = 100  # a lease is this share of a limit (a hundredth), so idle processes strand at most 1% each
LEASE_MOST = 100  # units; a process asks Redis at least once every this many requests of a caller
# A thread waits this long at most for another's lease of the same counter (which Redis's timeouts bound) before
# asking for one itself.
ASKING_WAIT_SECONDS = 2 * STORAGE_TIMEOUT_SECONDS + 1
WINDOWS_BEFORE_SWEEP = 10_000  # ended windows are dropped once a process knows this many (addresses come and go)
# Count ``units``; set the window when the count is new (or, after a crash of another client, has none); return
# the count and the window's milliseconds left.
INCR_EXPIRE_PTTL = """
local current = redis.call("incrby", KEYS[1], ARGV[2])
local left = redis.call("pttl", KEYS[1])
if left < 0 then
    redis.call("expire", KEYS[1], ARGV[1])
    left = tonumber(ARGV[1]) * 1000
end
return {current, left}
"""


@dataclass(frozen=True)
class Grant:
    """The answer of a counter: ``units`` of it were counted, the window's count is now ``count``, and the
    window ends at ``reset_at`` (time.time()); ``source`` is where it counts (memory or Redis)."""

    units: int
    count: int
    reset_at: float
    source: str


class Windows(dict):
    """Windows by key (anything with a ``reset_at``), whose ended ones are dropped once there are many (each
    caller's address may open one); at most as often as their number doubles, so that a sweep's cost is spread
    over the windows opened before it."""

    def __init__(self):
        super().__init__()
        self.sweep_at = WINDOWS_BEFORE_SWEEP

    def open(self, key: str, window, now: float):
        """Keep ``window`` as ``key``'s, after dropping the ended windows if it is time to."""
        if len(self) >= self.sweep_at:
            for ended in [key for key, each in self.items() if each.reset_at <= now]:
                del self[ended]
            self.sweep_at = max(WINDOWS_BEFORE_SWEEP, 2 * len(self))
        self[key] = window
        return window


@dataclass
class MemoryWindow:
    """A window's count in this process's memory."""

    count: int
    reset_at: float


class MemoryCounters:
    """Fixed windows in this process's memory: ``serve``'s single API process, and the fallback while Redis fails."""

    def __init__(self, clock=time.time):
        self.clock = clock
        self.windows = Windows()
        self.lock = threading.Lock()

    def add(self, key: str, units: int, expiry: int) -> Grant:
        """Count ``units`` in the window of ``key`` (a new one of ``expiry`` seconds if none is open)."""
        now = self.clock()
        with self.lock:
            window = self.windows.get(key)
            if window is None or window.reset_at <= now:
                window = self.windows.open(key, MemoryWindow(0, now + expiry), now)
            window.count += units
            return Grant(units, window.count, window.reset_at, "memory")


class RedisCounters:
    """Fixed windows in Redis, which every API process shares: one script a lease counts and reads the window."""

    def __init__(self, url: str):
        self.client = redis.Redis.from_url(url, socket_connect_timeout=STORAGE_TIMEOUT_SECONDS,
                                           socket_timeout=STORAGE_TIMEOUT_SECONDS)
        self.script = self.client.register_script(INCR_EXPIRE_PTTL)

    def ping(self) -> None:
        """Ask Redis whether it answers; raises redis.RedisError when not."""
        self.client.ping()

    def add(self, key: str, units: int, expiry: int) -> Grant:
        """Count ``units`` in the window of ``key``; raises redis.RedisError when Redis fails."""
        count, milliseconds = self.script([KEY_PREFIX + key], [expiry, units])
        return Grant(units, int(count), time.time() + int(milliseconds) / 1000, "redis")


class Counters:
    """Redis's counters, or this process's memory while Redis fails (then asked again after a pause that doubles)."""

    def __init__(self, url: str):
        self.memory = MemoryCounters()
        self.redis = None if url.startswith("memory://") else RedisCounters(url)
        self.failures = 0  # pauses in a row, however many requests failed at once
        self.retry_at = 0.0
        self.error = ""  # the last failure, while there are failures
        self.lock = threading.Lock()

    def lease(self, key: str, amount: int, expiry: int) -> Grant:
        """Count a lease of units against a limit of ``amount`` a window: a hundredth of it on Redis (at most
        LEASE_MOST), one unit in memory, where counting costs nothing."""
        if self.redis is not None and time.monotonic() >= self.retry_at:
            try:
                grant = self.redis.add(key, min(max(1, amount // LEASE_SHARE), LEASE_MOST), expiry)
            except redis.RedisError as error:
                self._failed(error)
            else:
                if self.failures:
                    self._answered()
                return grant
        return self.memory.add(key, 1, expiry)

    def _failed(self, error: redis.RedisError) -> None:
        with self.lock:
            if time.monotonic() < self.retry_at:  # another request's failure already paused: the same outage
                return
            pause = min(RETRY_FIRST_SECONDS * 2 ** self.failures, RETRY_MOST_SECONDS)
            self.failures += 1
            self.retry_at = time.monotonic() + pause
            self.error = f"{type(error).__name__}: {error}"
        log.warning("rate limits count in this process's memory for %.0f s: Redis failed (%s)", pause, error)

    def _answered(self) -> None:
        with self.lock:
            if not self.failures:
                return
            self.failures, self.error = 0, ""
        log.warning("rate limits count in Redis again")

    def state(self) -> str:
        """For /health: ``ok`` while the counts live in Redis, ``skipped (…)`` where they live in memory by design,
        else ``degraded: …`` (each API process then allows a whole budget)."""
        if self.redis is None:
            return "skipped (counted in this process's memory: one API process)"
        try:
            self.redis.ping()
        except redis.RedisError as error:
            return f"degraded: rate limits count in each API process's memory; Redis doesn't answer ({error})"
        if self.failures:
            return f"degraded: rate limits count in this API process's memory since Redis failed ({self.error})"
        return "ok"


@dataclass
class Lease:
    """What this process knows of one counter's window: the count it last saw, the units it holds."""

    amount: int
    reset_at: float
    source: str
    count: int = 0
    held: int = 0

    def take(self) -> bool:
        """Spend a held unit, if any."""
        if self.held:
            self.held -= 1
            return True
        return False

    @property
    def remaining(self) -> int:
        """Units of the window not yet spent, as far as this process knows: those nobody leased, and its own."""
        return max(0, self.amount - self.count) + self.held

    @property
    def spent(self) -> bool:
        """Whether no unit of the window is left to lease (nor will be: a count only grows)."""
        return self.count >= self.amount


@dataclass(frozen=True)
class Counted:
    """One limit's part in a request's answer: the limit, whether it admitted the request, and its window."""

    limit: RateLimitItem
    admitted: bool
    remaining: int
    reset_at: float


class Leases:
    """This process's units of every counter, spent one a request; a lease is asked of ``Counters`` when none is
    held."""

    def __init__(self, counters: Counters):
        self.counters = counters
        self.leases = Windows()
        self.asking: dict[str, threading.Event] = {}  # the counters whose lease a thread is asking for
        self.lock = threading.Lock()  # gunicorn's threads share them

    def take(self, limit: RateLimitItem, *identifiers: str) -> Counted:
        """Count one request against ``limit`` of the counter named by ``identifiers``."""
        key = limit.key_for(*identifiers)
        while True:
            now = time.time()
            with self.lock:
                lease = self.leases.get(key)
                if lease is not None and lease.reset_at > now:
                    if lease.take():
                        return _counted(limit, lease, admitted=True)
                    if lease.spent:  # refused until the window ends, without a round trip
                        return _counted(limit, lease, admitted=False)
                # One lease of a counter asked at a time: the threads that find none held wait for it, rather than
                # each leasing units that this process would hold unspent when the window ends.
                asked = self.asking.get(key)
                if asked is None:
                    self.asking[key] = asked = threading.Event()
                    break
            asked.wait(ASKING_WAIT_SECONDS)
        try:
            grant = self.counters.lease(key, limit.amount, limit.get_expiry())  # outside the lock: a round trip
            with self.lock:
                lease = self._granted(key, limit, grant, now)
                return _counted(limit, lease, admitted=lease.take())
        finally:
            with self.lock:
                del self.asking[key]
            asked.set()

    def _granted(self, key: str, limit: RateLimitItem, grant: Grant, now: float) -> Lease:
        lease = self.leases.get(key)
        # Another window (this one ended, or Redis began a new one), or another counter's (Redis failed, or
        # answers again): what was held of the old one is dropped.
        if (lease is None or lease.reset_at <= now or lease.source != grant.source
                or grant.reset_at > lease.reset_at + limit.get_expiry() / 2):
            lease = self.leases.open(key, Lease(limit.amount, grant.reset_at, grant.source), now)
        lease.count = max(lease.count, grant.count)
        lease.held += max(0, min(grant.units, limit.amount - (grant.count - grant.units)))
        return lease


def _counted(limit: RateLimitItem, lease: Lease, admitted: bool) -> Counted:
    return Counted(limit, admitted, lease.remaining if admitted else 0, lease.reset_at)


@dataclass(frozen=True)
class RateLimits:
    """An app's budgets (parsed settings, shortest window first) and this process's leases."""

    budgets: dict[str, list[RateLimitItem]]
    leases: Leases


def init_rate_limits(app: Flask, settings: Settings) -> RateLimits:
    """Count every request but /health's and static files' against its budget; answer 429 past it; write the
    RateLimit fields."""
    budgets = {name: sorted(parse_many(getattr(settings, f"rate_limit_{name}")), key=RateLimitItem.get_expiry)
               for name in BUDGETS}
    app.extensions[EXTENSION] = limits = RateLimits(budgets, Leases(Counters(storage_url(settings))))
    app.before_request(_count_request)
    app.after_request(_rate_limit_fields)
    return limits


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
    request."""
    if "caller_key_id" not in g:
        key = bearer_key()
        g.caller_key_id = key.id if key is not None and refusal(key, utcnow()) is None else None
    return g.caller_key_id


def storage_state() -> str:
    """Where this process counts, for /health (``Counters.state``)."""
    return current_app.extensions[EXTENSION].leases.counters.state()


def rate_limited(endpoint: str) -> bool:
    """Whether requests to ``endpoint`` count against a budget (and may be answered 429)."""
    return endpoint not in EXEMPT


def _count_request() -> Response | None:
    """before_request: take a unit of each limit of the request's budget, shortest window first; 429 at the
    first that has none (the units taken before it stay spent)."""
    if request.endpoint is None or not rate_limited(request.endpoint):
        return None
    limits: RateLimits = current_app.extensions[EXTENSION]
    name, whose = budget(), caller()
    g.rate_limit_policy = limits.budgets[name]
    g.rate_limit_counted = counted = []
    for limit in limits.budgets[name]:
        counted.append(limits.leases.take(limit, "torchyard", whose, name))
        if not counted[-1].admitted:
            return _rate_limited(name, counted[-1])
    return None


def _rate_limit_fields(response: Response) -> Response:
    """after_request: the draft's fields on every counted answer (a refusal's too)."""
    counted = g.get("rate_limit_counted")
    if counted:
        response.headers.update(rate_limit_fields(counted, g.rate_limit_policy))
    return response


def rate_limit_fields(counted: list[Counted], policy: list[RateLimitItem]) -> dict[str, str]:
    """``RateLimit-*`` of the limit nearest to exhaustion among those ``counted`` (a budget may have several:
    "10/second;1000/hour"), and the budget's ``policy``."""
    nearest = next((each for each in counted if not each.admitted), None) or min(counted, key=lambda c: c.remaining)
    return {
        "RateLimit-Limit": str(nearest.limit.amount),
        "RateLimit-Remaining": str(nearest.remaining),
        "RateLimit-Reset": str(_seconds_to_reset(nearest)),
        "RateLimit-Policy": ", ".join(f"{limit.amount};w={limit.get_expiry()}" for limit in policy),
    }


def _seconds_to_reset(counted: Counted) -> int:
    # Whole seconds, rounded up and at least 1: a client that waits this long finds the window renewed.
    return max(1, math.ceil(counted.reset_at - time.time()))


def _rate_limited(name: str, breached: Counted) -> Response:
    seconds = _seconds_to_reset(breached)
    whose = "this API key" if caller_key_id() else "requests without a valid API key from this address"
    detail = f"{whose} used its {name} budget, {breached.limit} (rate_limit_{name}); retry after {seconds} s"
    return problem_response(429, "Rate limit exceeded", detail, "rate-limited",
                            headers={"Retry-After": str(seconds)},
                            extensions={"budget": name, "limit": breached.limit.amount,
                                        "window": breached.limit.get_expiry()})
