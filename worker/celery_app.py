"""The Celery app: the only module that builds it, at import, from the settings.

The broker is only a doorbell that carries job ids; the database row is the job. Importing this module
must stay cheap and torch-free because the API imports it to ring the doorbell: the tasks module is
listed in ``include`` and only a worker imports it.
"""

from __future__ import annotations

from pathlib import Path

from celery import Celery
from kombu import Queue

from models.queues import QUEUES
from models.settings import Settings, get_settings

RUN_JOB = "worker.tasks.run_job"
# Jobs run for hours; a redelivery after this long is harmless (the claim refuses it) and the database
# lease plus the reaper, not the broker, bring back the jobs of lost workers.
VISIBILITY_TIMEOUT = 7 * 24 * 3600


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
    else:
        options["socket_connect_timeout"] = 5  # an API request must not hang on a dead broker
    return options


def make_celery(settings: Settings) -> Celery:
    """The app for ``settings``; called once below."""
    broker = settings.broker_url
    if broker == "filesystem://":
        broker = "filesystem://localhost/"  # the same transport, without kombu's "no hostname" warning
    app = Celery("torchyard", broker=broker, include=["worker.tasks"])
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_backend=None,
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # A long job keeps running if the broker connection drops; the database lease fences it.
        worker_cancel_long_running_tasks_on_connection_loss=False,
        broker_connection_retry_on_startup=True,
        broker_transport_options=transport_options(settings),
        task_queues=[Queue(name) for name in QUEUES],
        task_default_queue="cpu",
        # Liveness and control live in the database (workers table); broker chatter would only add load.
        worker_enable_remote_control=False,
        worker_send_task_events=False,
    )
    return app


app = make_celery(get_settings())
