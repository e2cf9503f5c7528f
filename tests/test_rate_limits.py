"""Rate limits per API key (api/rate_limits.py): three budgets (submissions, uploads, every other request),
counted per key and not per address, answered past a budget with a 429 problem naming it; the fields of
draft-ietf-httpapi-ratelimit-headers on every counted answer; a Redis that is down leaves the API up and
limited; and under ``torchyard api`` (gunicorn) the budget is one across every process of every API server.

Small budgets ("3/minute") make a window that no test outlives, so no test waits for one to pass.
"""

from __future__ import annotations

import io

import pytest
import requests
from conftest import flushed_redis, settings_env, wait_for
from sqlalchemy import func, select

from api.rate_limits import storage_url
from models.settings import Settings
from models.tables import Job

API = "/api/v1"
FIELDS = ("RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Reset", "RateLimit-Policy")
# This module's own db on the shared Redis server (flushed before and after), apart from the others' 7, 9, 13.
REDIS_RATE_URL = "redis://127.0.0.1:6379/14"


def submit(client, headers: dict, spec: dict):
    return client.post(f"{API}/jobs", json=spec, headers=headers)


def upload(client, headers: dict):
    data = {"file": (io.BytesIO(b"x,y\n1,0\n2,1\n"), "d.csv")}
    return client.post(f"{API}/datasets", data=data, headers=headers, content_type="multipart/form-data")


def fields(response) -> tuple[int, int, int]:
    """RateLimit-Limit, -Remaining and -Reset, as numbers."""
    return tuple(int(response.headers[name]) for name in FIELDS[:3])


def assert_rate_limited(response, budget: str, limit: int) -> dict:
    """A 429 problem naming the budget and its limit, with Retry-After within the window."""
    assert response.status_code == 429, response.json
    problem = response.json
    assert problem["type"] == "/problems/rate-limited"
    assert (problem["budget"], problem["limit"], problem["window"]) == (budget, limit, 60)
    assert f"rate_limit_{budget}" in problem["detail"] and f"{limit} per 1 minute" in problem["detail"]
    assert 1 <= int(response.headers["Retry-After"]) <= 60
    assert fields(response)[:2] == (limit, 0)
    return problem


def test_the_submission_past_its_budget_is_a_429_with_retry_after_and_stores_nothing(
    make_app, alice, spec, published, live_worker
):
    client = make_app(rate_limit_submit="3/minute").test_client()
    answers = [submit(client, alice, spec) for _ in range(3)]
    assert [a.status_code for a in answers] == [201] * 3
    assert [fields(a)[:2] for a in answers] == [(3, 2), (3, 1), (3, 0)]
    assert all(1 <= fields(a)[2] <= 60 for a in answers)
    assert answers[0].headers["RateLimit-Policy"] == "3;w=60"
    before = list(published)
    assert len(before) == 3  # with a live worker, each accepted job is released at once

    refused = submit(client, alice, spec)

    assert_rate_limited(refused, "submit", 3)
    assert int(refused.headers["Retry-After"]) == fields(refused)[2]
    assert published == before
    with client.application.extensions["torchyard"].sessions() as session:
        assert session.scalar(select(func.count()).select_from(Job)) == 3


def test_on_redis_the_fields_count_down_with_each_request_and_the_reset_is_the_windows(make_app, alice):
    # On Redis one script counts a request and reads what its fields say (api.rate_limits.OneTripFixedWindow).
    redis_client = flushed_redis(REDIS_RATE_URL)
    try:
        client = make_app(rate_limit_read="3/minute", rate_limit_storage_url=REDIS_RATE_URL).test_client()
        answers = [client.get(f"{API}/jobs", headers=alice) for _ in range(3)]
        assert [a.status_code for a in answers] == [200] * 3
        assert [fields(a)[:2] for a in answers] == [(3, 2), (3, 1), (3, 0)]
        assert all(1 <= fields(a)[2] <= 60 for a in answers)
        [key] = redis_client.keys("LIMITS:LIMITER/torchyard/key:*/read/3/1/minute")
        assert int(redis_client.get(key)) == 3 and 0 < redis_client.ttl(key) <= 60
        assert_rate_limited(client.get(f"{API}/jobs", headers=alice), "read", 3)
    finally:
        redis_client.flushdb()


