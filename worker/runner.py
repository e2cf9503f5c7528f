"""Run one job: claim its row, fetch its files, train with fenced callbacks, record how it ended.

The task is a thin adapter around ``run_job``; everything here is plain functions over the database
row, the artifact store and ``worker.engine.train``.
"""

from __future__ import annotations

import logging
import shutil
import threading
from pathlib import Path
from typing import get_args

from sqlalchemy import select
from sqlalchemy.orm import Session

from models import lifecycle
from models.dispatch import dispatch_soon
from models.services import Services
from models.spec import JobSpec, Problem, Resources, SpecError
from models.storage import job_prefix
from models.sweep_control import advance_soon
from models.tables import Artifact, Dataset, Job
from models.validation import parse_service_spec
from worker import gpus
from worker.context import context, draining, worker_id
from worker.engine import PAUSED, TrainResult, check_memory, pick_device, position, train
from worker.job_callbacks import (
    ArtifactUploader,
    DatabaseMetrics,
    Fence,
    LeaseKeeper,
    LeaseLost,
    PauseAt,
    database_down,
    finite,
    finite_values,
    record_artifacts,
    remove_unreferenced,
)
from worker.job_log import JobLog, start_log
from worker.maintenance import withdraw_slots

log = logging.getLogger(__name__)


def run_job(job_id: str) -> str:
    """Claim and run ``job_id``; return what happened (for the log). Never raises for a job's fault."""
    ctx = context()
    claimed = claim(ctx, job_id)
    if claimed is None:
        return give_up_if_exhausted(ctx, job_id)
    job, spec, problem, device, job_log = claimed
    attempt = job.attempts
    fence = Fence(ctx, job_id, attempt, job.queue, job_log)
    # A folder per attempt: a lost attempt that wakes up (SIGSTOP, a long GC pause) and cleans up after
    # itself must not delete the folder of the attempt that took its job over on the same machine.
    scratch = Path(ctx.settings.scratch_dir) / f"{job_id}.{attempt}"
    try:
        if problem is not None:
            raise problem
        # The run's warnings and log records are the job's lines; what the handlers below log is the worker's.
        with job_log.capturing():
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
        job_log.failure(exc)
        return record_failure(fence, error_line(exc))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        # Its slot is free again, or the job went back: dispatch from a thread, so that this process
        # returns (and Celery acks and hands it the next message) without waiting for it.
        threading.Thread(target=after_run, args=(ctx, job), name="torchyard-dispatch", daemon=True).start()


def after_run(ctx: Services, job: Job) -> None:
    """What an attempt's end may start: its sweep's next decision (a trial paused or ended), then dispatch."""
    if job.sweep_id is not None:
        advance_soon(ctx, [job.sweep_id])
    dispatch_soon(ctx, [job.queue])


def prepare_spec(ctx: Services, job: Job) -> tuple[JobSpec | None, SpecError | None, str | None]:
    """The parsed spec and its device, or the SpecError that will fail the job once claimed."""
    try:
        spec = parse_service_spec(job.spec, ctx.settings.limits)
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


def claim(ctx: Services, job_id: str) -> tuple[Job, JobSpec | None, SpecError | None, str | None, JobLog] | None:
    """Take the job (``lifecycle.claim``); return it with ``prepare_spec``'s result and the attempt's log, None
    if it isn't ours.

    The device it will run on (the torch device, and the GPUs of a GPU worker's slot) is recorded by the
    claim's own UPDATE, from the device the row's spec asks for, so no read comes before the claim and no
    second write follows it (a spec that can't run here has it corrected to ``prepare_spec``'s); the log's
    first line is in the same transaction.
    """
    with ctx.sessions() as session:
        job = lifecycle.claim(session, job_id, worker_id(), ctx.settings.lease_seconds, devices=device_labels())
        if job is None:
            return None
        spec, problem, device = prepare_spec(ctx, job)
        if job.device != gpus.device_label(device):
            job.device = gpus.device_label(device)
        job_log = start_log(session, job, ctx.settings)
        session.commit()
    job_log.written(session)
    return job, spec, problem, device, job_log


def device_labels() -> dict[str, str | None]:
    """The device label a job's row gets here for each device a spec may ask for: what ``prepare_spec`` makes
    of it in this process (None for one this machine lacks)."""
    labels = {}
    for requested in get_args(Resources.model_fields["device"].annotation):
        try:
            labels[requested] = gpus.device_label(str(pick_device(requested)))
        except SpecError:
            labels[requested] = gpus.device_label(None)
    return labels


