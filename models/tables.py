"""The service's data model: SQLAlchemy 2 typed tables shared by the API and the workers."""

from __future__ import annotations

import datetime as dt
import secrets
from typing import Any, Optional

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    false,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, WriteOnlyMapped, mapped_column, relationship

from models.text import MAX_NAME_LENGTH, MAX_TAG_LENGTH

# Named constraints make Alembic migrations deterministic across SQLite and PostgreSQL.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

JOB_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
SWEEP_STATUSES = ("running", "succeeded", "cancelled", "failed")
FINISHED_STATUSES = ("succeeded", "failed", "cancelled")
LOG_LEVELS = ("INFO", "WARNING", "ERROR")


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def new_id(prefix: str) -> str:
    """A random, URL-safe id such as ``job_3f9c…``; random so ids can't be enumerated."""
    return f"{prefix}_{secrets.token_hex(12)}"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {dt.datetime: DateTime(timezone=True), dict[str, Any]: JSON}


class User(Base):
    __tablename__ = "users"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("usr"))
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    # "user" sees its own jobs and counts of workers; "admin" sees everything (models.roles).
    role: Mapped[str] = mapped_column(String(20), default="user", server_default="user")
    # The user's weight in fair-share dispatch (models.dispatch); equal shares by default.
    share: Mapped[float] = mapped_column(Float, default=1.0, server_default="1")
    # Overrides of the deployment's quota defaults, by quota name (models.quotas): {"running_jobs": 4}.
    quotas: Mapped[Optional[dict[str, Any]]]


