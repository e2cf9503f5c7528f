"""The one typed settings object, built once from ``TORCHYARD_*`` environment variables."""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from models.spec import Limits

PREFIX = "TORCHYARD_"
# Where rate-limit counts may live: this process, or a Redis server.
RATE_LIMIT_STORAGES = ("memory://", "redis://", "rediss://")
MAX_RATE_WINDOW_SECONDS = 366 * 24 * 3600
ZERO_WINDOW = re.compile(r"(/|\bper)\s*0+\s*[a-z]")


class Settings(BaseModel):
    """Every knob of torchyard; each field is read from ``TORCHYARD_<FIELD>``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    home: Path = Path("~/.torchyard").expanduser()
    database_url: str = ""  # default: SQLite file under home
    broker_url: str = ""  # default: Celery's filesystem transport under home
    artifacts_url: str = ""  # default: a local folder under home
    scratch_dir: str = ""  # default: home/scratch; where workers keep files of the running job

    # Limits on what one job may ask for.
    max_parameters: int = 50_000_000
    max_layers: int = 100
    max_epochs: int = 10_000
    max_samples: int = 1_000_000
    max_upload_bytes: int = 100 * 1024 * 1024
    # Columns of an uploaded CSV file: a dataset row records each name, and its description lists them.
    max_columns: Annotated[int, Field(ge=2)] = 10_000
    # Uploads one user may have in progress at once on one API host (all its gunicorn processes); 429 past it.
    max_concurrent_uploads: Annotated[int, Field(ge=1)] = 2
    # A job spec is a few KB; its JSON body is refused past this before it is read (413).
    max_spec_bytes: Annotated[int, Field(ge=1024)] = 1024 * 1024
    # Arrays and objects nested deeper than this are refused before parsing (a spec nests about 5 deep).
    max_json_depth: Annotated[int, Field(ge=8, le=512)] = 32
    max_runtime_seconds: int = 24 * 3600
    # Values a scikit-learn generator may draw before its first sample (centres, covariances, coefficients):
    # the API calls it on two samples to check its arguments by scikit-learn's own rules.
    max_generator_setup: Annotated[int, Field(ge=1)] = 2_000_000
    # Bytes a job's estimated peak memory may reach (models.memory): data, activations, weights, optimizer
    # state and the process itself. The default suits a worker with 4 GiB to spare.
    max_job_memory: Annotated[int, Field(ge=1)] = 4 << 30
    # A job's own log (worker.job_log): once it holds this many lines, its run's warnings, log records and
    # traceback lines are dropped (one line says so; the lines of its start and end are always kept); each
    # line is cut to max_log_line_length characters.
    max_log_lines: Annotated[int, Field(ge=1)] = 1000
    max_log_line_length: Annotated[int, Field(ge=80)] = 1000

    # Sharing the service (models.quotas, models.dispatch). Quotas are per user; `torchyard user set-quota`
    # overrides them for one user.
    quota_queued_jobs: Annotated[int, Field(ge=0)] = 100
    quota_running_jobs: Annotated[int, Field(ge=0)] = 8
    quota_gpus: Annotated[int, Field(ge=0)] = 8
    quota_storage_bytes: Annotated[int, Field(ge=0)] = 10 << 30
    quota_streams: Annotated[int, Field(ge=0)] = 4
    # Fair share: a user's usage is their running jobs, then their recent run time, halved every this many
    # seconds (Slurm's decay half-life), each divided by the user's share.
    fairshare_half_life_seconds: Annotated[float, Field(gt=0)] = 3600
    # Jobs released to the broker beyond a queue's free slots, so a worker that finishes one finds the next
    # at once; more only delays fairness.
    dispatch_margin: Annotated[int, Field(ge=0)] = 1
    # A high-priority job with no free slot may ask a lower-priority running job to hand its slot back.
    preemption: bool = False

    # The audit log (models.audit): who did what is kept this long, then the maintenance loop deletes it.
    audit_retention_days: Annotated[int, Field(ge=1)] = 90
    # /metrics (models.monitoring): queue waits, run times and epochs are over the jobs of this recent window,
    # read from the database at each scrape; 300 s matches the usual rate(...[5m]) of a dashboard.
    metrics_window_seconds: Annotated[int, Field(ge=10, le=7 * 86400)] = 300

    # Reliability.
    max_attempts: int = 3
    lease_seconds: int = 60
    heartbeat_seconds: int = 10
    reconcile_seconds: int = 30

    # Processes.
    host: str = "127.0.0.1"
    port: int = 8000
    api_workers: int = 2  # gunicorn processes of ``torchyard api``
    api_threads: Annotated[int, Field(ge=2)] = 16  # threads of each ``torchyard api`` process
    # Seconds a client may send nothing while its request (line, headers, body) is still due, under both
    # servers: a stalled request must not hold a thread (or an upload slot) forever. Past it the server
    # drops the connection, answering 408 when it was the body that stalled.
    request_read_timeout_seconds: Annotated[float, Field(gt=0)] = 30
    # Live metrics streams (SSE) each hold a thread while open: one API process serves at most this many, so
    # the rest of its threads stay free (a user's own streams across every process: quota_streams).
    max_streams_per_process: Annotated[int, Field(ge=1)] = 8
    # Rate limits per API key (api/rate_limits.py), in the notation of the limits library ("120/minute", or several:
    # "10/second;1000/hour"): submissions (POST /jobs), uploads (POST /datasets), and every other request
    # (reads mostly); a request without a valid key counts against its IP address's read budget.
    rate_limit_submit: str = "120/minute"
    rate_limit_read: str = "1200/minute"
    rate_limit_upload: str = "30/minute"
    # Where the counts live: every API process must share them. Default: the broker when it is Redis, else
    # this process's memory (one process under `serve`).
    rate_limit_storage_url: str = ""
    worker_queues: str = "cpu"
    worker_concurrency: int = 1  # jobs a CPU worker runs at once; a GPU worker runs one a GPU slot
    # GPUs a GPU worker uses: "auto" counts this machine's CUDA devices at worker start; a number picks
    # the first ones (on a machine without CUDA a number simulates GPUs, for tests and dry runs).
    worker_gpus: int | Literal["auto"] = "auto"
    # GPUs of one job slot: slots = worker_gpus // worker_gpus_per_slot; such a worker serves gpu.<k>.
    worker_gpus_per_slot: Annotated[int, Field(ge=1)] = 1
    # Bytes of memory a worker's training device offers one job; 0 measures it (a GPU's total memory, else
    # the host's RAM or its container's limit). A job whose estimate is over it fails with that reason.
    worker_memory: Annotated[int, Field(ge=0)] = 0
    # ``torchyard serve`` restarts a worker that dies; after this many deaths in a row, each within a
    # minute of its start, it gives up and exits (a worker that can't start must not spin).
    serve_worker_restarts: Annotated[int, Field(ge=0)] = 5

    # The CLI as a client: which server, which key (default: the one ``torchyard serve`` saved).
    url: str = ""
    token: str = ""

    @field_validator("rate_limit_submit", "rate_limit_read", "rate_limit_upload")
    @classmethod
    def _rate_limit(cls, value: str) -> str:
        from limits import parse_many  # only the API limits rates; the workers needn't import it

        try:
            items = parse_many(value)
        except ValueError:
            items = []
        # limits reads "10/0 minutes" as 10 a minute: a window of zero units is refused here.
        if not items or any(item.amount < 1 for item in items) or ZERO_WINDOW.search(value.lower()):
            raise ValueError(f"a rate such as '120/minute' or '10/second;1000/hour', not {value!r}")
        if any(item.get_expiry() > MAX_RATE_WINDOW_SECONDS for item in items):
            raise ValueError(f"windows of at most a year (a budget renews in them), not {value!r}")
        return value

    @field_validator("rate_limit_storage_url")
    @classmethod
    def _rate_limit_storage(cls, value: str) -> str:
        if value and not value.startswith(RATE_LIMIT_STORAGES):
            raise ValueError(f"empty (the default), or a URL starting {', '.join(RATE_LIMIT_STORAGES)}; not {value!r}")
        if value.startswith(("redis://", "rediss://")):
            from redis.connection import parse_url  # only the API reads this URL

            try:
                parse_url(value)
            except ValueError as error:
                raise ValueError(f"not a Redis URL ({error}): {value!r}") from None
            database = urlsplit(value).path.strip("/")
            if database and not (database.isascii() and database.isdigit()):  # redis-py would use database 0
                raise ValueError(f"a Redis database is a number (redis://host:6379/3), not {database!r}")
        return value

    @field_validator("worker_gpus", mode="before")
    @classmethod
    def _gpu_count(cls, value: object) -> int | str:
        if value == "auto":
            return value
        try:
            count = int(value)  # type: ignore[call-overload]
        except (TypeError, ValueError):
            count = -1
        if count < 0 or isinstance(value, float) and value != count:
            raise ValueError(f"'auto' or a number of GPUs (0 or more), not {value!r}")
        return count

    def resolved(self) -> Settings:
        """Fill the defaults that derive from ``home``."""
        home = self.home.expanduser()
        return self.model_copy(
            update={
                "home": home,
                "database_url": self.database_url or f"sqlite:///{home / 'torchyard.db'}",
                "broker_url": self.broker_url or "filesystem://",
                "artifacts_url": self.artifacts_url or str(home / "artifacts"),
                "scratch_dir": self.scratch_dir or str(home / "scratch"),
                "url": self.url or f"http://{self.host}:{self.port}",
            }
        )

    @property
    def limits(self) -> Limits:
        """The spec limits this deployment enforces."""
        return Limits(
            max_parameters=self.max_parameters,
            max_layers=self.max_layers,
            max_epochs=self.max_epochs,
            max_samples=self.max_samples,
            max_runtime_seconds=self.max_runtime_seconds,
            max_generator_setup=self.max_generator_setup,
            max_job_memory=self.max_job_memory,
        )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Build settings from ``TORCHYARD_*`` variables; unknown ones are an error, not ignored."""
        environ = os.environ if environ is None else environ
        values = {}
        for key, value in environ.items():
            if not key.startswith(PREFIX):
                continue
            field = key[len(PREFIX) :].lower()
            if field not in cls.model_fields:
                known = ", ".join(PREFIX + name.upper() for name in cls.model_fields)
                raise ValueError(f"unknown setting {key}; known settings: {known}")
            values[field] = value
        try:
            return cls(**values).resolved()
        except ValidationError as exc:  # name the variable, not the field
            problems = "; ".join(f"{PREFIX}{'.'.join(map(str, e['loc'])).upper()}: {e['msg']}" for e in exc.errors())
            raise ValueError(problems) from None


@functools.cache
def get_settings() -> Settings:
    """The process-wide settings, read from the environment on first use."""
    return Settings.from_env()
