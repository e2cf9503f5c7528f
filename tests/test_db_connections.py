"""The engine's pool on PostgreSQL: a connection that the server ended while it sat in the pool is replaced at
checkout, without an error for the request or epoch that takes it next; one the server keeps is reused."""

from __future__ import annotations

import time

import psycopg
from sqlalchemy import text

from models.db import make_engine

ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


def backend_pid(engine) -> int:
    with engine.connect() as connection:
        return connection.execute(text("SELECT pg_backend_pid()")).scalar_one()


def wait_gone(pid: int, timeout: float = 30) -> None:
    with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
        deadline = time.monotonic() + timeout
        while admin.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone():
            assert time.monotonic() < deadline, f"backend {pid} still there after {timeout} s"
            time.sleep(0.05)


def test_a_pooled_connection_is_reused_while_the_server_keeps_it(postgres_url):
    engine = make_engine(postgres_url, pool_size=1, max_overflow=0)
    try:
        assert backend_pid(engine) == backend_pid(engine) == backend_pid(engine)
    finally:
        engine.dispose()


def test_a_connection_the_server_ended_in_the_pool_is_replaced_at_checkout(postgres_url):
    engine = make_engine(postgres_url, pool_size=1, max_overflow=0)
    try:
        first = backend_pid(engine)  # back in the pool, idle
        with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
            assert admin.execute("SELECT pg_terminate_backend(%s)", (first,)).fetchone()[0]
        wait_gone(first)
        # Without the check at checkout this statement would fail: "terminating connection due to administrator
        # command" (what a restart of the server says to every connection, too).
        second = backend_pid(engine)
        assert second != first
        assert backend_pid(engine) == second
    finally:
        engine.dispose()
