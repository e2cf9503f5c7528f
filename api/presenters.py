"""Rows to response models: the one place that decides what a client sees of a row."""

from __future__ import annotations

from api.schemas import (
    API_PREFIX,
    Best,
    DatasetOut,
    DatasetSummary,
    JobLinks,
    JobOut,
    JobSummary,
    Progress,
    WorkerOut,
    as_utc,
)
from models.tables import Dataset, Job, Worker


def job_links(job_id: str) -> JobLinks:
    """Where a job's parts live."""
    base = f"{API_PREFIX}/jobs/{job_id}"
    return JobLinks(
        self=base,
        metrics=f"{base}/metrics",
        weights=f"{base}/weights",
        checkpoints=f"{base}/checkpoints",
        cancel=f"{base}/cancel",
    )


def _job_fields(job: Job) -> dict:
    best = None
    if job.best_metric is not None and job.best_value is not None and job.best_epoch is not None:
        best = Best(metric=job.best_metric, value=job.best_value, epoch=job.best_epoch)
    return dict(
        id=job.id,
        name=job.name,
        status=job.status,
        progress=Progress(epoch=job.epoch, epochs=job.epochs),
        attempts=job.attempts,
        max_attempts=job.max_attempts,
        best=best,
        final_metrics=job.final_metrics,
        stop_reason=job.stop_reason,
        error=job.error,
        pending_reason=job.pending_reason,
        cancel_requested=job.cancel_requested,
        queue=job.queue,
        device=job.device,
        worker_id=job.worker_id,
        created_at=as_utc(job.created_at),
        started_at=as_utc(job.started_at),
        finished_at=as_utc(job.finished_at),
        updated_at=as_utc(job.updated_at),
        links=job_links(job.id),
    )


def job_summary(job: Job) -> JobSummary:
    """A job as lists show it (no spec)."""
    return JobSummary(**_job_fields(job))


def job_out(job: Job) -> JobOut:
    """A job with its spec."""
    return JobOut(**_job_fields(job), spec=job.spec)


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


def worker_out(worker: Worker, running: list[str], own_job_ids: set[str]) -> WorkerOut:
    """A live worker and the jobs ``running`` on it; a job is named only to its owner."""
    return WorkerOut(
        id=worker.id,
        hostname=worker.hostname,
        queues=[q for q in worker.queues.split(",") if q],
        devices=worker.devices,
        slots=worker.slots,
        running=len(running),
        free_slots=max(worker.slots - len(running), 0),
        job_ids=[job_id for job_id in running if job_id in own_job_ids],
        started_at=as_utc(worker.started_at),
        last_heartbeat_at=as_utc(worker.last_heartbeat_at),
    )
