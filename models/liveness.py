"""Which workers are alive, which queues they serve, and what waits or stalls for want of one.

The one rule of worker liveness (a heartbeat within the last three), shared by the maintenance loop (worker
package) and ``/health`` (API), which may not import each other. Reads only; nothing here writes a row.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from sqlalchemy import ColumnElement, func, select
from sqlalchemy.orm import Session

from models import lifecycle
from models.queues import CPU, who_serves
from models.settings import Settings
from models.tables import Job, Worker, utcnow

NO_WORKER = "no live worker serves queue"
MISSED_HEARTBEATS = 3  # a worker that misses this many heartbeats in a row is gone


def live_after(settings: Settings) -> dt.datetime:
    """Workers whose last heartbeat is older than this are gone (three missed heartbeats).

    A maintenance loop runs every heartbeat too, so a lease that expired before this has outlived any
    live reaper's next round: nobody is reaping.
    """
    return utcnow() - dt.timedelta(seconds=MISSED_HEARTBEATS * settings.heartbeat_seconds)


def live_workers(session: Session, settings: Settings) -> list:
    """(id, queues, slots) of each live worker."""
    return session.execute(select(Worker.id, Worker.queues, Worker.slots).where(is_live(live_after(settings)))).all()


def is_live(after) -> ColumnElement[bool]:
    """The condition on a worker's row that it is alive: its last heartbeat at or after ``after``, the time
    ``live_after`` gives (or a bound parameter that will hold it, in a statement built once)."""
    return Worker.last_heartbeat_at >= after


def served_queues(session: Session, settings: Settings) -> set[str]:
    """The queues some live worker serves."""
    return {queue for worker in live_workers(session, settings) for queue in worker.queues.split(",")}


def no_worker_reason(queue: str) -> str:
    """Why a job waits when no live worker serves its queue: ``… queue 'gpu.4' (jobs needing 4 GPUs)``."""
    try:
        what = who_serves(queue)
    except ValueError:  # a queue this version doesn't know (a newer API): no more to say
        return f"{NO_WORKER} {queue!r}"
    return f"{NO_WORKER} {queue!r}" + (f" ({what})" if queue != CPU else "")


@dataclass(frozen=True)
class Stalls:
    """Work that can't move: queued jobs by queue that no live worker serves, and running jobs whose lease
    expired so long ago that no maintenance loop can be running (nobody reaps them)."""

    unserved: dict[str, int]
    unreaped: int

    def __bool__(self) -> bool:
        return bool(self.unserved or self.unreaped)


def stalls(session: Session, settings: Settings) -> Stalls:
    """What stalls right now (see ``Stalls``); two small indexed queries and the workers table."""
    served = served_queues(session, settings)
    # A paused job waits for its sweep, not for a worker: no worker would move it.
    queued = session.execute(select(Job.queue, func.count()).where(lifecycle.waiting())
                             .group_by(Job.queue)).all()
    unreaped = session.scalar(select(func.count()).select_from(Job).where(
        Job.status == "running", Job.lease_expires_at < live_after(settings)))
    return Stalls(unserved={queue: count for queue, count in sorted(queued) if queue not in served},
                  unreaped=unreaped or 0)
