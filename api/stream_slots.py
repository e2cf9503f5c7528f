"""Who may open a live metrics stream. An open stream holds a server thread, so streams are bounded: per
API process (``max_streams_per_process``, below its thread count, so other requests always find a thread)
and per user across every API process (the ``streams`` quota of models.quotas, counted in the database, the
one truth the processes share). Over either: 429 problem+json with Retry-After.

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
from sqlalchemy import delete, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from api.errors import QUOTA_RETRY_AFTER, ApiError
from models import quotas
from models.settings import Settings
from models.tables import StreamSlot, utcnow

log = logging.getLogger(__name__)

EXTENSION = "torchyard.streams"
# How long a slot counts without being renewed; its stream renews it three times a lease.
LEASE_SECONDS = 60.0
# When to ask again after a 429: as after the user's own streams quota (a stream frees a slot soon).
RETRY_AFTER_SECONDS = QUOTA_RETRY_AFTER["streams"]
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

    def admit(self, session: Session, sessions: sessionmaker[Session], settings: Settings, user_id: str,
              lease: float) -> OpenStream:
        """A slot for a new stream of ``user_id`` (claimed in ``session``, committed; the stream renews and
        releases it with ``sessions``), or the 429 of the limit it would pass (QuotaExceeded: the user's)."""
        per_process = settings.max_streams_per_process
        with self._lock:
            if self.open >= per_process:
                raise too_many_streams(
                    f"this API process serves {per_process} metrics streams, its most "
                    f"(TORCHYARD_MAX_STREAMS_PER_PROCESS), so that other requests find a thread; retry after "
                    f"{RETRY_AFTER_SECONDS} s, {POLL_INSTEAD}")
            slot_id = claim_slot(session, settings, user_id, lease)
            self.open += 1
        return OpenStream(self, sessions, slot_id, lease)

    def leave(self) -> None:
        """One stream of this process has closed."""
        with self._lock:
            self.open -= 1


def stream_gate(app: Flask) -> StreamGate:
    """The app's gate (one per app, so one per API process)."""
    return app.extensions.setdefault(EXTENSION, StreamGate())


def claim_slot(session: Session, settings: Settings, user_id: str, lease: float) -> str:
    """Insert a slot for the user and return its id; QuotaExceeded when they hold their quota of live ones."""
    # Counted under a lock on the user's row: this user's admissions in every process take turns.
    quotas.require_locked(session, settings, user_id, "streams")
    now = utcnow()
    session.execute(delete(StreamSlot).where(StreamSlot.user_id == user_id, StreamSlot.expires_at <= now))
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
