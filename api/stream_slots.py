"""Who may open a live metrics stream. An open stream holds a server thread, so streams are bounded: per
API process (``max_streams_per_process``, below its thread count, so other requests always find a thread)
and per user across every API process (``max_streams_per_user``, counted in the database, the one truth
the processes share). Over either: 429 problem+json with Retry-After.

A user's slot is a ``stream_slots`` row that its process renews while it serves the stream and deletes when
the stream closes (ended, or the client hung up); a slot not renewed for a lease (its process died) lapses.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import threading
import time

from flask import Flask
from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from api.errors import ApiError
from models.tables import StreamSlot, User, utcnow

log = logging.getLogger(__name__)

EXTENSION = "torchyard.streams"
# How long a slot counts without being renewed; its stream renews it three times a lease.
LEASE_SECONDS = 60.0
# When to ask again after a 429: a stream of a few seconds' polling frees a slot sooner than most.
RETRY_AFTER_SECONDS = 5
POLL_INSTEAD = "or poll GET /jobs/{id}/metrics?since_epoch=N"


def too_many_streams(detail: str) -> ApiError:
    """The one 429 of the stream limits."""
    return ApiError(429, "Too Many Requests", detail, kind="too-many-streams",
                    headers={"Retry-After": str(RETRY_AFTER_SECONDS)})


class StreamGate:
    """This process's open streams and the admission of new ones. Admissions take turns (the lock), and a
    user's take turns across processes (a lock on the user's row), so both counts are exact: a burst of
    requests gets exactly the streams the limits allow, no fewer."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.open = 0

    def admit(self, session: Session, sessions: sessionmaker[Session], user_id: str, per_user: int,
              per_process: int, lease: float) -> OpenStream:
        """A slot for a new stream of ``user_id`` (claimed in ``session``, committed; the stream renews and
        releases it with ``sessions``), or the 429 of the limit it would pass."""
        with self._lock:
            if self.open >= per_process:
                raise too_many_streams(
                    f"this API process serves {per_process} metrics streams, its most "
                    f"(TORCHYARD_MAX_STREAMS_PER_PROCESS), so that other requests find a thread; retry after "
                    f"{RETRY_AFTER_SECONDS} s, {POLL_INSTEAD}")
            slot_id = claim_slot(session, user_id, per_user, lease)
            if slot_id is None:
                raise too_many_streams(
                    f"you have {per_user} open metrics streams, the most one user may have "
                    f"(TORCHYARD_MAX_STREAMS_PER_USER); close one, {POLL_INSTEAD}")
            self.open += 1
        return OpenStream(self, sessions, slot_id, lease)

    def leave(self) -> None:
        """One stream of this process has closed."""
        with self._lock:
            self.open -= 1


def stream_gate(app: Flask) -> StreamGate:
    """The app's gate (one per app, so one per API process)."""
    return app.extensions.setdefault(EXTENSION, StreamGate())


def claim_slot(session: Session, user_id: str, limit: int, lease: float) -> str | None:
    """Insert a slot for the user unless they hold ``limit`` live ones already; its id, or None."""
    now = utcnow()
    # Take turns with this user's other admissions in every process: PostgreSQL locks the user's row (NO KEY
    # UPDATE: inserts of the user's jobs may go on); SQLite serializes every write transaction anyway.
    session.execute(select(User.id).where(User.id == user_id).with_for_update(key_share=True))
    session.execute(delete(StreamSlot).where(StreamSlot.user_id == user_id, StreamSlot.expires_at <= now))
    held = session.scalar(select(func.count()).select_from(StreamSlot).where(StreamSlot.user_id == user_id))
    if held >= limit:
        session.commit()  # the lapsed slots stay deleted
        return None
    slot = StreamSlot(user_id=user_id, process=f"{socket.gethostname()}:{os.getpid()}"[:200],
                      expires_at=now + dt.timedelta(seconds=lease))
    session.add(slot)
    session.commit()
    return slot.id


class OpenStream:
    """An admitted stream: its slot row and its place in its process's count, held until ``release``."""

    def __init__(self, gate: StreamGate, sessions: sessionmaker[Session], slot_id: str, lease: float):
        self.gate, self.sessions, self.slot_id, self.lease = gate, sessions, slot_id, lease
        self.renewed = time.monotonic()
        self.released = False

    def keep(self) -> bool:
        """Renew the slot when a third of its lease has passed; False once it is gone (it lapsed and was
        purged, or the user was deleted): then the stream must end."""
        now = time.monotonic()
        if now - self.renewed < self.lease / 3:
            return True
        with self.sessions() as session:
            renewed = session.execute(
                update(StreamSlot).where(StreamSlot.id == self.slot_id)
                .values(expires_at=utcnow() + dt.timedelta(seconds=self.lease))
            ).rowcount
            session.commit()
        self.renewed = now
        return renewed == 1

    def release(self) -> None:
        """Give the slot back, once (the response's close: the stream ended or its client hung up)."""
        if self.released:
            return
        self.released = True
        self.gate.leave()
        try:
            with self.sessions() as session:
                session.execute(delete(StreamSlot).where(StreamSlot.id == self.slot_id))
                session.commit()
        except SQLAlchemyError as error:  # the database is down: the slot lapses with its lease instead
            log.warning("stream slot %s not released (%s); it lapses within %s s", self.slot_id, error,
                        self.lease)
