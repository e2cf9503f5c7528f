"""Keeping the queue honest: the worker registry, the reaper, the reconciler and the dispatcher's rounds.

Every worker runs these from one daemon thread in its main process (see ``start``), and so does a
process with no worker at all (``run``: ``torchyard maintenance``, and a thread of ``torchyard serve``),
so that jobs of dead workers are reaped and waiting jobs say why even when no worker is alive. They take
turns: a round of the whole cluster every half heartbeat, by the first process to ask (``models.rounds``).
Each change is a conditional UPDATE, so any number of rounds can run at once: one wins, the others change
nothing, and only the winner publishes the job again. Every change of a job's status goes through
``models.lifecycle``.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from models import audit, lifecycle, rounds, sweep_control
from models.dispatch import dispatch, dispatch_soon
from models.liveness import NO_WORKER, live_after, no_worker_reason, served_queues
from models.services import Services
from models.tables import Job, Worker, utcnow
from worker.job_log import log_loss

log = logging.getLogger(__name__)

PROCESSED_MESSAGE_MAX_AGE = 3600  # seconds a consumed message file of the filesystem broker is kept


# --- registry -----------------------------------------------------------------------------------


def register_worker(ctx: Services, worker_id: str, queues: list[str], slots: int, devices: dict) -> None:
    """Insert or refresh this worker's row."""
    now = utcnow()
    with ctx.sessions() as session:
        session.merge(Worker(id=worker_id, hostname=socket.gethostname(), queues=",".join(queues),
                             devices=devices, slots=slots, started_at=now,
                             last_heartbeat_at=now))
        session.commit()


def join(ctx: Services, worker_id: str, queues: list[str], slots: int, devices: dict) -> None:
    """Register the worker, then dispatch its queues: its free slots take jobs now, not at the cluster's next
    maintenance round (which another process may have taken a moment ago). Without waiting for a queue that
    another dispatcher holds: that one or the next round fills the slots."""
    register_worker(ctx, worker_id, queues, slots, devices)
    dispatch_soon(ctx, queues, wait=False)


def heartbeat_worker(ctx: Services, worker_id: str) -> bool:
    """Record that the worker is alive; False when its row is gone (pruned as dead) and must be re-made."""
    with ctx.sessions() as session:
        rows = session.execute(update(Worker).where(Worker.id == worker_id)
                               .values(last_heartbeat_at=utcnow())).rowcount
        session.commit()
    return rows == 1


def withdraw_slots(session: Session, worker_id: str) -> None:
    """A stopping worker's row offers no slot from now on: no dispatcher releases a job to it (it would only
    reject the message, and get it again, until it exits)."""
    session.execute(update(Worker).where(Worker.id == worker_id).values(slots=0))


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
    """Requeue running jobs whose lease expired (or end them: attempts used up, cancel asked); return their
    ids. The dispatcher releases them again (``sweep`` runs it next)."""
    now = utcnow()
    with ctx.sessions() as session:
        expired = lifecycle.expired(session, now)
    reaped = []
    for job in expired:
        with ctx.sessions() as session:
            status = lifecycle.reap(session, job, now)
            if status is not None:
                log_loss(session, ctx.settings, job.id, job.attempts,
                         f"worker {job.worker_id} stopped renewing its lease", status)
            session.commit()
        if status is None:
            continue
        log.warning("reaper: job %s (attempt %s) lost its worker %s: %s", job.id, job.attempts, job.worker_id,
                    status)
        reaped.append(job.id)
    return reaped


# --- reconciler ---------------------------------------------------------------------------------


def reconcile(ctx: Services) -> None:
    """Say why queued jobs wait when no live worker serves their queue, and clear it once one does.
    (Re-ringing jobs whose message was lost is the dispatcher's: ``models.dispatch``.) A paused job waits
    for its sweep, not for a worker: its reason stays the one its pause or its sweep gave."""
    with ctx.sessions() as session:
        served = served_queues(session, ctx.settings)
        queued = session.execute(select(Job.id, Job.queue, Job.pending_reason)
                                 .where(lifecycle.waiting())).all()
        for job_id, queue, reason in queued:
            if queue not in served:
                lifecycle.set_pending_reason(session, job_id, no_worker_reason(queue))
            elif reason and reason.startswith(NO_WORKER):
                lifecycle.set_pending_reason(session, job_id, None)
        session.commit()