class ApiKey(Base):
    """A bearer token; only its SHA-256 is stored (tokens are random, so no slow hash is needed)."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("key"))
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    # The token's first characters, so a listing can tell keys apart without showing one.
    prefix: Mapped[Optional[str]] = mapped_column(String(16))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    last_used_at: Mapped[Optional[dt.datetime]]
    expires_at: Mapped[Optional[dt.datetime]]
    revoked_at: Mapped[Optional[dt.datetime]]

    user: Mapped[User] = relationship()


class Sweep(Base):
    """A hyperparameter sweep: its trials are ordinary jobs (``Job.sweep_id``), its controller decides which
    of them run longer (models.sweep_control)."""

    __tablename__ = "sweeps"
    __table_args__ = (Index("ix_sweeps_user_id_created_at", "user_id", "created_at"),
                      UniqueConstraint("user_id", "idempotency_key"))

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("swp"))
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(200))
    idempotency_key: Mapped[Optional[str]] = mapped_column(String(200))
    request: Mapped[dict[str, Any]]  # the normalized request (models.sweep_spec.PlannedSweep.request)
    base: Mapped[dict[str, Any]]  # the normalized base spec every trial starts from
    trials: Mapped[list[dict[str, Any]]] = mapped_column(JSON)  # each trial's params {path: value}, by number
    rungs: Mapped[list[int]] = mapped_column(JSON)  # ASHA's pause epochs; [] without a scheduler
    metric: Mapped[str] = mapped_column(String(100))
    mode: Mapped[str] = mapped_column(String(10))  # min | max
    status: Mapped[str] = mapped_column(String(20), default="running")  # one of SWEEP_STATUSES
    error: Mapped[Optional[str]] = mapped_column(Text)
    best_job_id: Mapped[Optional[str]] = mapped_column(String(40))
    best_value: Mapped[Optional[float]] = mapped_column(Float)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[Optional[dt.datetime]]
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class Job(Base):
    """One training run. The row is the job: status, progress, reasons and lease all live here."""

    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("user_id", "idempotency_key"),
        # A trial number is started once: two controller rounds that raced would collide here, not run it twice.
        UniqueConstraint("sweep_id", "sweep_trial"),
        # Lists page by (created_at, id) within a user (api/jobs.py): the cursor is a range of this index.
        Index("ix_jobs_user_id_created_at_id", "user_id", "created_at", "id"),
        Index("ix_jobs_status_queue", "status", "queue"),
        # Fair share reads the jobs that ended in the last hours (models.dispatch.user_states).
        Index("ix_jobs_finished_at", "finished_at"),
        Index("ix_jobs_user_id_experiment_created_at", "user_id", "experiment", "created_at"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("job"))
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(20), default="queued")
    spec: Mapped[dict[str, Any]]
    queue: Mapped[str] = mapped_column(String(50), default="cpu")
    idempotency_key: Mapped[Optional[str]] = mapped_column(String(200))
    # Dispatch (models.dispatch): the spec's priority (0 low, 1 normal, 2 high), when the job was last
    # handed to the broker (None: it waits in the database), and why a running one was asked to make room.
    priority: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    released_at: Mapped[Optional[dt.datetime]]
    preempt_reason: Mapped[Optional[str]] = mapped_column(Text)
    # The spec's experiment and tags, indexed to find jobs by (the spec stays what responses show of them).
    experiment: Mapped[Optional[str]] = mapped_column(String(MAX_NAME_LENGTH))
    # Written with the job, never loaded with it (GET /jobs?tag= reads job_tags in its query).
    tag_rows: WriteOnlyMapped[JobTag] = relationship(cascade="all, delete-orphan", passive_deletes=True)
    # A sweep's trial (None for an ordinary job): its sweep and trial number.
    sweep_id: Mapped[Optional[str]] = mapped_column(ForeignKey("sweeps.id", ondelete="CASCADE"))
    sweep_trial: Mapped[Optional[int]] = mapped_column(Integer)
    # Pausing (models.lifecycle.pause): the run pauses after this epoch (None: it runs to the end); a paused
    # job is queued but held: the dispatcher never releases it until ``unpause``.
    stop_at_epoch: Mapped[Optional[int]] = mapped_column(Integer)
    paused: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())

    # Progress.
    epoch: Mapped[int] = mapped_column(Integer, default=0)
    epochs: Mapped[int] = mapped_column(Integer)
    best_metric: Mapped[Optional[str]] = mapped_column(String(100))
    best_value: Mapped[Optional[float]] = mapped_column(Float)
    best_epoch: Mapped[Optional[int]]
    final_metrics: Mapped[Optional[dict[str, Any]]]

    # Why it is where it is.
    stop_reason: Mapped[Optional[str]] = mapped_column(String(100))
    error: Mapped[Optional[str]] = mapped_column(Text)
    pending_reason: Mapped[Optional[str]] = mapped_column(Text)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)

    # Attempts and the lease of the one attempt that may write (fencing by attempt number).
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    worker_id: Mapped[Optional[str]] = mapped_column(String(200))
    device: Mapped[Optional[str]] = mapped_column(String(100))
    lease_expires_at: Mapped[Optional[dt.datetime]]

    # The bytes of its artifact rows as its user's StoredBytes counts them (models.quotas.restate_stored_bytes).
    stored_bytes: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")

    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    started_at: Mapped[Optional[dt.datetime]]
    finished_at: Mapped[Optional[dt.datetime]]
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class StoredBytes(Base):
    """What a user's jobs' artifacts take, kept as a running total (models.quotas.restate_stored_bytes) so
    that the storage quota, which every submit checks, reads one row rather than every artifact of the user's
    history. A row of its own, not a column of ``users``: running jobs write it, and submits lock the user's."""

    __tablename__ = "stored_bytes"

    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), primary_key=True)
    artifacts: Mapped[int] = mapped_column(BigInteger, default=0)


class JobTag(Base):
    """One tag of a job: what GET /jobs?tag= finds jobs by. Rows go with their job (ON DELETE CASCADE)."""

    __tablename__ = "job_tags"
    __table_args__ = (Index("ix_job_tags_tag_job_id", "tag", "job_id"),)

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    tag: Mapped[str] = mapped_column(String(MAX_TAG_LENGTH), primary_key=True)


class EpochMetrics(Base):
    """One row an epoch: the metrics the engine recorded (loss, val_loss, accuracy, lr, ...)."""

    __tablename__ = "epoch_metrics"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    epoch: Mapped[int] = mapped_column(Integer, primary_key=True)
    attempt: Mapped[int] = mapped_column(Integer)
    values: Mapped[dict[str, Any]]
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)  # the workers set it: when the epoch ended


