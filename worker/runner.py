"""Run one job: claim its row, fetch its files, train with fenced callbacks, record how it ended.

The task is a thin adapter around ``run_job``; everything here is plain functions over the database
row, the artifact store and ``worker.engine.train``.
"""

from __future__ import annotations

import datetime as dt
import logging
import shutil
from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from models.spec import JobSpec, Problem, SpecError, parse_spec
from models.storage import job_prefix
from models.tables import Artifact, Dataset, Job, utcnow
from worker import gpus
from worker.context import Context, context, draining, worker_id
from worker.doorbell import ring
from worker.engine import TrainResult, train
from worker.engine.checkpoints import position
from worker.engine.device import pick_device
from worker.job_callbacks import (
    ArtifactUploader,
    DatabaseMetrics,
    Fence,
    LeaseKeeper,
    LeaseLost,
    database_down,
    finite,
    finite_values,
    record_artifact,
    remove_unreferenced,
)

log = logging.getLogger(__name__)


def run_job(job_id: str) -> str:
    """Claim and run ``job_id``; return what happened (for the log). Never raises for a job's fault."""
    ctx = context()
    claimed = claim(ctx, job_id)
    if claimed is None:
        return give_up_if_exhausted(ctx, job_id)
    job, spec, problem, device = claimed
    attempt = job.attempts
    fence = Fence(ctx, job_id, attempt)
    # A folder per attempt: a lost attempt that wakes up (SIGSTOP, a long GC pause) and cleans up after
    # itself must not delete the folder of the attempt that took its job over on the same machine.
    scratch = Path(ctx.settings.scratch_dir) / f"{job_id}.{attempt}"
    try:
        if problem is not None:
            raise problem
        return execute(ctx, fence, job, spec, device, scratch)
    except LeaseLost as lost:
        log.warning("%s; stopping without writing", lost)
        remove_unreferenced(fence, fence.prefix)
        return "lease lost"
    except SpecError as exc:  # the user's to fix: the reason is the whole story, no traceback needed
        log.info("job %s can't run: %s", job_id, error_line(exc))
        return record_failure(fence, error_line(exc))
    except Exception as exc:  # noqa: BLE001 - the job fails with the reason; the worker lives on
        if database_down(exc):  # not the job's fault, and nothing can be written: the reaper requeues it
            log.warning("job %s attempt %s stops, database unavailable: %s", job_id, attempt, error_line(exc))
            return "database unavailable"
        log.exception("job %s attempt %s failed", job_id, attempt)
        return record_failure(fence, error_line(exc))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def prepare_spec(ctx: Context, job: Job) -> tuple[JobSpec | None, SpecError | None, str | None]:
    """The parsed spec and its device, or the SpecError that will fail the job once claimed."""
    try:
        spec = parse_spec(job.spec, ctx.settings.limits)
        if spec.data.source == "file":  # a path on the worker's disk is never the user's to read
            raise SpecError([Problem("data.source", "'file' is for local runs; upload it as a dataset")])
        check_slot_holds(spec)
        return spec, None, str(pick_device(spec.resources.device))
    except SpecError as exc:
        return None, exc, None


def check_slot_holds(spec: JobSpec) -> None:
    """A job needing more GPUs than this pool process's slot holds fails (its queue's workers hold them)."""
    pinned = gpus.slot_gpus()
    needs = spec.resources.gpus or 0
    if pinned is not None and needs > len(pinned):
        raise SpecError([Problem("resources.gpus", f"{needs} GPUs asked for, but this worker's slot holds "
                                                   f"{len(pinned)} ({gpus.VISIBLE}={','.join(pinned)})")])