def test_reads_and_uploads_have_budgets_of_their_own(make_app, alice, spec):
    client = make_app(rate_limit_submit="1/minute", rate_limit_read="2/minute",
                      rate_limit_upload="1/minute").test_client()
    assert submit(client, alice, spec).status_code == 201
    assert_rate_limited(submit(client, alice, spec), "submit", 1)

    listed = client.get(f"{API}/jobs", headers=alice)  # submissions spent: reads still answer
    assert listed.status_code == 200 and fields(listed)[:2] == (2, 1)
    uploaded = upload(client, alice)
    assert uploaded.status_code == 201 and fields(uploaded)[:2] == (1, 0)
    assert_rate_limited(upload(client, alice), "upload", 1)
    assert client.get(f"{API}/datasets", headers=alice).status_code == 200
    assert_rate_limited(client.get(f"{API}/workers", headers=alice), "read", 2)  # one budget for every read


def test_two_users_keys_from_one_address_do_not_share_a_budget(make_app, alice, bob, spec):
    client = make_app(rate_limit_submit="1/minute").test_client()
    assert submit(client, alice, spec).status_code == 201
    assert_rate_limited(submit(client, alice, spec), "submit", 1)
    assert submit(client, bob, spec).status_code == 201


def test_requests_without_a_valid_key_count_against_their_address_read_budget(make_app, alice, spec):
    client = make_app(rate_limit_read="2/minute", rate_limit_submit="100/minute").test_client()
    bogus = {"Authorization": "Bearer ty_not-a-key"}
    assert client.get(f"{API}/jobs", headers=bogus).status_code == 401
    assert submit(client, {}, spec).status_code == 401  # a submission without a key is a read here
    problem = assert_rate_limited(client.get(f"{API}/jobs", headers=bogus), "read", 2)
    assert "without a valid API key" in problem["detail"]
    assert client.get(f"{API}/jobs", headers=alice).status_code == 200  # her key's budget is her own


def test_a_budget_of_several_limits_counts_each_and_refuses_at_the_first_one_spent(make_app, alice):
    client = make_app(rate_limit_read="100/hour;2/minute").test_client()
    answers = [client.get(f"{API}/jobs", headers=alice) for _ in range(2)]
    assert [a.status_code for a in answers] == [200, 200]
    # The fields follow the limit nearest to exhaustion; the policy names both, shortest window first.
    assert [fields(a)[:2] for a in answers] == [(2, 1), (2, 0)]
    assert answers[0].headers["RateLimit-Policy"] == "2;w=60, 100;w=3600"
    assert_rate_limited(client.get(f"{API}/jobs", headers=alice), "read", 2)


def test_the_dashboards_static_files_count_against_no_budget_and_its_pages_against_the_read_budget(make_app):
    client = make_app(rate_limit_read="1/minute").test_client()
    files = [client.get("/static/app.css") for _ in range(3)]
    assert [a.status_code for a in files] == [200] * 3
    assert not any(name in a.headers for a in files for name in FIELDS)
    page = client.get("/")
    assert page.status_code == 200 and fields(page)[:2] == (1, 0)
    assert_rate_limited(client.get("/"), "read", 1)


def test_health_is_never_rate_limited(make_app):
    client = make_app(rate_limit_read="1/minute").test_client()
    answers = [client.get(f"{API}/health") for _ in range(3)]
    assert [a.status_code for a in answers] == [200] * 3
    assert not any(name in a.headers for a in answers for name in FIELDS)


def test_a_redis_that_is_down_leaves_the_api_up_and_still_limited(make_app, alice, spec):
    # Nothing listens on port 1: each request's count falls back to this process's memory.
    client = make_app(rate_limit_storage_url="redis://127.0.0.1:1/0", rate_limit_submit="2/minute").test_client()
    assert [submit(client, alice, spec).status_code for _ in range(2)] == [201, 201]
    assert_rate_limited(submit(client, alice, spec), "submit", 2)
    assert client.get(f"{API}/jobs", headers=alice).status_code == 200


def test_while_redis_is_away_the_counts_are_in_memory_and_once_it_is_back_in_redis_again(make_app, alice, tmp_path):
    from private_servers import PrivateRedis

    server = PrivateRedis(tmp_path / "redis")
    try:
        # Under 100 a window, each request counts in Redis (no lease).
        client = make_app(rate_limit_storage_url=server.url(), rate_limit_read="99/minute").test_client()

        def read():
            answer = client.get(f"{API}/jobs", headers=alice)
            assert answer.status_code == 200, answer.json
            return fields(answer)[:2]

        def counted_in_redis() -> int:
            keys = server.client().keys("LIMITS:LIMITER/torchyard/key:*/read/99/1/minute")
            return int(server.client().get(keys[0])) if keys else 0

        assert [read(), read()] == [(99, 98), (99, 97)] and counted_in_redis() == 2
        server.stop()
        assert read() == (99, 98)  # the fallback: this process's memory, from zero
        server.start()  # empty: it keeps nothing on disk
        # Redis is asked again after a pause that grows (1 s, 2 s, …); meanwhile requests count in memory.
        wait_for(lambda: read() and counted_in_redis(), timeout=60, what="the counts back in Redis")
        assert read() == (99, 99 - counted_in_redis())
    finally:
        server.stop()


