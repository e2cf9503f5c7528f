"""Process entry points for the CLI: a Celery worker over the torchyard queues."""

from __future__ import annotations

import secrets

from models.queues import QUEUES, describe_queues


def worker_argv(queues: list[str], concurrency: int, loglevel: str = "INFO") -> list[str]:
    """The ``celery worker`` arguments for these queues (shared by ``run_worker`` and ``serve``)."""
    unknown = [queue for queue in queues if queue not in QUEUES]
    if unknown or not queues:
        given = ", ".join(unknown) or "(none given)"
        raise ValueError(f"unknown queue(s) {given}; queues: {describe_queues()}")
    return [
        "worker",
        "--queues", ",".join(queues),
        "--concurrency", str(concurrency),
        "--prefetch-multiplier=1",  # with late acks: a busy slot holds no second job's message
        "--loglevel", loglevel,
        # Unique per worker, so several on one machine never clash (%h: the host name).
        "--hostname", f"torchyard-{secrets.token_hex(3)}@%h",
        # Liveness is the database's workers table; these only add broker traffic and a slower start.
        "--without-gossip", "--without-mingle", "--without-heartbeat",
        # No "-O fair": Celery 5.7's default profile already schedules fairly (SCHED_STRATEGY_FAIR).
    ]


def run_worker(queues: list[str], concurrency: int, loglevel: str = "INFO") -> None:
    """Run a worker in this process until it is stopped (SIGTERM: running jobs checkpoint and requeue)."""
    from worker.celery_app import app

    app.worker_main(worker_argv(queues, concurrency, loglevel))
