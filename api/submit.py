"""Submitting a job: validate spec and dataset, honour Idempotency-Key, commit, then dispatch its queue."""

from __future__ import annotations

import logging
from typing import Any

from flask import Request
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from api.datasets import lock_dataset
from api.errors import ApiError, validation_error
from api.gate import read_json
from models import audit, lifecycle, queues, quotas
from models.catalog import DataShape
from models.dispatch import PRIORITIES, admits_at_once, dispatch_soon, read_load
from models.experiments import job_labels
from models.memory import memory_problems
from models.quotas import QuotaExceeded
from models.services import Services
from models.settings import Settings
from models.shapes import fit_problems
from models.spec import JobSpec, Limits, Problem, SpecError, unknown_name_message
from models.tables import Dataset, Job, User, utcnow
from models.text import quoted, text_problem
from models.validation import parse_service_spec

log = logging.getLogger(__name__)

MAX_IDEMPOTENCY_KEY = 200
# What a submit adds to the quotas it is held to. A job's outputs are stored too: a user already past the
# storage quota makes room before adding more.
SUBMIT_QUOTAS = {"queued_jobs": 1, "storage_bytes": 0}


def spec_body(request: Request, settings: Settings, what: str = "the spec") -> Any:
    """The request's JSON body (``what`` it holds, for the refusals), through the gate for JSON bodies (size,
    nesting, I-JSON's rules)."""
    return read_json(request, settings.max_spec_bytes, settings.max_json_depth, what)


def queue_for(spec: JobSpec) -> str:
    """The broker queue that serves a spec: ``cpu``, ``mps``, or ``gpu`` / ``gpu.k`` by the GPUs one job needs."""
    return queues.queue_for(spec.resources)


def submit_job(
    session: Session, user: User, body: Any, idempotency_key: str | None, services: Services
) -> tuple[Job, bool]:
    """Validate and store a job, then publish it; return (job, created). A retried key gets the first job."""
    settings = services.settings
    check_idempotency_key(idempotency_key)
    spec = validate_spec(session, user, body, settings.limits)
    normalized = spec.model_dump(mode="json")
    # Counted under a lock on the user's row, held until the insert commits: concurrent submits of one user
    # take turns, so no more than the quota get in. The uses are counted in the dispatcher's read, a statement
    # after the lock's, which sees what the submit before this one committed.
    locked = quotas.lock_user(session, user.id)
    load = read_load(session, settings, user.id, tuple(SUBMIT_QUOTAS))
    try:
        quotas.check(settings, locked, SUBMIT_QUOTAS, load.uses)
    except QuotaExceeded:
        existing = _same_key_job(session, user, idempotency_key, normalized)
        if existing is None:
            raise
        return existing, False  # a retry of a job this key made already: its answer, quota or not
    queue = queue_for(spec)
    # On an idle cluster the job goes to the broker with its insert; otherwise the dispatcher decides.
    at_once = admits_at_once(session, services, queue, locked, load)
    job = lifecycle.submit(
        session,
        user_id=user.id,
        name=spec.name,
        spec=normalized,
        queue=queue,
        epochs=spec.training.epochs,
        max_attempts=settings.max_attempts,
        idempotency_key=idempotency_key,
        priority=PRIORITIES[spec.priority],
        released_at=utcnow() if at_once else None,
        **job_labels(spec),
    )
    try:
        # The job and its audit event go in one flush (a reused Idempotency-Key conflicts there).
        audit.record(session, user, "submit", job.id, name=job.name, queue=job.queue)
        session.commit()
    except IntegrityError:
        # The key was used before (a retry, or a concurrent request that won the insert): answer with
        # that job. Inserting first and looking up only on a conflict keeps a fresh submit's round trips down.
        session.rollback()
        existing = _same_key_job(session, user, idempotency_key, normalized)
        if existing is None:
            raise
        return existing, False
    # After the commit: a lost publish only delays the job (the dispatcher rings released jobs again).
    if at_once:
        services.publisher.publish(job.id, job.queue)
    else:  # the dispatcher releases it when its turn comes
        dispatch_soon(services, [job.queue], session)  # the request's session: no second connection
    return job, True


def check_idempotency_key(key: str | None) -> None:
    """422 for an Idempotency-Key that can't be stored and looked up: stored text's rule, and not empty."""
    if key is not None:
        problem = text_problem(key, MAX_IDEMPOTENCY_KEY) if key else "empty"
        if problem:
            raise validation_error([Problem("Idempotency-Key", problem)])