def prune(ctx: Services) -> None:
    """Delete the rows of dead workers, audit events past their retention, and old consumed message files
    of the filesystem broker."""
    with ctx.sessions() as session:
        session.execute(delete(Worker).where(Worker.last_heartbeat_at < live_after(ctx.settings)))
        audit.prune(session, ctx.settings, utcnow())
        session.commit()
    processed = ctx.settings.home / "broker" / "processed"
    if ctx.settings.broker_url.startswith("filesystem://") and processed.is_dir():
        cutoff = time.time() - PROCESSED_MESSAGE_MAX_AGE
        for path in processed.iterdir():
            if path.stat().st_mtime < cutoff:
                path.unlink(missing_ok=True)


# --- the loops ---------------------------------------------------------------------------------


def sweep(ctx: Services) -> None:
    """One round of keeping the queue honest, worker or not: reap, explain, advance the running sweeps,
    dispatch, prune."""
    reap(ctx)
    reconcile(ctx)
    sweep_control.advance(ctx)
    dispatch(ctx)
    prune(ctx)


def sweep_when_due(ctx: Services, taker: str) -> bool:
    """``sweep`` if this process takes the cluster's round (``models.rounds``: one every half heartbeat,
    however many processes ask); return whether it did."""
    with ctx.sessions() as session:
        taken = rounds.take_round(session, taker, utcnow(), rounds.every(ctx.settings))
    if taken:
        sweep(ctx)
    return taken


def tick(ctx: Services, worker_id: str, register: dict) -> None:
    """A worker's heartbeat (re-registering if pruned), then the cluster's round if it is this worker's to take."""
    if not heartbeat_worker(ctx, worker_id):
        register_worker(ctx, worker_id, **register)
    sweep_when_due(ctx, worker_id)


def every_heartbeat(ctx: Services, step: Callable[[], None], stop: threading.Event) -> None:
    """Run ``step`` now and then every heartbeat until ``stop`` is set."""
    while True:
        try:
            step()
        except Exception:  # noqa: BLE001 - a database blip must not end maintenance; next round retries
            log.exception("maintenance round failed; retrying in %s s", ctx.settings.heartbeat_seconds)
        if stop.wait(ctx.settings.heartbeat_seconds):
            return


def start(ctx: Services, worker_id: str, queues: list[str], slots: int,
          devices: dict | None = None) -> threading.Event:
    """Register the worker (``join``) and run ``tick`` every heartbeat in a daemon thread; set the event to stop it.

    ``devices`` is what the registry shows of the machine (a GPU worker's GPUs); default: local_devices().
    """
    register = {"queues": queues, "slots": slots, "devices": devices or local_devices()}
    join(ctx, worker_id, **register)
    stop = threading.Event()
    threading.Thread(target=every_heartbeat, args=(ctx, lambda: tick(ctx, worker_id, register), stop),
                     name="torchyard-maintenance", daemon=True).start()
    return stop


def start_sweeping(ctx: Services) -> threading.Event:
    """Ask for the cluster's round every heartbeat in a daemon thread, without a worker (``torchyard serve``);
    set the event to stop it."""
    stop = threading.Event()
    taker = this_process()
    threading.Thread(target=every_heartbeat, args=(ctx, lambda: sweep_when_due(ctx, taker), stop),
                     name="torchyard-sweeper", daemon=True).start()
    return stop


def run(ctx: Services) -> None:
    """``torchyard maintenance``: ask for the cluster's round every heartbeat in this process until SIGTERM or
    Ctrl-C.

    Registers no worker (it trains nothing), needs no torch (it runs on the API image), and any number
    may run beside the workers' own loops.
    """
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    log.info("maintenance every %s s: reaping leases expired on %s, explaining and re-publishing queued jobs",
             ctx.settings.heartbeat_seconds, ctx.engine.url.render_as_string(hide_password=True))
    taker = this_process()
    every_heartbeat(ctx, lambda: sweep_when_due(ctx, taker), stop)
    log.info("maintenance stopped")


def this_process() -> str:
    """host:pid, as a round's taker names a process that is no worker (a worker is named so as well)."""
    return f"{socket.gethostname()}:{os.getpid()}"
