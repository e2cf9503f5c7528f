"""Ring the doorbell: tell the workers of a queue that a job row is waiting. Only the id travels."""

from __future__ import annotations

import logging

from models.queues import describe_queues
from worker.celery_app import QUEUES, RUN_JOB, app

log = logging.getLogger(__name__)

# A few quick tries, then give up: the job row is already committed and the reconciler re-rings
# queued jobs that nobody took, so an API request must not hang on a broker that is down.
RETRY_POLICY = {"max_retries": 2, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.5}


def ring(job_id: str, queue: str) -> None:
    """Publish ``job_id`` on ``queue`` (call it after committing the job row)."""
    if queue not in QUEUES:
        raise ValueError(f"unknown queue {queue!r}; queues: {describe_queues()}")
    try:
        app.send_task(RUN_JOB, args=[job_id], queue=queue, retry=True, retry_policy=RETRY_POLICY)
    except Exception as exc:  # noqa: BLE001 - the reconciler re-rings; say so rather than fail the request
        log.warning("could not publish job %s to queue %s (%s: %s); the reconciler will re-publish it",
                    job_id, queue, type(exc).__name__, exc)
