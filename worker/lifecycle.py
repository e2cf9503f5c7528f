"""Celery signal handlers: the worker registry, the maintenance thread and a clean hand-back on shutdown.

Connected when a worker imports ``worker.tasks``; the API never imports this module.
"""

from __future__ import annotations

import logging
import os
import socket

from celery.signals import worker_init, worker_ready, worker_shutdown, worker_shutting_down

from worker import maintenance
from worker.context import context, set_worker_id, start_draining, worker_id

log = logging.getLogger(__name__)
_stop_maintenance = None


@worker_init.connect
def name_worker(sender=None, **_kwargs) -> None:
    """Name the worker hostname:pid in the main process, before the pool forks its children."""
    set_worker_id(f"{socket.gethostname()}:{os.getpid()}")


@worker_ready.connect
def start_maintenance(sender=None, **_kwargs) -> None:
    """Register the worker and start heartbeats, the reaper and the reconciler (main process only)."""
    global _stop_maintenance
    queues = sorted(sender.app.amqp.queues.consume_from)
    slots = sender.controller.concurrency
    _stop_maintenance = maintenance.start(context(), worker_id(), queues, slots)
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