def test_on_redis_a_process_leases_a_hundredth_of_a_large_budget_and_spends_it_without_asking(make_app, alice):
    redis_client = flushed_redis(REDIS_RATE_URL)
    try:
        one, two = (make_app(rate_limit_read="1000/minute", rate_limit_storage_url=REDIS_RATE_URL).test_client()
                    for _ in range(2))  # two API processes, each with its own leases

        def read(client):
            answer = client.get(f"{API}/jobs", headers=alice)
            assert answer.status_code == 200, answer.json
            return fields(answer)[1]

        def counted_in_redis() -> int:
            [key] = redis_client.keys("LIMITS:LIMITER/torchyard/key:*/read/1000/1/minute")
            return int(redis_client.get(key))

        assert [read(one) for _ in range(10)] == list(range(999, 989, -1))
        assert counted_in_redis() == 10  # one lease of 10 units for those ten requests
        assert read(two) == 1000 - 20 + 9  # the other process's lease: the units nobody leased, and its own 9
        assert read(one) == 1000 - 30 + 9 and counted_in_redis() == 30
    finally:
        redis_client.flushdb()


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_leases_of_several_processes_never_admit_more_than_the_budget(make_app, alice, seed):
    import random

    redis_client = flushed_redis(REDIS_RATE_URL)
    try:
        # 300 a window: leases of 3 units; three processes strand at most 2 units each.
        clients = [make_app(rate_limit_read="300/minute", rate_limit_storage_url=REDIS_RATE_URL).test_client()
                   for _ in range(3)]
        pick = random.Random(seed)
        statuses = [pick.choice(clients).get(f"{API}/jobs", headers=alice).status_code for _ in range(400)]
        assert set(statuses) == {200, 429}
        assert 300 - 3 * 2 <= statuses.count(200) <= 300
        [key] = redis_client.keys("LIMITS:LIMITER/torchyard/key:*/read/300/1/minute")
        counted = int(redis_client.get(key))
        # Once each process has seen the window spent, it refuses without asking Redis.
        assert all(client.get(f"{API}/jobs", headers=alice).status_code == 429 for client in clients * 5)
        assert int(redis_client.get(key)) == counted
    finally:
        redis_client.flushdb()


def test_windows_in_memory_that_ended_are_dropped_once_there_are_many_and_no_more_often_than_they_double():
    from api.rate_limits import WINDOWS_BEFORE_SWEEP, MemoryCounters

    now = [1000.0]
    counters = MemoryCounters(clock=lambda: now[0])
    for address in range(WINDOWS_BEFORE_SWEEP):
        counters.add(f"ip:{address}", 1, expiry=60)
    assert counters.add("ip:0", 1, expiry=60).count == 2  # in its window still
    now[0] += 61
    assert counters.add("ip:new", 1, expiry=60).count == 1
    assert list(counters.windows) == ["ip:new"]
    # Windows still open are kept: the next sweep waits until their number doubles (a sweep walks them all).
    for address in range(2 * WINDOWS_BEFORE_SWEEP - 2):
        counters.add(f"ip:more{address}", 1, expiry=60)
    assert len(counters.windows) == 2 * WINDOWS_BEFORE_SWEEP - 1
    assert counters.windows.sweep_at == 2 * WINDOWS_BEFORE_SWEEP
    assert counters.add("ip:new", 1, expiry=60).count == 2


@pytest.mark.parametrize("variable, value", [
    ("TORCHYARD_RATE_LIMIT_SUBMIT", "120 per fortnight"),
    ("TORCHYARD_RATE_LIMIT_SUBMIT", "1 per 0 seconds"),  # limits itself would read a window of 1 second
    ("TORCHYARD_RATE_LIMIT_READ", "10/999999999999 years"),
    ("TORCHYARD_RATE_LIMIT_STORAGE_URL", "redis://127.0.0.1:notaport/0"),
    ("TORCHYARD_RATE_LIMIT_STORAGE_URL", "redis://127.0.0.1:6379/abc"),
    ("TORCHYARD_RATE_LIMIT_READ", "0/minute"),
    ("TORCHYARD_RATE_LIMIT_UPLOAD", ""),
    ("TORCHYARD_RATE_LIMIT_STORAGE_URL", "memcached://127.0.0.1:11211"),
])
def test_a_bad_rate_limit_setting_is_an_error_at_startup_naming_the_variable(variable, value):
    with pytest.raises(ValueError, match=variable):
        Settings.from_env({variable: value})


