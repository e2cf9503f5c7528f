"""Celery signal handlers: the worker registry, the maintenance thread and a clean hand-back on shutdown.

Connected when a worker imports ``worker.tasks``; the API never imports this module.
"""

from __future__ import annotations

import logging
import os
import socket

from billiard.process import current_process
from celery.signals import worker_init, worker_process_init, worker_ready, worker_shutdown, worker_shutting_down

from models.queues import queue_gpus
from models.settings import get_settings
from worker import gpus, maintenance
from worker.context import context, set_worker_id, start_draining, worker_id

log = logging.getLogger(__name__)
_stop_maintenance = None


@worker_init.connect
def name_worker(sender=None, **_kwargs) -> None:
    """Name the worker hostname:pid in the main process, before the pool forks its children."""
    set_worker_id(f"{socket.gethostname()}:{os.getpid()}")
    plan_gpu_slots(sender)


def plan_gpu_slots(controller) -> None:
    """A GPU worker runs one pool process a GPU slot; a GPU queue it can't hold a job of stops it here."""
    queues = sorted(controller.app.amqp.queues.consume_from)
    if not any(queue_gpus(queue) for queue in queues):
        return  # a CPU worker: its concurrency setting stands
    try:
        plan = gpus.make_plan(get_settings())
        slots = gpus.gpu_slots(plan, queues)
    except ValueError as exc:  # SystemExit is no Exception, so Celery's signal dispatch lets it through
        raise SystemExit(f"torchyard worker can't start: {exc}") from None
    if slots is None:
        return
    if controller.concurrency != slots:
        log.info("GPU worker: concurrency %s -> %s (one job a slot)", controller.concurrency, slots)
    controller.concurrency = slots
    gpus.set_plan(plan)  # before the pool forks: each pool process pins its slot from it


@worker_process_init.connect
def pin_gpu_slot(**_kwargs) -> None:
    """In each pool process of a GPU worker: see only the GPUs of this process's slot."""
    if gpus.plan() is not None:
        pinned = gpus.pin_slot(current_process().index)
        log.info("pool process %s: %s=%s", os.getpid(), gpus.VISIBLE, ",".join(pinned))


@worker_ready.connect
def start_maintenance(sender=None, **_kwargs) -> None:
    """Register the worker and start heartbeats, the reaper and the reconciler (main process only)."""
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
