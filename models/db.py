"""Database engines and sessions: plain SQLAlchemy, shared by the API and the workers."""

from __future__ import annotations

import functools
import select as io_select
from typing import Any

from sqlalchemy import Engine, Insert, Select, Table, create_engine, event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.orm import Session, sessionmaker


def make_engine(url: str, **pool: Any) -> Engine:
    """An engine for ``url`` (``pool``: the pool's options, pool_size and the like); SQLite gets WAL and a busy
    timeout so the API and a worker can share it."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30}, **pool)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record):
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    engine = create_engine(url, **pool)
    event.listen(engine, "checkout", _drop_if_server_left)
    return engine


def _drop_if_server_left(dbapi_connection, _record, _proxy) -> None:
    """Pool checkout: a connection the server has closed (a restart, a terminated backend) is replaced, as
    ``pool_pre_ping`` would, but without its round trip on every checkout (every request and every epoch's
    transaction). An idle connection has nothing to read until the server ends it: its goodbye (an error
    message, then the socket's end) makes the socket readable, which a poll sees without asking the server."""
    if dbapi_connection.closed or io_select.select([dbapi_connection.fileno()], [], [], 0)[0]:
        raise DisconnectionError("the server closed this connection")  # the pool takes another


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    """Sessions that keep loaded values after commit, so rows can be returned from helpers."""
    return sessionmaker(engine, expire_on_commit=False)


def upsert(session: Session, entity: Any, rows: list[dict] | dict, keys: list, updates: tuple[str, ...]) -> None:
    """Insert ``rows`` in one statement; a row whose ``keys`` (a unique constraint's columns) exist already sets
    its ``updates`` columns to the new values instead."""
    names = tuple(key.key for key in keys)
    session.connection().execute(_insert_statement(session.get_bind().dialect.name, entity.__table__, names,
                                                   tuple(updates)), rows)


def insert_new(session: Session, entity: Any, rows: list[dict] | dict) -> None:
    """Insert ``rows`` in one statement, skipping each row that conflicts with one stored already."""
    session.connection().execute(_insert_statement(session.get_bind().dialect.name, entity.__table__, (), ()), rows)


@functools.lru_cache(maxsize=32)
def _insert_statement(dialect: str, table: Table, keys: tuple[str, ...], updates: tuple[str, ...]) -> Insert:
    """The dialect's ``INSERT … ON CONFLICT`` (PostgreSQL and SQLite both have it; the generic insert hasn't),
    built once, its rows passed as parameters: building it and its cache key cost more than running it, and a
    running job writes one each epoch. Executed on the session's connection, not through the ORM's bulk insert."""
    insert = dialect_insert(dialect, table)
    if not updates:
        return insert.on_conflict_do_nothing()
    return insert.on_conflict_do_update(index_elements=list(keys),
                                        set_={column: insert.excluded[column] for column in updates})


def dialect_insert(dialect: str, table: Table) -> Insert:
    """The dialect's INSERT, which has ``ON CONFLICT`` (PostgreSQL's and SQLite's; the generic insert hasn't)."""
    return (postgresql if dialect == "postgresql" else sqlite).insert(table)


def locked_row(session: Session, statement: Select) -> Any:
    """The row ``statement`` selects (or None), locked until the session's transaction ends, so that two
    transactions that each check it and then write can't interleave.

    PostgreSQL takes a row lock (``SELECT … FOR UPDATE``); a waiter reads the row as the holder left it, or
    not at all if the holder deleted it. SQLite ignores FOR UPDATE, and pysqlite begins a transaction only
    at the first write, so a read that comes first is no part of it: here the transaction begins with
    ``BEGIN IMMEDIATE``, which takes the database's write lock before the read.
    """
    if session.get_bind().dialect.name == "sqlite":
        _begin_immediate(session)
    return session.scalar(statement.with_for_update().execution_options(populate_existing=True))


def _begin_immediate(session: Session) -> None:
    connection = session.connection()
    # pysqlite is in a transaction only once this one wrote something, so it holds the write lock already.
    if not connection.connection.dbapi_connection.in_transaction:
        connection.exec_driver_sql("BEGIN IMMEDIATE")