def _same_key_job(session: Session, user: User, key: str | None, normalized: dict) -> Job | None:
    if key is None:
        return None
    job = session.scalar(select(Job).where(Job.user_id == user.id, Job.idempotency_key == key))
    if job is not None and _renormalized(job.spec) != normalized:
        # As the IETF Idempotency-Key draft says: a reused key with another payload is a client error.
        raise ApiError(
            422,
            "Idempotency-Key reused",
            f"key {quoted(key)} was used for job {job.id} with a different spec; use a new key for a new job",
            kind="idempotency-key-reused",
        )
    return job


def _renormalized(stored: dict) -> dict:
    """A stored spec as today's model writes it: a job stored before a field was added lacks the field's
    default, and a retry of its request must still match it."""
    try:
        return JobSpec.model_validate(stored).model_dump(mode="json")
    except ValueError:  # a spec today's model refuses can't be what the retry sends, which passed
        return stored


def validate_spec(session: Session, user: User, body: Any, limits: Limits) -> JobSpec:
    """A runnable spec for this service, or 422 listing every problem by field path."""
    try:
        spec = parse_service_spec(body, limits)
    except SpecError as exc:
        raise validation_error(exc.problems, "Invalid job spec") from None
    if spec.data.source == "dataset":
        spec = check_dataset(session, user, spec, limits)
    return spec


def check_dataset(session: Session, user: User, spec: JobSpec, limits: Limits) -> JobSpec:
    """Check the network against the caller's uploaded dataset; fill in the CSV target column it will use.

    The dataset stays locked until the job's insert commits (or the request ends): a delete waits, then
    finds the job and refuses; a delete that went first leaves no row to find here.
    """
    data = spec.data
    dataset = lock_dataset(session, user.id, data.dataset_id)
    if dataset is None:
        raise validation_error(
            [
                Problem(
                    "data.dataset_id",
                    f"no dataset {data.dataset_id!r}; upload one with POST /api/v1/datasets",
                )
            ],
            "Invalid job spec",
        )
    target, shape, problems = dataset_shape(dataset, data.target)
    if not problems:
        problems = text_problems(dataset, target, spec.task)
    if not problems and shape.n_samples > limits.max_samples:
        problems.append(
            Problem(
                "data.dataset_id",
                f"{shape.n_samples} samples exceed the limit of {limits.max_samples} (max_samples)",
            )
        )
    if not problems:
        problems = fit_problems(spec, shape, limits) or memory_problems(spec, shape, limits, dataset.format)
    if problems:
        raise validation_error(problems, "Invalid job spec")
    # The stored spec names its target, so the worker needn't know the upload's default.
    return spec.model_copy(update={"data": data.model_copy(update={"target": target})})


def dataset_shape(dataset: Dataset, target: str | None) -> tuple[str | None, DataShape, list[Problem]]:
    """The target column a job uses, the data's shape with it, and what's wrong with that choice."""
    base = DataShape(dataset.n_rows, dataset.n_features, dataset.n_targets, dataset.n_classes)
    if dataset.format == "npz":
        if target is not None:
            return (
                None,
                base,
                [Problem("data.target", "an NPZ dataset holds arrays X and y; leave target out")],
            )
        return None, base, []
    columns = dataset.columns or {}
    names = columns.get("names", [])
    target = target or dataset.target or names[-1]  # the engine's default: the last column
    if target not in names:
        return (
            None,
            base,
            [Problem("data.target", unknown_name_message(target, f"column of {dataset.id}", names))],
        )
    n_classes = columns.get("n_classes", {}).get(target)
    return target, DataShape(dataset.n_rows, len(names) - 1, 1, n_classes), []


def text_problems(dataset: Dataset, target: str | None, task: str) -> list[Problem]:
    """A column of text labels (the upload's target) is a classification target only: as a regression
    target or as a feature (when the job names another target) it is refused, named."""
    text = (dataset.columns or {}).get("text", [])
    if target in text and task == "regression":
        return [Problem("data.target", f"column {target!r} of {dataset.id} holds text (class labels); task "
                                       "'regression' needs a numeric target: use 'binary' or 'multiclass'")]
    features = [name for name in text if name != target]
    if features:
        return [Problem("data.target", f"with target {target!r}, the column(s) {', '.join(map(repr, features))} "
                                       f"of {dataset.id} would be features, but they hold text; features must "
                                       "be numbers")]
    return []
