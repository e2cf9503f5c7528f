"""The Celery task: a thin adapter from a job id on the broker to ``worker.runner.run_job``."""

from __future__ import annotations

import logging

# Imported here, in a worker's main process, before its pool processes fork from it: torch.optim's optimizers
# import torch._dynamo when the first one is made (1.2-1.8 s on 2 cores), which would otherwise delay the first
# job of every pool process by that much, and load a copy in each.
import torch._dynamo  # noqa: F401
from celery import shared_task
from celery.exceptions import Reject

import worker.signals  # noqa: F401 - connects the worker's signal handlers
from models.broker import RUN_JOB
from worker import runner
from worker.context import draining


class _ShutdownRejectsAreInfo(logging.Filter):
    """Celery logs every Reject as a warning with its traceback; ours is the plan of a stopping worker, not a
    fault: its line stays, as INFO, and its traceback goes."""

    def filter(self, record: logging.LogRecord) -> bool:
        data = getattr(record, "data", None)
        if isinstance(data, dict) and data.get("description") == "rejected" and SHUTDOWN_REJECT in data["exc"]:
            record.exc_info, record.exc_text = None, None
            record.levelno, record.levelname = logging.INFO, logging.getLevelName(logging.INFO)
        return True


SHUTDOWN_REJECT = "worker shutting down"
logging.getLogger("celery.app.trace").addFilter(_ShutdownRejectsAreInfo())


# JobRequest (worker.signals) puts the job of a pool process that died back in the queue at once.
@shared_task(name=RUN_JOB, Request="worker.signals:JobRequest")
def run_job(job_id: str) -> str:
    """Claim and run one job; the database row, not this return value, records the outcome."""
    if draining():
        # A stopping worker can still be handed a message (even the one it just rang for the job it
        # handed back): return it to the broker for another worker instead of starting the job here.
        raise Reject(SHUTDOWN_REJECT, requeue=True)
    return runner.run_job(job_id)
