"""Rows to response models: the one place that decides what a client sees of a row."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Row

from api.schemas import (
    API_PREFIX,
    DatasetOut,
    DatasetSummary,
    LogLineOut,
    QueueCapacity,
    WorkerOut,
    as_utc,
)
from models.tables import Dataset, Job, LogLine, Worker

# What a worker's devices record counts (worker.maintenance.local_devices, worker.gpus.registry_devices); its
# other entries (gpus_per_slot, each GPU's name and memory) are detail for admins.
DEVICE_KINDS = ("cpu", "cuda", "mps")


def job_links(job_id: str) -> dict[str, str]:
    """Where a job's parts live (JobLinks)."""
    base = f"{API_PREFIX}/jobs/{job_id}"
    return {"self": base, "metrics": f"{base}/metrics", "logs": f"{base}/logs", "weights": f"{base}/weights",
            "checkpoints": f"{base}/checkpoints", "cancel": f"{base}/cancel"}


# A job's presenters build the body's dict, in the schema's field order, and json_response writes it with
# pydantic's encoder: validating what the server itself built cost ~30 µs a job, 0.6 ms a page of 20
# (tests/test_api_jobs.py checks each against JobSummary and JobOut). ``job`` is a Job or a row of
# SUMMARY_COLUMNS (a list reads no more of each job than its summary shows).
SUMMARY_COLUMNS = (Job.id, Job.name, Job.status, Job.paused, Job.sweep_id, Job.sweep_trial, Job.spec, Job.epoch,
                   Job.epochs, Job.attempts, Job.max_attempts, Job.best_metric, Job.best_value, Job.best_epoch,
                   Job.final_metrics, Job.stop_reason, Job.error, Job.pending_reason, Job.cancel_requested,
                   Job.queue, Job.device, Job.worker_id, Job.created_at, Job.started_at, Job.finished_at,
                   Job.updated_at)


def job_summary(job: Job | Row, owner: str) -> dict[str, Any]:
    """A job as lists show it (JobSummary: no spec); ``owner`` is its user's name."""
    best = None
    if job.best_metric is not None and job.best_value is not None and job.best_epoch is not None:
        best = {"metric": job.best_metric, "value": float(job.best_value), "epoch": job.best_epoch}
    return {
        "id": job.id,
        "name": job.name,
        "owner": owner,
        "status": job.status,
        "paused": job.paused,
        "sweep_id": job.sweep_id,
        "sweep_trial": job.sweep_trial,
        # As the spec says them: the job's experiment column and tag rows only index them.
        "experiment": job.spec.get("experiment"),
        "tags": job.spec.get("tags", []),
        "progress": {"epoch": job.epoch, "epochs": job.epochs},
        "attempts": job.attempts,
        "max_attempts": job.max_attempts,
        "best": best,
        "final_metrics": job.final_metrics,
        "stop_reason": job.stop_reason,
        "error": job.error,
        "pending_reason": job.pending_reason,
        "cancel_requested": job.cancel_requested,
        "queue": job.queue,
        "device": job.device,
        "worker_id": job.worker_id,
        "created_at": as_utc(job.created_at),
        "started_at": as_utc(job.started_at),
        "finished_at": as_utc(job.finished_at),
        "updated_at": as_utc(job.updated_at),
        "links": job_links(job.id),
    }


def job_out(job: Job, owner: str) -> dict[str, Any]:
    """A job with its spec (JobOut); ``owner`` is its user's name."""
    return {**job_summary(job, owner), "spec": job.spec}


def log_line_out(line: LogLine) -> LogLineOut:
    """One line of a job's log."""
    return LogLineOut(seq=line.seq, time=as_utc(line.created_at), attempt=line.attempt, level=line.level,
                      text=line.text)


def dataset_summary(dataset: Dataset) -> DatasetSummary:
    """An uploaded dataset as lists show it: counts, not its (maybe thousands of) column names. Its
    storage URI stays private."""
    names = (dataset.columns or {}).get("names")
    return DatasetSummary(
        id=dataset.id,
        name=dataset.name,
        format=dataset.format,
        size=dataset.size,
        sha256=dataset.sha256,
        n_rows=dataset.n_rows,
        n_features=dataset.n_features,
        n_targets=dataset.n_targets,
        n_classes=dataset.n_classes,
        target=dataset.target,
        n_columns=None if names is None else len(names),
        created_at=as_utc(dataset.created_at),
    )


def dataset_out(dataset: Dataset) -> DatasetOut:
    """An uploaded dataset's description with its column names."""
    return DatasetOut(**dataset_summary(dataset).model_dump(), columns=(dataset.columns or {}).get("names"))


def worker_out(worker: Worker, running: list[str]) -> WorkerOut:
    """A live worker and the jobs ``running`` on it, in detail (for admins)."""
    return WorkerOut(
        id=worker.id,
        hostname=worker.hostname,
        queues=worker_queues(worker),
        devices=worker.devices,
        slots=worker.slots,
        running=len(running),
        free_slots=_free_slots(worker, running),
        job_ids=running,
        started_at=as_utc(worker.started_at),
        last_heartbeat_at=as_utc(worker.last_heartbeat_at),
    )


def queue_capacities(workers: list[Worker], running: dict[str, list[str]]) -> list[QueueCapacity]:
    """Per queue, what its live workers offer (``running``: the jobs on each worker, by worker id)."""
    queues: dict[str, QueueCapacity] = {}
    for worker in workers:
        kinds = {kind for kind, count in (worker.devices or {}).items() if kind in DEVICE_KINDS and count}
        for name in worker_queues(worker):
            queue = queues.setdefault(name, QueueCapacity(queue=name, workers=0, slots=0, free_slots=0, devices=[]))
            queue.workers += 1
            queue.slots += worker.slots
            queue.free_slots += _free_slots(worker, running[worker.id])
            queue.devices = sorted(kinds | set(queue.devices))
    return [queues[name] for name in sorted(queues)]


def worker_queues(worker: Worker) -> list[str]:
    """The queues a worker serves (stored comma-separated)."""
    return [q for q in worker.queues.split(",") if q]


def _free_slots(worker: Worker, running: list[str]) -> int:
    return max(worker.slots - len(running), 0)
