"""The workers' Celery app: the only module that builds it, at import, from the settings.

The broker is only a doorbell that carries job ids; the database row is the job. Publishing goes through
``models.broker.BrokerPublisher`` (the API never imports this package); the tasks module is listed in
``include``, so only a worker imports it, and with it torch.
"""

from __future__ import annotations

from celery import Celery
from kombu import Queue

from models.broker import broker_url, transport_options
from models.queues import QUEUES
from models.settings import Settings, get_settings


def make_celery(settings: Settings) -> Celery:
    """The app for ``settings``; called once below."""
    app = Celery("torchyard", broker=broker_url(settings), include=["worker.tasks"])
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