def claim(ctx: Context, job_id: str) -> tuple[Job, JobSpec | None, SpecError | None, str | None] | None:
    """Take the job with one conditional UPDATE; return it with ``prepare_spec``'s result, None if it isn't
    ours (a duplicate or stale message, a cancelled job, or one out of attempts).

    The device it will run on (the torch device, and the GPUs of a GPU worker's slot) is recorded in the
    same transaction: the claim returns the spec that decides it, so no read comes before the claim.
    """
    now = utcnow()
    statement = (
        update(Job)
        .where(Job.id == job_id, Job.status == "queued", Job.cancel_requested.is_(False),
               Job.attempts < Job.max_attempts)
        .values(status="running", attempts=Job.attempts + 1, worker_id=worker_id(), started_at=now,
                pending_reason=None, lease_expires_at=now + dt.timedelta(seconds=ctx.settings.lease_seconds))
        .returning(Job)
        .execution_options(synchronize_session=False)
    )
    with ctx.sessions() as session:
        job = session.scalar(statement)
        if job is None:
            return None
        spec, problem, device = prepare_spec(ctx, job)
        job.device = gpus.device_label(device)
        session.commit()
    return job, spec, problem, device


def give_up_if_exhausted(ctx: Context, job_id: str) -> str:
    """A queued job whose attempts are all used fails with that reason; anything else was a duplicate."""
    with ctx.sessions() as session:
        job = session.get(Job, job_id)
        if job is None or job.status != "queued" or job.attempts < job.max_attempts:
            return "skipped"
        rows = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == "queued", Job.attempts == job.attempts)
            .values(status="failed", finished_at=utcnow(),
                    error=f"gave up after {job.attempts} attempts (max_attempts {job.max_attempts})")
            .execution_options(synchronize_session=False)
        ).rowcount
        session.commit()
    return "gave up" if rows else "skipped"


def execute(ctx: Context, fence: Fence, job: Job, spec: JobSpec, device: str, scratch: Path) -> str:
    """Fetch the files, train, upload the outputs and record the outcome."""
    for earlier in scratch.parent.glob(f"{job.id}.*"):  # left by attempts that lost the job (killed ones)
        shutil.rmtree(earlier, ignore_errors=True)
    out_dir = scratch / "out"
    limit = min(spec.training.max_runtime_seconds or ctx.settings.max_runtime_seconds,
                ctx.settings.max_runtime_seconds)
    # Downloads and loading the data may take longer than a lease: renew it from a thread until the
    # training loop starts renewing it at batch ends.
    with fence.keep_alive() as setup_done:
        data_path = fetch_dataset(ctx, job, spec, scratch) if spec.data.source == "dataset" else None
        resume = not fence.first and fetch_checkpoint(ctx, job.id, out_dir / "checkpoints")
        callbacks = [DatabaseMetrics(fence, spec), ArtifactUploader(fence, spec.checkpoint.keep_last),
                     LeaseKeeper(fence, limit, draining, setup_done)]
        result = train(spec, out_dir, resume=resume, callbacks=callbacks, data_path=data_path, device=device,
                       limits=ctx.settings.limits)
    with fence.keep_alive():  # uploading the outputs
        return record_result(fence, result)


def fetch_dataset(ctx: Context, job: Job, spec: JobSpec, scratch: Path) -> Path:
    """Download the job's uploaded dataset into its scratch folder."""
    with ctx.sessions() as session:
        dataset = session.scalar(select(Dataset).where(Dataset.id == spec.data.dataset_id,
                                                       Dataset.user_id == job.user_id))
    if dataset is None:
        raise SpecError([Problem("data.dataset_id", f"no dataset {spec.data.dataset_id!r} (deleted?)")])
    path = scratch / "data" / f"{dataset.id}.{dataset.format}"
    path.parent.mkdir(parents=True, exist_ok=True)
    ctx.store.get_file(dataset.uri, str(path))
    return path


