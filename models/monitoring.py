"""What an operator watches, read from the database: jobs by queue and state, how long recent jobs waited and
ran, how many epochs ended lately, and what the live workers offer per queue.

The database is the truth whichever process changed it (an API process, a worker on another machine), so these
figures are read when they are asked for (each scrape of ``/metrics``), in a fixed number of aggregate queries,
rather than counted where things happen. Waits, run times and epochs cover a recent window
(``metrics_window_seconds``): a finished job may be deleted, so a count over every job could go down, which a
Prometheus counter must never do; over a window it is a gauge, and a deleted job only leaves it early.

Counts only: no user, job or dataset name leaves this module.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from dataclasses import dataclass, field

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from models.dispatch import queue_states
from models.liveness import live_workers
from models.services import Services
from models.tables import EpochMetrics, Job, utcnow


@dataclass
class Capacity:
    """One queue's live workers, their slots, and the slots that run nothing."""

    workers: int = 0
    slots: int = 0
    free: int = 0


@dataclass
class Snapshot:
    """The figures of one scrape (see the module's docstring)."""

    window_seconds: int
    jobs: dict[tuple[str, str], int] = field(default_factory=dict)  # (queue, state) -> jobs, where there are some
    # Seconds from submit to start of the jobs that started within the window, by queue.
    waits: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    # Seconds from start to end of the jobs that ended within the window, by (queue, state).
    runs: dict[tuple[str, str], list[float]] = field(default_factory=lambda: defaultdict(list))
    epochs: dict[str, int] = field(default_factory=dict)  # queue -> epochs that ended within the window
    capacity: dict[str, Capacity] = field(default_factory=dict)

    @property
    def queues(self) -> list[str]:
        """Every queue that holds jobs or that a live worker serves."""
        return sorted({queue for queue, _ in self.jobs} | set(self.capacity))


def snapshot(session: Session, services: Services) -> Snapshot:
    """The figures now, in six aggregate queries whatever the number of jobs and workers."""
    window = services.settings.metrics_window_seconds
    since = utcnow() - dt.timedelta(seconds=window)
    found = Snapshot(window_seconds=window, jobs=jobs_by_state(session))
    _add_durations(found, session, since)
    found.epochs = epochs_since(session, since)
    found.capacity = capacity(session, services, {queue for queue, _ in found.jobs})
    return found


def jobs_by_state(session: Session) -> dict[tuple[str, str], int]:
    """Jobs by (queue, state), for the pairs that have any."""
    rows = session.execute(select(Job.queue, Job.status, func.count()).group_by(Job.queue, Job.status))
    return {(queue, status): count for queue, status, count in rows}


def _add_durations(found: Snapshot, session: Session, since: dt.datetime) -> None:
    """The waits of jobs that started since ``since`` and the run times of jobs that ended since then.

    ``started_at`` is the last attempt's start, so a resumed job's wait runs to its last start and its run
    time is its last attempt's."""
    started_lately = (Job.started_at >= since).label("started_lately")
    ended_lately = (Job.finished_at >= since).label("ended_lately")
    rows = session.execute(
        select(Job.queue, Job.status, Job.created_at, Job.started_at, Job.finished_at, started_lately, ended_lately)
        .where(Job.started_at.is_not(None), or_(Job.started_at >= since, Job.finished_at >= since)))
    for row in rows:
        # Each difference is of two columns of one row, which the database returns alike (naive on SQLite).
        if row.started_lately:
            found.waits[row.queue].append(_seconds(row.started_at - row.created_at))
        if row.ended_lately and row.finished_at is not None:
            found.runs[row.queue, row.status].append(_seconds(row.finished_at - row.started_at))


def epochs_since(session: Session, since: dt.datetime) -> dict[str, int]:
    """Epochs that ended since ``since``, by queue (an epoch a resumed attempt trained again counts once)."""
    # Only jobs that may have trained since then are joined: a job that ended earlier has no later epoch, and
    # its rows (most of the table, in time) are never read.
    active = or_(Job.status.in_(("queued", "running")), Job.finished_at >= since)
    rows = session.execute(
        select(Job.queue, func.count()).select_from(EpochMetrics).join(Job, Job.id == EpochMetrics.job_id)
        .where(active, EpochMetrics.created_at >= since).group_by(Job.queue))
    return {queue: count for queue, count in rows}


def capacity(session: Session, services: Services, queues: set[str]) -> dict[str, Capacity]:
    """Live workers, slots and free slots of each queue that a live worker serves or that is in ``queues``
    (models.liveness's rule of who is alive; models.dispatch's count of the slots the jobs hold)."""
    workers = live_workers(session, services.settings)
    served: dict[str, int] = defaultdict(int)
    for worker in workers:
        for queue in {queue for queue in worker.queues.split(",") if queue}:
            served[queue] += 1
    wanted = set(served) | queues
    states = queue_states(session, services, wanted)
    found = {}
    for queue in sorted(wanted):
        state = states.get(queue)
        found[queue] = Capacity(workers=served.get(queue, 0), slots=state.slots if state else 0,
                                free=state.free if state else 0)
    return found


def _seconds(delta: dt.timedelta) -> float:
    return max(delta.total_seconds(), 0.0)  # clocks of different machines may disagree by a little
