"""The API's response bodies as pydantic models: they build the responses and the OpenAPI document."""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal

import pydantic_core
from flask import Response
from pydantic import BaseModel, ConfigDict, Field

from models.roles import ROLES
from models.sweep_control import TRIAL_STATES
from models.tables import JOB_STATUSES, LOG_LEVELS, SWEEP_STATUSES

API_PREFIX = "/api/v1"
JobStatus = Literal[JOB_STATUSES]  # type: ignore[valid-type]
LogLevel = Literal[LOG_LEVELS]  # type: ignore[valid-type]
Role = Literal[ROLES]  # type: ignore[valid-type]


def as_utc(value: dt.datetime | None) -> dt.datetime | None:
    """A stored time as an aware UTC datetime (SQLite hands them back without a zone)."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=dt.timezone.utc)


def json_response(body: BaseModel | dict[str, Any], status: int = 200, headers: dict[str, str] | None = None
                  ) -> Response:
    """A JSON response from a response model, or from a body a presenter built (api/presenters.py), written by
    the same encoder."""
    return Response(to_json(body), status=status, headers=headers, mimetype="application/json")


def to_json(body: BaseModel | dict[str, Any]) -> bytes:
    """A body as JSON, as pydantic writes a model (``inf_nan_mode``: a model's default, NaN and infinities as
    null)."""
    if isinstance(body, BaseModel):
        return body.model_dump_json().encode()
    return pydantic_core.to_json(body, inf_nan_mode="null")


def no_content() -> Response:
    """204: no body, so no Content-Type either (Flask would label the nothing text/html)."""
    response = Response(status=204)
    del response.headers["Content-Type"]
    return response


class Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- jobs ---------------------------------------------------------------------------------------


class Progress(Out):
    epoch: int = Field(description="epochs completed")
    epochs: int = Field(description="epochs the spec asks for")


class Best(Out):
    metric: str
    value: float
    epoch: int


class JobLinks(Out):
    self: str
    metrics: str
    logs: str
    weights: str
    checkpoints: str
    cancel: str


class JobSummary(Out):
    """A job as listed: everything but its spec."""

    id: str
    name: str
    owner: str = Field(description="the name of the user who submitted it (an admin sees every user's jobs)")
    status: JobStatus
    paused: bool = Field(description="a queued job held until its sweep resumes or ends it: it ran to the epoch "
                                     "its sweep asked for, and its weights so far are stored")
    sweep_id: str | None = Field(description="the sweep whose trial it is; null for a job of its own")
    sweep_trial: int | None = Field(description="its trial number in that sweep; null for a job of its own")
    experiment: str | None = Field(description="the spec's experiment: GET /jobs?experiment= finds its jobs")
    tags: list[str] = Field(description="the spec's tags: GET /jobs?tag= finds the jobs carrying them")
    progress: Progress
    attempts: int
    max_attempts: int
    best: Best | None
    final_metrics: dict[str, Any] | None
    stop_reason: str | None
    error: str | None
    pending_reason: str | None
    cancel_requested: bool
    queue: str
    device: str | None
    worker_id: str | None
    created_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    updated_at: dt.datetime
    links: JobLinks


class JobOut(JobSummary):
    """One job with its normalized spec (defaults filled in)."""

    spec: dict[str, Any]


class JobList(Out):
    jobs: list[JobSummary]
    next_cursor: str | None = Field(description="pass as ?cursor= for the next page; null on the last")


class MetricsOut(Out):
    metrics: list[dict[str, Any]] = Field(description='per-epoch rows, e.g. {"epoch": 1, "loss": 0.7, ...}')
    status: JobStatus
    next_since_epoch: int | None = Field(
        description="pass as ?since_epoch= for the epochs after this page; null when there are none yet (and "
        "with max_points, whose sample spans every epoch asked for)")


class LayerOut(Out):
    index: int
    type: str = Field(description="the torch.nn class")
    output_shape: list[int] = Field(description="of one sample (no batch dimension)")
    parameters: int


class NetworkOut(Out):
    """A job's network as its spec and data make it (models.shapes: the engine's own walk)."""

    input_shape: list[int] = Field(description="one sample's shape, as the first layer sees it")
    n_outputs: int
    layers: list[LayerOut]
    total_parameters: int


class CheckpointOut(Out):
    epoch: int | None
    name: str
    size: int
    sha256: str
    created_at: dt.datetime
    download: str


class CheckpointList(Out):
    checkpoints: list[CheckpointOut]


class LogLineOut(Out):
    seq: int = Field(description="its place in the job's log, across attempts (a stream's event id)")
    time: dt.datetime = Field(description="when the worker saw it")
    attempt: int
    level: LogLevel
    text: str


class LogsOut(Out):
    lines: list[LogLineOut] = Field(description="in seq order")
    last_seq: int = Field(description="the seq of the last line returned (since_seq when there are none): pass "
                                      "it as ?since_seq= for the lines after these")
    status: JobStatus


class TagCount(Out):
    tag: str
    jobs: int = Field(description="how many of the caller's jobs carry it")


class TagList(Out):
    tags: list[TagCount] = Field(description="the most used first")


# --- sweeps -------------------------------------------------------------------------------------

TrialStateName = Literal[TRIAL_STATES]  # type: ignore[valid-type]
SweepStatus = Literal[SWEEP_STATUSES]  # type: ignore[valid-type]


class SweepBest(Out):
    job_id: str
    metric: str
    value: float
    params: dict[str, Any] = Field(description="the trial's values of the space's paths")


class SweepLinks(Out):
    self: str
    trials: str
    cancel: str


class SweepSummary(Out):
    """A sweep as listed: everything but its request."""

    id: str
    name: str
    owner: str
    status: SweepStatus
    method: Literal["grid", "random", "tpe"]
    metric: str
    mode: Literal["min", "max"]
    trials: int = Field(description="trials the sweep runs in all")
    created: int = Field(description="trials started so far (as jobs)")
    parallelism: int
    rungs: list[int] = Field(description="ASHA's rung epochs, the last one max_epochs; empty without ASHA")
    counts: dict[TrialStateName, int] = Field(description="trials by state (paused: waiting at a rung; pruned: "
                                                          "stopped by ASHA, its weights kept)")
    best: SweepBest | None
    error: str | None
    created_at: dt.datetime
    finished_at: dt.datetime | None
    links: SweepLinks


class SweepOut(SweepSummary):
    """One sweep with its normalized request (defaults filled in)."""

    request: dict[str, Any]


class SweepList(Out):
    sweeps: list[SweepSummary]
    next_cursor: str | None = Field(description="pass as ?cursor= for the next page; null on the last")


class TrialOut(Out):
    number: int
    job_id: str
    state: TrialStateName
    status: JobStatus
    params: dict[str, Any]
    epoch: int = Field(description="epochs completed")
    epochs: int
    rung: int | None = Field(description="index of the highest rung the trial completed")
    value: float | None = Field(description="the sweep's metric at the trial's last epoch (what ASHA compares)")
    best_metric: str | None = Field(description="the metric the job itself monitors (early stopping's, else "
                                                "val_loss or loss)")
    best_value: float | None = Field(description="the best value of best_metric so far")
    stop_reason: str | None
    pending_reason: str | None


class TrialList(Out):
    trials: list[TrialOut]


# --- datasets -----------------------------------------------------------------------------------


class DatasetSummary(Out):
    id: str
    name: str
    format: Literal["csv", "npz"]
    size: int
    sha256: str
    n_rows: int
    n_features: int
    n_targets: int
    n_classes: int | None = Field(description="classes of the target (largest label + 1); null if continuous")
    target: str | None = Field(description="a CSV file's default target column; a job may name another")
    n_columns: int | None = Field(description="a CSV file's columns; null for NPZ")
    created_at: dt.datetime


class DatasetOut(DatasetSummary):
    columns: list[str] | None = Field(description="a CSV file's column names (at most max_columns); null for NPZ")


class DatasetList(Out):
    datasets: list[DatasetSummary] = Field(description="without column names: GET /datasets/{id} lists them")
    next_cursor: str | None = Field(description="pass as ?cursor= for the next page; null on the last")


# --- the caller and the audit log ---------------------------------------------------------------


class QuotaOut(Out):
    name: str = Field(description="queued_jobs, running_jobs, gpus, storage_bytes or streams")
    counts: str = Field(description="what it counts")
    limit: int
    use: int = Field(description="what the caller uses of it now")
    overridden: bool = Field(description="true: the caller's own limit; false: the deployment's default")


class FairShareOut(Out):
    active_jobs: int = Field(description="jobs running or handed to the workers")
    usage_seconds: float = Field(description="run time of recent jobs, halved every half_life_seconds")
    half_life_seconds: float


class MeOut(Out):
    """The caller: who they are, their quotas, and their standing in fair-share dispatch (the user with the
    fewest active jobs, then the least recent usage, each divided by their share, goes first)."""

    name: str
    role: Role
    share: float
    quotas: list[QuotaOut]
    fair_share: FairShareOut


class AuditEventOut(Out):
    id: str
    at: dt.datetime
    user_id: str = Field(description="who did it: a user's id, or 'cli' for the command line")
    user_name: str
    action: str
    target: str | None = Field(description="the id of the job, dataset, user or key acted on")
    detail: dict[str, Any] | None


class AuditList(Out):
    events: list[AuditEventOut] = Field(description="newest first")
    next_cursor: str | None = Field(description="pass as ?cursor= for the next page; null on the last")


# --- workers, health, problems ------------------------------------------------------------------


class WorkerOut(Out):
    id: str
    hostname: str
    queues: list[str]
    devices: dict[str, Any] | None
    slots: int
    running: int = Field(description="how many jobs run on it now")
    free_slots: int
    job_ids: list[str] = Field(description="the jobs running on it")
    started_at: dt.datetime
    last_heartbeat_at: dt.datetime


class QueueCapacity(Out):
    """What the live workers serving one queue offer, in counts (no hosts, no ids)."""

    queue: str
    workers: int = Field(description="live workers serving it")
    slots: int = Field(description="jobs they can run at once (a worker serving several queues counts in each)")
    free_slots: int
    devices: list[str] = Field(description="the kinds of device they have: cpu, cuda, mps")


class WorkerList(Out):
    live_workers: int
    queues: list[QueueCapacity] = Field(description="each queue a live worker serves")
    workers: list[WorkerOut] | None = Field(
        description="each live worker: host, devices, the jobs it runs; for admins, null for other users")


class IndexLinks(Out):
    dashboard: str = Field(description="the web dashboard")
    docs: str = Field(description="this API's OpenAPI document in Swagger UI")
    openapi: str = Field(description="the OpenAPI 3.1 document")
    health: str = Field(description="liveness with dependency checks")
    jobs: str
    datasets: str
    tags: str
    workers: str
    me: str
    audit: str = Field(description="admins only")


class IndexOut(Out):
    name: Literal["torchyard"]
    version: str = Field(description="the torchyard release that serves this API")
    api_version: Literal["v1"]
    authentication: str
    links: IndexLinks = Field(description="paths on this server")


class HealthOut(Out):
    status: Literal["ok", "degraded", "error"]
    checks: dict[str, str]


class FieldProblem(Out):
    path: str
    message: str


class ProblemOut(Out):
    """RFC 9457 problem details."""

    type: str
    title: str
    status: int
    detail: str | None = None
    errors: list[FieldProblem] | None = None
    # Extension members (RFC 9457 §3.2) of quota-exceeded (quota, limit, use) and rate-limited (budget,
    # limit: requests a window, window: its seconds).
    quota: str | None = None
    budget: str | None = None
    limit: int | None = None
    use: int | None = None
    window: int | None = None
