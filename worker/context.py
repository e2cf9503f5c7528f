"""What a worker process needs: its Services (settings, database, artifact store, publisher) and its id.

Made lazily once per process id, so a prefork child never uses a connection pool made before the fork
(SQLAlchemy's rule: dispose an inherited engine without closing its connections, which the parent owns).
"""

from __future__ import annotations

import mmap
import os
import socket

from sqlalchemy import Engine, event

from models.services import Services, make_services
from models.settings import get_settings

_contexts: dict[int, Services] = {}
# The Celery main process's id, set before the pool forks; children inherit it, so the jobs a child runs
# name the registered worker (hostname:pid of the main process).
_worker_id: str | None = None


def context() -> Services:
    """This process's services, made on first use."""
    pid = os.getpid()
    if pid not in _contexts:
        services = make_services(get_settings())
        end_stalled_transactions(services.engine, services.settings.lease_seconds)
        _contexts[pid] = services
    return _contexts[pid]


def end_stalled_transactions(engine: Engine, seconds: int) -> None:
    """On PostgreSQL, have the server end this engine's sessions that sit in a transaction for ``seconds``.

    A worker frozen mid-transaction (SIGSTOP, a paused VM) holds its job row's lock: every other worker's
    reaper would wait on it forever and the job would never be requeued. Our transactions are a few
    statements long, so one idle for a whole lease belongs to a worker that has lost its job anyway.
    """
    if engine.dialect.name != "postgresql":
        return

    @event.listens_for(engine, "connect")
    def _set_timeout(dbapi_connection, _record):
        with dbapi_connection.cursor() as cursor:
            cursor.execute(f"SET idle_in_transaction_session_timeout = {int(seconds * 1000)}")
        dbapi_connection.commit()


def _forget_inherited_engines() -> None:
    for ctx in _contexts.values():
        ctx.engine.dispose(close=False)
    _contexts.clear()


os.register_at_fork(after_in_child=_forget_inherited_engines)


def set_worker_id(worker_id: str) -> None:
    """Name this process (and the children it forks later) as the registered worker ``worker_id``."""
    global _worker_id
    _worker_id = worker_id


def worker_id() -> str:
    """The registered worker this process belongs to; hostname:pid outside a Celery worker."""
    return _worker_id or f"{socket.gethostname()}:{os.getpid()}"


# One shared byte, mapped before the pool forks: the main process sets it when the worker starts shutting
# down and the children running jobs read it (LeaseKeeper) to checkpoint and hand their jobs back.
_drain_flag = mmap.mmap(-1, 1)


def start_draining() -> None:
    """Tell this worker's processes that the worker is shutting down."""
    _drain_flag[0] = 1


def draining() -> bool:
    """Whether this worker is shutting down."""
    return _drain_flag[0] == 1
