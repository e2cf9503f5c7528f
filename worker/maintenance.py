"""Keeping the queue honest: the worker registry, the reaper and the reconciler.

Every worker runs these from one daemon thread in its main process (see ``start``). Each change is a
conditional UPDATE, so any number of workers can run them at once: one wins, the others change nothing,
and only the winner publishes the job again. Every change of a job's status goes through ``models.lifecycle``.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import threading
import time

from sqlalchemy import delete, func, select, update

from models import lifecycle
from models.queues import queue_gpus, who_serves
from models.services import Services
from models.tables import Job, Worker, utcnow

log = logging.getLogger(__name__)

NO_WORKER = "no live worker serves queue"
PROCESSED_MESSAGE_MAX_AGE = 3600  # seconds a consumed message file of the filesystem broker is kept


# --- registry -----------------------------------------------------------------------------------


def live_after(ctx: Services) -> dt.datetime:
    """Workers whose last heartbeat is older than this are gone (three missed heartbeats)."""
    return utcnow() - dt.timedelta(seconds=3 * ctx.settings.heartbeat_seconds)


def register_worker(ctx: Services, worker_id: str, queues: list[str], slots: int, devices: dict) -> None:
    """Insert or refresh this worker's row."""
    now = utcnow()
    with ctx.sessions() as session:
        session.merge(Worker(id=worker_id, hostname=socket.gethostname(), queues=",".join(queues),
                             devices=devices, slots=slots, started_at=now,
                             last_heartbeat_at=now))
        session.commit()


def heartbeat_worker(ctx: Services, worker_id: str) -> bool:
    """Record that the worker is alive; False when its row is gone (pruned as dead) and must be re-made."""
    with ctx.sessions() as session:
        rows = session.execute(update(Worker).where(Worker.id == worker_id)
                               .values(last_heartbeat_at=utcnow())).rowcount
        session.commit()
    return rows == 1


def unregister_worker(ctx: Services, worker_id: str) -> None:
    """Delete this worker's row (on a clean shutdown)."""
    with ctx.sessions() as session:
        session.execute(delete(Worker).where(Worker.id == worker_id))
        session.commit()


def local_devices() -> dict:
    """CPU cores and CUDA devices of this machine (device_count() asks NVML, so the pool can still fork)."""
    import torch

    return {"cpu": os.cpu_count() or 1, "cuda": torch.cuda.device_count()}


# --- reaper -------------------------------------------------------------------------------------


def reap(ctx: Services) -> list[str]:
    """Requeue running jobs whose lease expired (or end them: attempts used up, cancel asked); return their ids."""
    now = utcnow()
    with ctx.sessions() as session:
        expired = lifecycle.expired(session, now)
    reaped = []
    for job in expired:
        with ctx.sessions() as session:
            status = lifecycle.reap(session, job, now)
            session.commit()
        if status is None:
            continue
        log.warning("reaper: job %s (attempt %s) lost its worker %s: %s", job.id, job.attempts, job.worker_id,
                    status)
        reaped.append(job.id)
        if status == "queued":
            ctx.publisher.publish(job.id, job.queue)
    return reaped


# --- reconciler ---------------------------------------------------------------------------------


def queue_capacity(ctx: Services) -> tuple[set[str], set[str]]:
    """(queues some live worker serves, queues some live worker has a free slot for)."""
    with ctx.sessions() as session:
        workers = session.execute(select(Worker.id, Worker.queues, Worker.slots)
                                  .where(Worker.last_heartbeat_at >= live_after(ctx))).all()
        busy = dict(session.execute(select(Job.worker_id, func.count()).where(Job.status == "running")
                                    .group_by(Job.worker_id)).all())
    served, free = set(), set()
    for worker in workers:
        queues = set(worker.queues.split(","))
        served |= queues
        if busy.get(worker.id, 0) < worker.slots:
            free |= queues
    return served, free