def fetch_checkpoint(ctx: Context, job_id: str, directory: Path) -> bool:
    """Download the job's newest stored checkpoint for a resume; return whether there was one."""
    with ctx.sessions() as session:
        stored = session.scalars(select(Artifact).where(Artifact.job_id == job_id,
                                                        Artifact.kind == "checkpoint")).all()
    if not stored:
        return False
    # Newest by (epoch, batch): a mid-epoch checkpoint of epoch 5 comes after the end of epoch 5.
    newest = max(stored, key=lambda artifact: position(Path(artifact.name).name))
    directory.mkdir(parents=True, exist_ok=True)
    ctx.store.get_file(newest.uri, str(directory / Path(newest.name).name))
    log.info("job %s resumes from %s", job_id, newest.name)
    return True


def record_result(fence: Fence, result: TrainResult) -> str:
    """Write how the run ended (and, for a success, its outputs) in one fenced transaction."""
    outcome = {"epoch": result.epochs_completed, "final_metrics": finite_values(result.final_metrics) or None,
               "best_metric": result.best_metric, "best_value": finite(result.best_value),
               "best_epoch": result.best_epoch}
    if result.status == "stopped" and result.stop_reason == "preempted":
        return requeue(fence)
    stored = []
    if result.status == "succeeded":
        fence.renew()
        outputs = {"weights": result.weights_path, "model_card": result.card_path,
                   "metrics": result.metrics_path}
        stored = [(kind, path.name, fence.ctx.store.put_file(str(path), fence.key(path.name)))
                  for kind, path in outputs.items()]
    status = {"succeeded": "succeeded", "failed": "failed"}.get(result.status, "cancelled")

    def write(session: Session) -> None:
        fence.update(session, status=status, stop_reason=result.stop_reason, error=result.error,
                     finished_at=utcnow(), lease_expires_at=None, **outcome)
        for kind, name, info in stored:
            record_artifact(session, fence.job_id, kind, name, info)

    fence.transaction(write)
    log.info("job %s %s (%s)", fence.job_id, status, result.stop_reason or result.error)
    if not fence.first:  # an earlier attempt may have died between an upload and its row
        remove_unreferenced(fence, job_prefix(fence.job_id))
    return status


def requeue(fence: Fence) -> str:
    """Hand a preempted job back to the queue (it resumes from its checkpoint) and ring for it.

    A clean hand-back doesn't use up one of the job's attempts: ``max_attempts`` grows with ``attempts``,
    which only ever grows, because it is the fence. A job being cancelled ends cancelled instead: the drain
    may have stopped it before it saw the cancel, and a queued job with a cancel request is never claimed.
    """
    def write(session: Session) -> str | None:
        if fence.update(session).cancel_requested:  # the row is now locked: no cancel slips in after this
            fence.update(session, status="cancelled", stop_reason="cancelled", finished_at=utcnow(),
                         lease_expires_at=None)
            return None
        fence.update(session, status="queued", worker_id=None, device=None, lease_expires_at=None,
                     max_attempts=Job.max_attempts + 1, pending_reason="requeued: its worker shut down")
        return session.scalar(select(Job.queue).where(Job.id == fence.job_id))

    queue = fence.transaction(write)
    if queue is None:
        log.info("job %s cancelled (stopped by the worker's shutdown)", fence.job_id)
        return "cancelled"
    ring(fence.job_id, queue)
    return "requeued"


def record_failure(fence: Fence, error: str) -> str:
    """Fail the job with ``error`` unless another attempt owns it now."""
    try:
        fence.transaction(lambda session: fence.update(session, status="failed", error=error,
                                                       finished_at=utcnow(), lease_expires_at=None))
    except LeaseLost:
        remove_unreferenced(fence, fence.prefix)
        return "lease lost"
    remove_unreferenced(fence, job_prefix(fence.job_id))
    return "failed"


def error_line(exc: BaseException) -> str:
    """One line that keeps the reason: a SpecError's problems, else the exception's type and message."""
    if isinstance(exc, SpecError):
        return "; ".join(str(problem) for problem in exc.problems)
    message = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__