def give_up_if_exhausted(ctx: Services, job_id: str) -> str:
    """A queued job whose attempts are all used fails with that reason; anything else was a duplicate."""
    with ctx.sessions() as session:
        gave_up = lifecycle.give_up(session, job_id)
        session.commit()
    return "gave up" if gave_up else "skipped"


def execute(ctx: Services, fence: Fence, job: Job, spec: JobSpec, device: str, scratch: Path) -> str:
    """Fetch the files, train, upload the outputs and record the outcome."""
    if not fence.first:  # a first attempt follows none (and the glob compiles a pattern: 0.5 ms a job)
        for earlier in scratch.parent.glob(f"{job.id}.*"):  # left by attempts that lost the job (killed ones)
            shutil.rmtree(earlier, ignore_errors=True)
    out_dir = scratch / "out"
    # Downloads and loading the data may take longer than a lease: renew it from a thread until the
    # training loop starts renewing it at batch ends.
    with fence.keep_alive() as setup_done:
        data_path = fetch_dataset(ctx, job, spec, scratch) if spec.data.source == "dataset" else None
        check_memory(spec, device, data_path, ctx.settings.worker_memory)  # fail now, not killed for memory
        resumed = None if fence.first else fetch_checkpoint(ctx, job.id, out_dir / "checkpoints")
        if resumed:
            fence.log.event("INFO", f"resuming from {resumed}")
        callbacks = [DatabaseMetrics(fence), ArtifactUploader(fence), LeaseKeeper(fence, draining, setup_done)]
        if job.stop_at_epoch is not None and job.stop_at_epoch < spec.training.epochs:
            callbacks.append(PauseAt(job.stop_at_epoch))
        # The limits hold the deployment's run time limit too: the trainer enforces it, across attempts. No fsync
        # of the checkpoint files: ArtifactUploader copies each to the store at once, and a resume reads that
        # copy (this scratch folder doesn't outlive the attempt).
        result = train(spec, out_dir, resume=resumed is not None, callbacks=callbacks, data_path=data_path,
                       device=device, limits=ctx.settings.limits, durable_checkpoints=False)
    with fence.keep_alive():  # uploading the outputs
        return record_result(fence, result)


def fetch_dataset(ctx: Services, job: Job, spec: JobSpec, scratch: Path) -> Path:
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


def fetch_checkpoint(ctx: Services, job_id: str, directory: Path) -> str | None:
    """Download the job's newest stored checkpoint for a resume; return its name, None if there was none."""
    with ctx.sessions() as session:
        stored = session.scalars(select(Artifact).where(Artifact.job_id == job_id,
                                                        Artifact.kind == "checkpoint")).all()
    if not stored:
        return None
    # Newest by (epoch, batch): a mid-epoch checkpoint of epoch 5 comes after the end of epoch 5.
    newest = max(stored, key=lambda artifact: position(Path(artifact.name).name))
    directory.mkdir(parents=True, exist_ok=True)
    ctx.store.get_file(newest.uri, str(directory / Path(newest.name).name))
    log.info("job %s resumes from %s", job_id, newest.name)
    return newest.name


def record_result(fence: Fence, result: TrainResult) -> str:
    """Write how the run ended (and, for a success or a pause, its outputs) in one fenced transaction."""
    if result.status == "stopped" and result.stop_reason == "preempted":
        return hand_back(fence)
    outcome = {"epoch": result.epochs_completed, "final_metrics": finite_values(result.final_metrics) or None,
               "best_metric": result.best_metric, "best_value": finite(result.best_value),
               "best_epoch": result.best_epoch}
    stored = []
    if result.status == "succeeded":  # a pause too: its weights are a result (a pruned trial keeps them)
        # Uploaded under the attempt's own folder (no renewal first): an attempt that lost the job overwrites no
        # file a row points at, its write below fails, and run_job removes what it uploaded.
        outputs = {"weights": result.weights_path, "model_card": result.card_path,
                   "metrics": result.metrics_path}
        stored = [(kind, path.name, fence.ctx.store.put_file(str(path), fence.key(path.name)), None)
                  for kind, path in outputs.items()]
    if result.stop_reason == PAUSED:
        return pause(fence, result, outcome, stored)
    status = {"succeeded": "succeeded", "failed": "failed"}.get(result.status, "cancelled")
    if result.stop_reason == "early_stopping":
        best = "" if result.best_value is None else (f": the best {result.best_metric} was {result.best_value:.6g}, "
                                                     f"at epoch {result.best_epoch}")
        fence.log.event("INFO", f"early stopping after epoch {result.epochs_completed}{best}")

    def write(session: Session) -> None:
        fence.require(session, lifecycle.finish(session, fence.job_id, fence.attempt, status,
                                                stop_reason=result.stop_reason, error=result.error, **outcome))
        record_artifacts(session, fence.job_id, stored)
        fence.log.close(session, *closing_line(status, result))

    fence.transaction(write)
    log.info("job %s %s (%s)", fence.job_id, status, result.stop_reason or result.error)
    if not fence.first:  # an earlier attempt may have died between an upload and its row
        remove_unreferenced(fence, job_prefix(fence.job_id))
    return status