def reconcile(ctx: Services) -> list[str]:
    """Explain queued jobs that no live worker serves, and re-ring the ones a free worker never took.

    A queued job older than ``reconcile_seconds`` while a worker of its queue sits idle lost its message
    (a broker restart, a failed publish): ring again. While every worker is busy the message is just
    waiting its turn, so nothing is re-sent. Returns the ids rung again.
    """
    now = utcnow()
    stale = now - dt.timedelta(seconds=ctx.settings.reconcile_seconds)
    served, free = queue_capacity(ctx)
    with ctx.sessions() as session:
        queued = session.execute(select(Job.id, Job.queue, Job.pending_reason, Job.updated_at < stale)
                                 .where(Job.status == "queued")).all()
    rung = []
    for job_id, queue, reason, is_stale in queued:
        if queue not in served:
            set_pending_reason(ctx, job_id, reason, no_worker_reason(queue))
            continue
        if reason and reason.startswith(NO_WORKER):
            set_pending_reason(ctx, job_id, reason, None)
        if is_stale and queue in free and mark_rung(ctx, job_id, stale):
            log.warning("reconciler: job %s waited over %s s on queue %s with a worker free; publishing again",
                        job_id, ctx.settings.reconcile_seconds, queue)
            ctx.publisher.publish(job_id, queue)
            rung.append(job_id)
    return rung


def no_worker_reason(queue: str) -> str:
    """Why a job waits when no live worker serves its queue: ``… queue 'gpu.4' (jobs needing 4 GPUs)``."""
    try:
        needs = queue_gpus(queue)
    except ValueError:  # a queue this version doesn't know (a newer API): no more to say
        needs = 0
    return f"{NO_WORKER} {queue!r}" + (f" ({who_serves(queue)})" if needs else "")


def set_pending_reason(ctx: Services, job_id: str, old: str | None, new: str | None) -> None:
    if old == new:
        return
    with ctx.sessions() as session:
        lifecycle.set_pending_reason(session, job_id, new)
        session.commit()


def mark_rung(ctx: Services, job_id: str, stale: dt.datetime) -> bool:
    """Mark a stale queued job as published again; False when another worker's reconciler got there first."""
    with ctx.sessions() as session:
        won = lifecycle.mark_rung(session, job_id, stale)
        session.commit()
    return won


def prune(ctx: Services) -> None:
    """Delete the rows of dead workers, and old consumed message files of the filesystem broker."""
    with ctx.sessions() as session:
        session.execute(delete(Worker).where(Worker.last_heartbeat_at < live_after(ctx)))
        session.commit()
    processed = ctx.settings.home / "broker" / "processed"
    if ctx.settings.broker_url.startswith("filesystem://") and processed.is_dir():
        cutoff = time.time() - PROCESSED_MESSAGE_MAX_AGE
        for path in processed.iterdir():
            if path.stat().st_mtime < cutoff:
                path.unlink(missing_ok=True)


# --- the thread ---------------------------------------------------------------------------------


def tick(ctx: Services, worker_id: str, register: dict) -> None:
    """One round: heartbeat (re-registering if pruned), reap, reconcile, prune."""
    if not heartbeat_worker(ctx, worker_id):
        register_worker(ctx, worker_id, **register)
    reap(ctx)
    reconcile(ctx)
    prune(ctx)


def start(ctx: Services, worker_id: str, queues: list[str], slots: int,
          devices: dict | None = None) -> threading.Event:
    """Register the worker and run ``tick`` every heartbeat in a daemon thread; set the event to stop it.

    ``devices`` is what the registry shows of the machine (a GPU worker's GPUs); default: local_devices().
    """
    register = {"queues": queues, "slots": slots, "devices": devices or local_devices()}
    register_worker(ctx, worker_id, **register)
    stop = threading.Event()

    def loop() -> None:
        while True:
            try:
                tick(ctx, worker_id, register)
            except Exception:  # noqa: BLE001 - a database blip must not end maintenance; next tick retries
                log.exception("maintenance tick failed; retrying in %s s", ctx.settings.heartbeat_seconds)
            if stop.wait(ctx.settings.heartbeat_seconds):
                return

    threading.Thread(target=loop, name="torchyard-maintenance", daemon=True).start()
    return stop