def test_many_threads_of_one_process_admit_exactly_the_budget(make_app, alice):
    import threading

    redis_client = flushed_redis(REDIS_RATE_URL)
    try:
        # 300 a window: leases of 3. Threads that find no unit wait for the one lease being asked, so none is
        # left unspent (answers to concurrent leases coming back out of order once stranded a third).
        app = make_app(rate_limit_read="300/minute", rate_limit_storage_url=REDIS_RATE_URL)
        statuses: list[int] = []
        start = threading.Barrier(16)

        def hammer():
            client = app.test_client()
            start.wait()
            for _ in range(25):
                statuses.append(client.get(f"{API}/jobs", headers=alice).status_code)

        threads = [threading.Thread(target=hammer) for _ in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert (statuses.count(200), statuses.count(429)) == (300, 100)
    finally:
        redis_client.flushdb()


def test_requests_failing_on_redis_at_once_pause_it_once():
    import threading
    import time

    from api.rate_limits import RETRY_FIRST_SECONDS, Counters

    counters = Counters("redis://127.0.0.1:1/0")  # nothing listens there
    start = threading.Barrier(8)
    grants = []

    def lease():
        start.wait()
        grants.append(counters.lease("ip:1", 1000, 60))

    threads = [threading.Thread(target=lease) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert {grant.source for grant in grants} == {"memory"} and len(grants) == 8
    assert counters.failures == 1  # one pause of RETRY_FIRST_SECONDS, not one doubling per request
    assert counters.error.startswith("ConnectionError")
    assert 0 < counters.retry_at - time.monotonic() <= RETRY_FIRST_SECONDS


def test_health_says_degraded_while_the_rate_limits_redis_does_not_answer(make_app, tmp_path):
    from private_servers import PrivateRedis

    server = PrivateRedis(tmp_path / "redis")
    try:
        client = make_app(rate_limit_storage_url=server.url()).test_client()
        assert client.get(f"{API}/health").json["checks"]["rate_limits"] == "ok"
        server.stop()
        answer = client.get(f"{API}/health")
        assert answer.status_code == 200 and answer.json["status"] == "degraded"
        assert answer.json["checks"]["rate_limits"].startswith(
            "degraded: rate limits count in each API process's memory; Redis doesn't answer")
    finally:
        server.stop()


def test_the_counts_live_in_the_brokers_redis_by_default_else_in_memory():
    assert storage_url(Settings(broker_url="redis://broker:6379/0")) == "redis://broker:6379/0"
    assert storage_url(Settings(broker_url="filesystem://")) == "memory://"
    chosen = Settings(broker_url="redis://broker:6379/0", rate_limit_storage_url="redis://limits:6379/3")
    assert storage_url(chosen) == "redis://limits:6379/3"


def test_every_gunicorn_process_of_two_api_servers_draws_on_one_budget_in_redis(
    postgres_url, http_deployment, spec, tmp_path
):
    from private_servers import ApiServer

    redis_client = flushed_redis(REDIS_RATE_URL)
    service = http_deployment(postgres_url, "filesystem://", workers=0, rate_limit_submit="3/minute",
                              rate_limit_storage_url=REDIS_RATE_URL)
    second = ApiServer(settings_env(service.settings), tmp_path / "api-2.log")
    try:
        headers = service.headers
        # Each request on a connection of its own, to either server: any of their four processes may take it.
        answers = [requests.post(f"{url}{API}/jobs", json=spec, headers=headers, timeout=30)
                   for url in (service.api.url, second.url, second.url, service.api.url)]
        shown = [(a.status_code, a.headers.get("RateLimit-Remaining"), a.text[:200]) for a in answers]
        assert [a.status_code for a in answers] == [201, 201, 201, 429], f"{shown}\n{service.log()}\n{second.log()}"
        assert redis_client.keys("LIMITS:LIMITER/torchyard/key:*/submit/3/1/minute")  # counted there
    finally:
        second.stop()
        redis_client.flushdb()
