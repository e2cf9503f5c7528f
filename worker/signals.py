"""Celery's hooks: the worker registry, the maintenance thread, a clean hand-back on shutdown, and the jobs
of pool processes that die.

Connected when a worker imports ``worker.tasks``; the API never imports this module.
"""

from __future__ import annotations

import gc
import logging
import os

from billiard.exceptions import WorkerLostError
from billiard.process import current_process
from celery.signals import worker_init, worker_process_init, worker_ready, worker_shutdown, worker_shutting_down
from celery.worker import state
from celery.worker.request import Request

from models import lifecycle
from models.dispatch import dispatch_soon
from models.queues import queue_gpus
from models.settings import get_settings
from worker import cpus, gpus, maintenance
from worker.context import context, set_worker_id, start_draining, worker_id
from worker.job_log import log_loss

log = logging.getLogger(__name__)
_stop_maintenance = None


@worker_init.connect
def prepare_worker(sender=None, **_kwargs) -> None:
    """In the main process, before the pool forks: name the worker hostname:pid, refuse queues whose device
    this machine lacks, and plan GPU slots."""
    set_worker_id(maintenance.this_process())
    queues = sorted(sender.app.amqp.queues.consume_from)
    try:
        gpus.check_mps(queues)
        plan_gpu_slots(sender, queues)
    except ValueError as exc:  # SystemExit is no Exception, so Celery's signal dispatch lets it through
        raise SystemExit(f"torchyard worker can't start: {exc}") from None
    cpus.set_slots(sender.concurrency)  # after the GPU plan, which may have set the concurrency
    # The pool processes fork next and share this process's pages (torch, the engine) until they write to
    # them. Frozen, the objects made so far are out of every garbage collection's sight, so a collection in
    # a pool process doesn't write to (and so copy) the pages that hold them.
    gc.freeze()


def plan_gpu_slots(controller, queues: list[str]) -> None:
    """A GPU worker runs one pool process a GPU slot; ValueError for a GPU queue it can't hold a job of."""
    if not any(queue_gpus(queue) for queue in queues):
        return  # a CPU worker: its concurrency setting stands
    plan = gpus.make_plan(get_settings())
    slots = gpus.gpu_slots(plan, queues)
    if slots is None:
        return
    if controller.concurrency != slots:
        log.info("GPU worker: concurrency %s -> %s (one job a slot)", controller.concurrency, slots)
    controller.concurrency = slots
    gpus.set_plan(plan)  # before the pool forks: each pool process pins its slot from it


@worker_process_init.connect
def pin_slot(**_kwargs) -> None:
    """In each pool process: take the slot's share of the CPU threads and, on a GPU worker, see only the GPUs
    of this process's slot."""
    log.info("pool process %s: %s torch threads", os.getpid(), cpus.take_share())
    if gpus.plan() is not None:
        pinned = gpus.pin_slot(current_process().index)
        log.info("pool process %s: %s=%s", os.getpid(), gpus.VISIBLE, ",".join(pinned))


@worker_ready.connect
def start_maintenance(sender=None, **_kwargs) -> None:
    """Register the worker and start heartbeats and the maintenance rounds (main process only)."""
    global _stop_maintenance
    queues = sorted(sender.app.amqp.queues.consume_from)
    slots = sender.controller.concurrency
    plan = gpus.plan()
    devices = gpus.registry_devices(plan) if plan is not None else None
    _stop_maintenance = maintenance.start(context(), worker_id(), queues, slots, devices)
    log.info("worker %s serves %s with %s slot(s)", worker_id(), ",".join(queues), slots)


@worker_shutting_down.connect
def drain(**_kwargs) -> None:
    """Ask running jobs to checkpoint and go back to the queue, so a warm shutdown ends within seconds."""
    start_draining()


@worker_shutdown.connect
def stop_maintenance(**_kwargs) -> None:
    """Stop the maintenance thread and remove the worker from the registry."""
    if _stop_maintenance is None:
        return
    _stop_maintenance.set()
    maintenance.unregister_worker(context(), worker_id())


# --- pool processes that die ---------------------------------------------------------------------


class JobRequest(Request):
    """A run_job message as the worker's main process handles it. When the pool process running it dies
    (SIGKILL, the kernel's OOM killer, a crash in native code), Celery fails it with WorkerLostError here
    at once: the job goes back to the queue now instead of when its lease runs out."""

    def on_failure(self, exc_info, send_failed_event=True, return_ok=False):
        exc = getattr(exc_info.exception, "exc", exc_info.exception)  # unwrap ExceptionWithTraceback
        if isinstance(exc, WorkerLostError):
            requeue_lost_job(self, str(exc))
        # Celery then rejects the message back to the broker (task_reject_on_worker_lost): the redelivery
        # finds the job queued again, or running already and skips it.
        return super().on_failure(exc_info, send_failed_event=send_failed_event, return_ok=return_ok)


def requeue_lost_job(request: Request, how: str) -> None:
    """Requeue (``lifecycle.lose``) the job whose pool process died running ``request``, and publish it."""
    job_id = request.args[0] if request.args else None
    if not isinstance(job_id, str):
        return
    ctx = context()
    try:
        with ctx.sessions() as session:
            job = lifecycle.held(session, job_id, worker_id())
            # Read after the row: see _runs_elsewhere_here for why that order fences it.
            if job is None or _runs_elsewhere_here(request, job_id):
                return  # it never claimed the job, its attempt ended or was reaped, or another runs here
            what = f"its process on worker {job.worker_id} died ({how})"
            status = lifecycle.lose(session, job, what)
            if status is not None:
                log_loss(session, ctx.settings, job.id, job.attempts, what, status)
            session.commit()
        if status == "queued":
            dispatch_soon(ctx, [job.queue])
    except Exception:  # noqa: BLE001 - Celery must still handle the message; the reaper requeues it later
        log.exception("could not requeue job %s after its pool process died; the reaper will", job_id)
        return
    log.warning("job %s attempt %s: its pool process %s died (%s): %s", job_id, job.attempts,
                request.worker_pid, how, status or "ended meanwhile")


def _runs_elsewhere_here(request: Request, job_id: str) -> bool:
    """Whether another message that this worker holds carries ``job_id`` (a duplicate, or one whose process
    may run a newer attempt).

    This is the fence of ``lose``, which has only the attempt number that ``lifecycle.held`` read. A newer
    attempt on this worker was claimed by a pool process running a message that the worker received
    before that claim, and it holds that message until its run ends. So if the row read showed a newer
    attempt, its message is here now; if none is, the attempt read is the dead process's (or one whose run
    ended without writing: dead as well), and ``lose`` touches that attempt only.
    """
    while True:
        try:  # the consumer thread adds and removes messages meanwhile: a set that changed is read again
            held = {*state.reserved_requests, *state.active_requests}
            break
        except RuntimeError:
            continue
    return any(list(other.args or ())[:1] == [job_id] for other in held - {request})
