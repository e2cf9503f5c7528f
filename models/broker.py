"""The broker as a doorbell: how to reach it, and a publisher that rings it with a job id.

The database row is the job; only its id travels. The API and the workers' maintenance publish through a
``Publisher`` built from their own Settings; ``BrokerPublisher`` sends by task name, so it needs neither the
worker package nor its Celery app (``worker/celery_app.py``, which uses the connection options below).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol

from celery import Celery

from models.queues import QUEUES, describe_queues
from models.settings import Settings

log = logging.getLogger(__name__)

RUN_JOB = "worker.tasks.run_job"
# Jobs run for hours; a redelivery after this long is harmless (the claim refuses it) and the database
# lease plus the reaper, not the broker, bring back the jobs of lost workers.
VISIBILITY_TIMEOUT = 7 * 24 * 3600
FILESYSTEM_POLL_SECONDS = 0.1  # how often an idle worker looks for a message in the filesystem broker
# A few quick tries, then give up: the job row is already committed and the dispatcher re-publishes
# queued jobs that nobody took, so an API request must not hang on a broker that is down.
RETRY_POLICY = {"max_retries": 2, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.5}


class Publisher(Protocol):
    """Tells the workers of ``queue`` that job ``job_id`` waits (called after its row is committed)."""

    def publish(self, job_id: str, queue: str) -> None: ...


def broker_url(settings: Settings) -> str:
    """The broker URL as kombu takes it."""
    if settings.broker_url == "filesystem://":
        return "filesystem://localhost/"  # the same transport, without kombu's "no hostname" warning
    return settings.broker_url


def broker_folders(home: Path) -> dict[str, str]:
    """The filesystem transport's folders under ``home`` (created here: kombu expects them to exist)."""
    base = home / "broker"
    folders = {"data_folder_in": base / "queue", "data_folder_out": base / "queue",
               "processed_folder": base / "processed", "control_folder": base / "control"}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    return {name: str(folder) for name, folder in folders.items()}


def transport_options(settings: Settings) -> dict:
    """Broker options: a long visibility timeout, and the folders when the broker is the filesystem."""
    options: dict = {"visibility_timeout": VISIBILITY_TIMEOUT}
    if settings.broker_url.startswith("filesystem://"):
        # Keeping processed messages in a folder beside the queue makes taking a message one rename on
        # one filesystem, so two workers can't both take it (the default moves it to /tmp: copy + delete).
        # The maintenance thread prunes that folder.
        options.update(broker_folders(settings.home), store_processed=True)
        # An idle worker looks in its queue's folder this often (kombu's default, 1 s, made a job submitted to an
        # idle `torchyard serve` wait half a second on average before it started); a look is one listdir.
        options["polling_interval"] = FILESYSTEM_POLL_SECONDS
    else:
        options["socket_connect_timeout"] = 5  # an API request must not hang on a dead broker
    return options


class BrokerPublisher:
    """Publishes job ids to the configured broker with Celery's ``send_task`` (JSON, no result backend)."""

    def __init__(self, settings: Settings):
        self.app = Celery("torchyard-publisher", broker=broker_url(settings), set_as_current=False)
        self.app.conf.update(task_serializer="json", result_backend=None, task_ignore_result=True,
                             broker_transport_options=transport_options(settings))

    def publish(self, job_id: str, queue: str) -> None:
        """Send ``job_id`` to ``queue``; a broker that is down is logged, not raised (see RETRY_POLICY)."""
        if queue not in QUEUES:
            raise ValueError(f"unknown queue {queue!r}; queues: {describe_queues()}")
        try:
            self.app.send_task(RUN_JOB, args=[job_id], queue=queue, retry=True, retry_policy=RETRY_POLICY)
        except Exception as exc:  # noqa: BLE001 - the dispatcher re-publishes; say so rather than fail
            log.warning("could not publish job %s to queue %s (%s: %s); the dispatcher will publish it again",
                        job_id, queue, type(exc).__name__, exc)