def pause(fence: Fence, result: TrainResult, outcome: dict, stored: list) -> str:
    """Put a run paused at its ``stop_at_epoch`` back in the queue, held (``lifecycle.pause``), with its
    outputs recorded as for a success; a job being cancelled ends cancelled instead."""
    epoch = result.epochs_completed

    def write(session: Session) -> str:
        status = lifecycle.pause(session, fence.job_id, fence.attempt,
                                 f"paused after epoch {epoch}: waiting for its sweep to promote or stop it", **outcome)
        fence.require(session, status is not None)
        record_artifacts(session, fence.job_id, stored)
        if status == "queued":
            fence.log.close(session, "INFO", f"paused after epoch {epoch} (stop_at_epoch); the next attempt "
                                             "resumes from the checkpoint saved now")
        else:  # a cancel was asked meanwhile
            fence.log.close(session, "INFO", f"cancelled after {epoch} epochs (stopped for a pause)")
        return status

    status = fence.transaction(write)
    log.info("job %s %s after epoch %s", fence.job_id, "paused" if status == "queued" else status, epoch)
    if not fence.first:  # the outputs of the attempt before the pause are no longer referenced
        remove_unreferenced(fence, job_prefix(fence.job_id))
    return "paused" if status == "queued" else status


def closing_line(status: str, result: TrainResult) -> tuple[str, str]:
    """The level and text of the log's last line for a run that ended ``status``."""
    epochs = f"{result.epochs_completed} epoch{'' if result.epochs_completed == 1 else 's'}"
    compiling = "" if result.compile_seconds is None else f"; compiling took {result.compile_seconds:.1f} s"
    if status == "succeeded":
        return "INFO", f"succeeded after {epochs} ({result.stop_reason}){compiling}"
    if status == "failed":
        return "ERROR", f"failed after {epochs}: {result.error}{compiling}"
    return "INFO", f"cancelled after {epochs}{compiling}"


def hand_back(fence: Fence) -> str:
    """Give a preempted job back to the queue (it resumes from its checkpoint; the dispatcher releases it
    again); a job being cancelled ends cancelled instead (the drain may have stopped it before it saw the
    cancel)."""
    def write(session: Session) -> str:
        status = lifecycle.hand_back(session, fence.job_id, fence.attempt, fence.hand_back_reason)
        fence.require(session, status is not None)
        if draining():  # handed back because this worker stops: the job must go to another one
            withdraw_slots(session, worker_id())
        why = fence.hand_back_reason.removeprefix("requeued: ")
        if status == "queued":
            fence.log.close(session, "INFO", f"handed back to the queue ({why}); the next attempt resumes from "
                                             "the checkpoint saved now")
        else:  # a cancel was asked meanwhile
            fence.log.close(session, "INFO", f"cancelled (stopped for a hand-back: {why})")
        return status

    if fence.transaction(write) == "cancelled":
        log.info("job %s cancelled (stopped by the worker's shutdown)", fence.job_id)
        return "cancelled"
    log.info("job %s handed back: %s", fence.job_id, fence.hand_back_reason)
    return "requeued"


def record_failure(fence: Fence, error: str) -> str:
    """Fail the job with ``error`` unless another attempt owns it now."""
    def write(session: Session) -> None:
        fence.require(session, lifecycle.finish(session, fence.job_id, fence.attempt, "failed", error=error))
        fence.log.close(session, "ERROR", f"failed: {error}")

    try:
        fence.transaction(write)
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