class LogLine(Base):
    """One line of a job's own log (worker.job_log writes them): what happened to the job and what its run
    emitted. ``seq`` orders a job's lines across its attempts; rows go with their job (ON DELETE CASCADE)."""

    __tablename__ = "job_logs"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    attempt: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[dt.datetime]  # when the worker saw it, not when the row got through
    level: Mapped[str] = mapped_column(String(10))  # one of LOG_LEVELS
    text: Mapped[str] = mapped_column(Text)


class Artifact(Base):
    """A stored file of a job: checkpoint, weights, model card, metrics."""

    __tablename__ = "artifacts"
    __table_args__ = (UniqueConstraint("job_id", "name"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("art"))
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(20))  # checkpoint | weights | model_card | metrics
    name: Mapped[str] = mapped_column(String(200))
    uri: Mapped[str] = mapped_column(Text)
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    epoch: Mapped[Optional[int]]
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class Dataset(Base):
    """An uploaded CSV or NPZ file, stored under a server-made name."""

    __tablename__ = "datasets"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("ds"))
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    format: Mapped[str] = mapped_column(String(10))  # csv | npz
    uri: Mapped[str] = mapped_column(Text)
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    n_rows: Mapped[int] = mapped_column(Integer)
    n_features: Mapped[int] = mapped_column(Integer)
    # What a spec is checked against at submit: the default target column of a CSV file, the target
    # width, and its classes as the engine counts them (largest label + 1; None for a continuous target).
    target: Mapped[Optional[str]] = mapped_column(String(200))
    n_targets: Mapped[int] = mapped_column(Integer, default=1)
    n_classes: Mapped[Optional[int]] = mapped_column(Integer)
    columns: Mapped[Optional[dict[str, Any]]]  # CSV: {"names": [...], "n_classes": {name: int | None}}
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class Worker(Base):
    """A live worker process: it registers at start and heartbeats while it runs."""

    __tablename__ = "workers"

    id: Mapped[str] = mapped_column(String(200), primary_key=True)
    hostname: Mapped[str] = mapped_column(String(200))
    queues: Mapped[str] = mapped_column(String(200))
    devices: Mapped[Optional[dict[str, Any]]]
    slots: Mapped[int] = mapped_column(Integer, default=1)
    started_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    last_heartbeat_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class MaintenanceRound(Base):
    """When the cluster's last maintenance round began, and which process took it (``models.rounds``): one row,
    so that however many workers a cluster has, they run about one round a heartbeat between them."""

    __tablename__ = "maintenance_rounds"

    name: Mapped[str] = mapped_column(String(40), primary_key=True)
    taken_at: Mapped[dt.datetime]
    taken_by: Mapped[str] = mapped_column(String(200))  # host:pid of the process that took it


class StreamSlot(Base):
    """An open live-metrics stream (SSE), so a user's streams are counted across every API process. Its
    process renews ``expires_at`` while it serves the stream; a slot past it (its process died) no longer
    counts."""

    __tablename__ = "stream_slots"
    __table_args__ = (Index("ix_stream_slots_user_id_expires_at", "user_id", "expires_at"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("str"))
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    process: Mapped[str] = mapped_column(String(200))  # host:pid of the API process serving it
    expires_at: Mapped[dt.datetime]
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class AuditEvent(Base):
    """Who did what, when: append-only (rows are only ever inserted, and deleted once past retention).
    Names are copied, not referenced, so an event outlives the rows it speaks of."""

    __tablename__ = "audit_events"
    __table_args__ = (Index("ix_audit_events_at", "at"), Index("ix_audit_events_user_id_at", "user_id", "at"))

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("aud"))
    at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    user_id: Mapped[str] = mapped_column(String(40))
    user_name: Mapped[str] = mapped_column(String(200))
    action: Mapped[str] = mapped_column(String(40))  # submit, cancel, delete, download, upload, …
    target: Mapped[Optional[str]] = mapped_column(String(200))  # the job's or dataset's id
    detail: Mapped[Optional[dict[str, Any]]]
