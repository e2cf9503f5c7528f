"""The one typed settings object, built once from ``TORCHYARD_*`` environment variables."""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from models.spec import Limits

PREFIX = "TORCHYARD_"


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
    max_runtime_seconds: int = 24 * 3600

    # Reliability.
    max_attempts: int = 3
    lease_seconds: int = 60
    heartbeat_seconds: int = 10
    reconcile_seconds: int = 30

    # Processes.
    host: str = "127.0.0.1"
    port: int = 8000
    api_workers: int = 2  # gunicorn processes of ``torchyard api``
    worker_queues: str = "cpu"
    worker_concurrency: int = 1

    # The CLI as a client: which server, which key (default: the one ``torchyard serve`` saved).
    url: str = ""
    token: str = ""

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
