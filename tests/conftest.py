"""Shared pytest fixtures. Each group sits under its own header; add yours as a new group."""

from __future__ import annotations

import contextlib
import copy
import datetime as dt
import os
import secrets
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import psycopg
import pytest
from specs import circles_spec
from sqlalchemy.engine import make_url

# ==================================================================================================
# API, database and migrations (api/, migrations/apply.py, models/storage.py)
# ==================================================================================================

# The PostgreSQL server these tests need; they fail (never skip) when it is not there.
POSTGRES_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/test"

CIRCLES_SPEC = circles_spec("circles-mlp", epochs=5, lr=0.1)
# Rate-limit budgets that test deployments never reach unless a test sets its own (tests/test_rate_limits.py):
# the fuzz and hostile tests send hundreds of requests with one key within a minute.
GENEROUS_RATE_LIMITS = {f"rate_limit_{budget}": "100000/minute" for budget in ("submit", "read", "upload")}


@pytest.fixture
def spec() -> dict:
    """A small valid job spec (a fresh copy each test may change)."""
    return copy.deepcopy(CIRCLES_SPEC)


def _admin_connection() -> psycopg.Connection:
    try:
        return psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        pytest.fail(f"PostgreSQL is required at {POSTGRES_ADMIN_URL} and is not reachable: {exc}")


@contextlib.contextmanager
def _postgres_database(template: str | None = None):
    """A new PostgreSQL database (a copy of ``template``, else empty); its SQLAlchemy URL; dropped after."""
    name = f"torchyard_test_{secrets.token_hex(6)}"
    with _admin_connection() as conn:
        conn.execute(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else ""))
    url = make_url(POSTGRES_ADMIN_URL).set(drivername="postgresql+psycopg", database=name)
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with _admin_connection() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def empty_postgres_url():
    """A fresh, empty PostgreSQL database (SQLAlchemy URL), dropped after the test."""
    with _postgres_database() as url:
        yield url


@pytest.fixture(scope="session")
def migrated_postgres() -> str:
    """The name of a PostgreSQL database migrated to head once a session: the tests' databases copy it."""
    from migrations.apply import upgrade

    with _postgres_database() as url:
        upgrade(url)  # its engine is gone when it returns: a database with a connection can't be a template
        yield make_url(url).database


@pytest.fixture
def empty_sqlite_url(tmp_path) -> str:
    """A SQLite database file that doesn't exist yet."""
    return f"sqlite:///{tmp_path / 'torchyard.db'}"


@pytest.fixture(scope="session")
def migrated_sqlite(tmp_path_factory) -> str:
    """A SQLite database file migrated to head once a session: the tests' databases copy it."""
    from migrations.apply import upgrade

    path = tmp_path_factory.mktemp("migrated") / "head.db"
    upgrade(f"sqlite:///{path}")
    return str(path)


@pytest.fixture
def sqlite_url(empty_sqlite_url, migrated_sqlite) -> str:
    """A SQLite database migrated to head: a copy of the session's (migrating costs a tenth of a second a test;
    tests/test_migrations.py runs the migrations themselves)."""
    with contextlib.closing(sqlite3.connect(migrated_sqlite)) as head, \
            contextlib.closing(sqlite3.connect(make_url(empty_sqlite_url).database)) as new:
        head.backup(new)
    return empty_sqlite_url


@pytest.fixture
def postgres_url(migrated_postgres) -> str:
    """A PostgreSQL database migrated to head: a copy of the session's, dropped after the test."""
    with _postgres_database(template=migrated_postgres) as url:
        yield url


@pytest.fixture
def database_url(sqlite_url) -> str:
    """The database the app fixture uses; test modules may override it (e.g. over both backends)."""
    return sqlite_url


class RecordingPublisher:
    """Records what the API publishes instead of ringing a broker: the one true edge of the API tests."""

    def __init__(self):
        self.published: list[tuple[str, str]] = []

    def publish(self, job_id: str, queue: str) -> None:
        self.published.append((job_id, queue))


@pytest.fixture
def publisher() -> RecordingPublisher:
    """The publisher that ``make_app``'s apps publish through."""
    return RecordingPublisher()


@pytest.fixture
def published(publisher) -> list[tuple[str, str]]:
    """(job id, queue) of each job the API published, in order."""
    return publisher.published


@pytest.fixture
def live_worker(sessions) -> str:
    """A worker row serving the queues of jobs of up to 8 GPUs with room to spare, so the API's dispatcher
    releases each submitted job at once: the API tests' stand-in for a running worker (its heartbeat stays
    fresh for a day)."""
    from models.queues import QUEUES
    from models.tables import Worker, utcnow

    with sessions() as session:
        session.add(Worker(id="test-worker:1", hostname="test", queues=",".join(QUEUES[:10]), slots=100_000,
                           last_heartbeat_at=utcnow() + dt.timedelta(days=1)))
        session.commit()
    return "test-worker:1"


@pytest.fixture
def artifacts_url(tmp_path) -> str:
    """The artifact store's root folder."""
    return str(tmp_path / "artifacts")


@pytest.fixture
def make_app(database_url, artifacts_url, publisher):
    """Build apps over the test's database and artifact folder, publishing through ``publisher``; keyword
    arguments override settings (``publisher=None``: a real one for the broker the settings name)."""
    from api import create_app

    apps = []

    def make_app(publisher=publisher, **overrides):
        # Counted in the app's memory, even where a test names a Redis broker.
        config = {"TESTING": True, "database_url": database_url, "artifacts_url": artifacts_url,
                  "broker_url": "filesystem://", **GENEROUS_RATE_LIMITS, "rate_limit_storage_url": "memory://",
                  **overrides}
        apps.append(create_app(config, publisher))
        return apps[-1]

    yield make_app
    for app in apps:
        app.extensions["torchyard"].engine.dispose()


@pytest.fixture
def app(make_app):
    """The API over a real migrated database and a real artifact folder."""
    return make_app()


@pytest.fixture
def client(app):
    """Flask's test client."""
    return app.test_client()


@pytest.fixture
def sessions(app):
    """A session factory on the app's database, for arranging and checking rows directly."""
    return app.extensions["torchyard"].sessions


@pytest.fixture
def store(app):
    """The app's artifact store."""
    return app.extensions["torchyard"].store


@pytest.fixture
def tokens(sessions) -> dict[str, str]:
    """API keys of two users, alice and bob."""
    from api.auth import create_api_key

    with sessions() as session:
        return {name: create_api_key(session, name, "test") for name in ("alice", "bob")}


@pytest.fixture
def alice(tokens) -> dict[str, str]:
    """Request headers authenticating as alice."""
    return {"Authorization": f"Bearer {tokens['alice']}"}


@pytest.fixture
def bob(tokens) -> dict[str, str]:
    """Request headers authenticating as bob."""
    return {"Authorization": f"Bearer {tokens['bob']}"}


@contextlib.contextmanager
def served(app):
    """``app`` served over real HTTP by werkzeug's threaded server, in a thread; yields its base URL."""
    from werkzeug.serving import make_server

    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join(timeout=10)


@pytest.fixture
def live_server(app):
    """The app served over real HTTP by werkzeug in a thread; yields its base URL."""
    with served(app) as url:
        yield url


@pytest.fixture
def set_job(sessions):
    """Change a job's columns as a worker would (claim, progress, finish)."""
    from sqlalchemy import update

    from models.tables import Job

    def set_job(job_id: str, **values) -> None:
        with sessions() as session:
            session.execute(update(Job).where(Job.id == job_id).values(**values))
            session.commit()

    return set_job


@pytest.fixture
def add_artifact(sessions, store):
    """Store a file of a job and its row, under the key layout workers use (``jobs/<id>/<name>``), counted in its
    user's stored bytes as a worker's write counts it."""
    from models.quotas import restate_stored_bytes
    from models.storage import job_prefix
    from models.tables import Artifact

    def add_artifact(job_id: str, kind: str, name: str, data: bytes, epoch: int | None = None) -> Artifact:
        uri, size, sha256 = store.put_bytes(data, f"{job_prefix(job_id)}/{name}")
        artifact = Artifact(job_id=job_id, kind=kind, name=name, uri=uri, size=size, sha256=sha256,
                            epoch=epoch)
        with sessions() as session:
            session.add(artifact)
            session.flush()
            restate_stored_bytes(session, job_id)
            session.commit()
        return artifact

    return add_artifact


# ==================================================================================================
# Workers (worker/: celery_app, runner, maintenance): real `celery worker` processes, real brokers
# ==================================================================================================

# The shared Redis server; worker tests use their own db number and flush it before and after.
REDIS_TEST_URL = "redis://127.0.0.1:6379/7"
# Short enough that leases expire and reapers act within a test; long enough for a busy 2-core machine.
FAST_RELIABILITY = {"heartbeat_seconds": 1, "lease_seconds": 6, "reconcile_seconds": 3}


def worker_settings(home, **fields):
    """Settings of a test deployment under ``home`` (SQLite, filesystem broker and store by default)."""
    from models.settings import Settings

    return Settings(home=home, **{**FAST_RELIABILITY, **GENEROUS_RATE_LIMITS, **fields}).resolved()


def settings_env(settings) -> dict[str, str]:
    """This process's environment without TORCHYARD_* variables, plus ``settings`` as variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TORCHYARD_")}
    for name, value in settings.model_dump().items():
        env[f"TORCHYARD_{name.upper()}"] = str(value)
    return env


def wait_for(predicate, timeout: float = 60, what: str = "condition", log=None):
    """Poll ``predicate`` until it returns something truthy; fail naming ``what`` (and the worker log)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    tail = f"\n--- worker log ---\n{log()}" if log else ""
    pytest.fail(f"timed out after {timeout} s waiting for {what}{tail}")


class WorkerProcess:
    """``python -m celery -A worker.celery_app worker`` with the CLI's arguments, in its own process group."""

    def __init__(self, settings, queues=("cpu",), concurrency: int = 1, name: str = "worker"):
        from worker.processes import worker_argv

        self.log_path = settings.home / f"{name}.log"
        argv = worker_argv(list(queues), concurrency, "INFO")
        with open(self.log_path, "ab") as log:
            command = [sys.executable, "-m", "celery", "-A", "worker.celery_app", *argv]
            self.process = subprocess.Popen(command, env=settings_env(settings), stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        self.worker_id = None

    def log(self, lines: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def wait_registered(self, sessions, timeout: float = 60) -> str:
        """Wait for the worker's row in the registry (it is consuming by then); return its id."""
        from sqlalchemy import select

        from models.tables import Worker

        def registered():
            assert self.process.poll() is None, f"the worker exited:\n{self.log()}"
            with sessions() as session:
                ids = session.scalars(select(Worker.id)).all()
            return next((i for i in ids if i.endswith(f":{self.process.pid}")), None)

        self.worker_id = wait_for(registered, timeout, "the worker to register", self.log)
        return self.worker_id

    def stop(self, timeout: float = 60) -> int:
        """A warm shutdown (SIGTERM), as ``torchyard serve`` does it."""
        from torchyard.serve import stop_worker

        return stop_worker(self.process, timeout)

    def kill(self) -> None:
        """SIGKILL the whole process group: a machine that vanished."""
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()


class Service:
    """A test deployment: the API (Flask test client, publishing to the real broker) over ``settings``, and
    its workers."""

    def __init__(self, settings):
        from api import create_app
        from api.auth import create_api_key

        self.settings = settings
        self.app = create_app({"TESTING": True, **settings.model_dump()})
        services = self.app.extensions["torchyard"]
        self.sessions, self.store, self.publisher = services.sessions, services.store, services.publisher
        self.client = self.app.test_client()
        with self.sessions() as session:
            self.headers = {"Authorization": f"Bearer {create_api_key(session, 'alice', 'test')}"}
        self.workers: list[WorkerProcess] = []

    def start_worker(self, queues=("cpu",), name: str | None = None, concurrency: int = 1) -> WorkerProcess:
        worker = WorkerProcess(self.settings, queues, concurrency, name=name or f"worker-{len(self.workers)}")
        self.workers.append(worker)
        worker.wait_registered(self.sessions)
        return worker

    def log(self) -> str:
        return "\n".join(f"[{w.log_path.name}]\n{w.log()}" for w in self.workers)

    def wait_for(self, predicate, timeout: float = 60, what: str = "condition"):
        """``wait_for`` that shows the workers' logs when it times out."""
        return wait_for(predicate, timeout, what, self.log)

    def submit(self, spec: dict) -> str:
        response = self.client.post("/api/v1/jobs", json=spec, headers=self.headers)
        assert response.status_code == 201, response.get_json()
        return response.get_json()["id"]

    def job(self, job_id: str) -> dict:
        response = self.client.get(f"/api/v1/jobs/{job_id}", headers=self.headers)
        assert response.status_code == 200, response.get_json()
        return response.get_json()

    def wait_status(self, job_id: str, statuses=("succeeded", "failed", "cancelled"), timeout: float = 90):
        """Poll the job over the API until its status is one of ``statuses``; return the job."""
        def reached():
            job = self.job(job_id)
            return job if job["status"] in statuses else None

        return wait_for(reached, timeout, f"job {job_id} to be {'/'.join(statuses)}", self.log)

    def close(self) -> None:
        for worker in self.workers:
            if worker.process.poll() is None:
                worker.kill()
        self.app.extensions["torchyard"].engine.dispose()


@contextlib.contextmanager
def running_service(settings, queues=("cpu",), concurrency: int = 1):
    """Migrate, start the API and one worker (of ``concurrency`` slots); yield the deployment."""
    from migrations.apply import upgrade

    upgrade(settings.database_url)
    service = Service(settings)
    try:
        service.start_worker(queues, concurrency=concurrency)
        yield service
    finally:
        service.close()


def flushed_redis(url: str = REDIS_TEST_URL):
    """The test Redis db, emptied; fail (never skip) when the server is not there."""
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=5)
    try:
        client.flushdb()
    except redis.RedisError as exc:
        pytest.fail(f"Redis is required at {url} and is not reachable: {exc}")
    return client


@pytest.fixture(scope="module")
def embedded_service(tmp_path_factory):
    """The embedded default: SQLite, filesystem broker and local store in a temporary home; one worker."""
    settings = worker_settings(tmp_path_factory.mktemp("home"))
    with running_service(settings) as service:
        yield service


@pytest.fixture
def own_embedded_service(tmp_path):
    """An embedded deployment of the test's own, for tests that kill or stop its workers."""
    with running_service(worker_settings(tmp_path / "home")) as service:
        yield service


@pytest.fixture
def serve_deployment(tmp_path):
    """Settings of an embedded deployment on a free port, and the environment that selects them."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings = worker_settings(tmp_path / "home", port=port)
    return settings, settings_env(settings)


@pytest.fixture(scope="module")
def production_service(tmp_path_factory):
    """PostgreSQL (a fresh database) and Redis (db 7, flushed before and after); one worker."""
    redis_client = flushed_redis()
    name = f"torchyard_test_{secrets.token_hex(6)}"
    with _admin_connection() as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = make_url(POSTGRES_ADMIN_URL).set(drivername="postgresql+psycopg", database=name)
    settings = worker_settings(tmp_path_factory.mktemp("home"), broker_url=REDIS_TEST_URL,
                               database_url=url.render_as_string(hide_password=False))
    try:
        with running_service(settings) as service:
            yield service
    finally:
        redis_client.flushdb()
        with _admin_connection() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgresql"])
def worker_context(request, tmp_path):
    """A worker's Services over a migrated database of each kind, publishing to the deployment's
    filesystem broker under ``tmp_path``."""
    from migrations.apply import upgrade
    from models.services import make_services

    url = request.getfixturevalue("postgres_url" if request.param == "postgresql" else "sqlite_url")
    settings = worker_settings(tmp_path / "home", database_url=url)
    upgrade(url)
    services = make_services(settings)
    yield services
    services.engine.dispose()


# ==================================================================================================
# Servers that tests flush, stop or restart (tests/test_chaos_servers.py): a private Redis and a private
# PostgreSQL on free ports (tests/private_servers.py), and the API under gunicorn over real HTTP
# ==================================================================================================


@pytest.fixture
def private_redis(tmp_path):
    """A Redis server of the test's own (no persistence), to flush or restart; fails if it can't start."""
    from private_servers import PrivateRedis

    server = PrivateRedis(tmp_path / "redis")
    yield server
    server.close()


@pytest.fixture
def private_postgres():
    """A PostgreSQL cluster of the test's own, to stop or restart; fails if it can't start."""
    from private_servers import PrivatePostgres

    server = PrivatePostgres()
    yield server
    server.close()


class HttpService(Service):
    """A Service whose jobs go in and come back through ``torchyard api`` (gunicorn) over real HTTP, with the
    ``torchyard.client`` SDK; ``sessions`` still reads the rows directly."""

    def __init__(self, settings):
        from private_servers import ApiServer

        from torchyard.client import Client

        super().__init__(settings)
        self.api = ApiServer(settings_env(settings), settings.home / "api.log")
        self.http = Client(self.api.url, self.headers["Authorization"].removeprefix("Bearer "))

    def submit(self, spec: dict) -> str:
        return self.http.submit(spec)["id"]

    def job(self, job_id: str) -> dict:
        return self.http.job(job_id)

    def wait_status(self, job_id: str, statuses=("succeeded", "failed", "cancelled"), timeout: float = 90):
        """Poll the job over HTTP until its status is one of ``statuses``, riding out a server's outage."""
        from torchyard.client import ApiError

        def reached():
            try:
                job = self.job(job_id)
            except ApiError as error:
                if error.status < 500:
                    raise
                return None  # a dependency is down (503/500): ask again
            except OSError:
                return None
            return job if job["status"] in statuses else None

        return wait_for(reached, timeout, f"job {job_id} to be {'/'.join(statuses)}", self.log)

    def log(self) -> str:
        return f"{super().log()}\n[api.log]\n{self.api.log()}"

    def close(self) -> None:
        super().close()
        self.api.stop()


@pytest.fixture
def http_deployment(tmp_path):
    """Start deployments over given database and broker URLs: the API under gunicorn and ``workers``
    worker processes (FAST_RELIABILITY unless overridden); all stopped after the test."""
    from migrations.apply import upgrade

    services: list[HttpService] = []

    def start(database_url: str, broker_url: str, workers: int = 1, **fields) -> HttpService:
        home = tmp_path / f"home-{len(services)}"
        home.mkdir(parents=True)
        settings = worker_settings(home, database_url=database_url, broker_url=broker_url, **fields)
        upgrade(database_url)
        services.append(HttpService(settings))
        for _ in range(workers):
            services[-1].start_worker()
        return services[-1]

    yield start
    for service in services:
        service.close()


# ==================================================================================================
# Scale-out (tests/test_storage_s3.py, tests/test_scale_out.py): an S3 artifact store (moto's server
# mode, a real HTTP endpoint) and deployments of several "machines" sharing PostgreSQL, Redis and S3
# ==================================================================================================

# Scale-out tests' own Redis db (flushed before and after), apart from the other worker tests' db 7.
REDIS_SCALE_URL = "redis://127.0.0.1:6379/9"
AWS_TEST_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="session")
def moto_endpoint(tmp_path_factory):
    """moto's S3 server in a subprocess on a free port; its URL. Fails (never skips) if it can't start."""
    import socket
    import urllib.request

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log_path = tmp_path_factory.mktemp("moto") / "moto.log"
    env = {**os.environ, **AWS_TEST_ENV}
    with open(log_path, "ab") as log:
        process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                   env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"{url}/moto-api/", timeout=1).close()
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"moto's S3 server did not start (pip install 'moto[server]'):\n"
                            f"{log_path.read_text(errors='replace')[-3000:]}")
            time.sleep(0.1)
    yield url
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextlib.contextmanager
def s3_bucket(endpoint: str):
    """A fresh bucket on ``endpoint``, with this process's AWS variables pointing there (workers started
    meanwhile inherit them); yields its ``s3://`` URL and empties and deletes it afterwards."""
    import boto3
    import s3fs

    name = f"torchyard-test-{secrets.token_hex(6)}"
    with pytest.MonkeyPatch.context() as patch:
        for variable in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
            patch.delenv(variable, raising=False)
        for variable, value in {**AWS_TEST_ENV, "AWS_ENDPOINT_URL_S3": endpoint}.items():
            patch.setenv(variable, value)
        s3fs.S3FileSystem.clear_instance_cache()  # a cached client may point at another test's server
        client = boto3.client("s3", endpoint_url=endpoint)
        client.create_bucket(Bucket=name)
        try:
            yield f"s3://{name}"
        finally:
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):
                for item in page.get("Contents", []):
                    client.delete_object(Bucket=name, Key=item["Key"])
            client.delete_bucket(Bucket=name)
            s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def s3_url(moto_endpoint):
    """The URL of an empty bucket of the test's own on the moto server (AWS variables set)."""
    with s3_bucket(moto_endpoint) as url:
        yield url


def s3_keys(url: str) -> list[str]:
    """The keys of every object under an ``s3://bucket/prefix`` URL, listed with boto3 (not the store under test)."""
    import boto3

    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


def s3_objects(url: str) -> dict[str, bytes]:
    """Every object under an ``s3://bucket/prefix`` URL, read with boto3. Only for prefixes nothing writes to
    any more: a key pruned between the listing and the read raises NoSuchKey."""
    import boto3

    bucket = url.removeprefix("s3://").partition("/")[0]
    client = boto3.client("s3")
    return {key: client.get_object(Bucket=bucket, Key=key)["Body"].read() for key in s3_keys(url)}


@contextlib.contextmanager
def production_settings(home, redis_url: str = REDIS_SCALE_URL, **fields):
    """Settings over a fresh, migrated PostgreSQL database and a flushed Redis db (both cleaned up after);
    ``fields`` override the rest (artifacts_url, …)."""
    from migrations.apply import upgrade

    redis_client = flushed_redis(redis_url)
    name = f"torchyard_test_{secrets.token_hex(6)}"
    with _admin_connection() as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = make_url(POSTGRES_ADMIN_URL).set(drivername="postgresql+psycopg", database=name)
    try:
        settings = worker_settings(home, broker_url=redis_url, database_url=url.render_as_string(hide_password=False),
                                   **fields)
        upgrade(settings.database_url)
        yield settings
    finally:
        redis_client.flushdb()
        with _admin_connection() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# ==================================================================================================
# Users, keys, roles and the audit log (models/accounts.py, models/roles.py, models/audit.py)
# ==================================================================================================


@pytest.fixture
def admin(sessions) -> dict[str, str]:
    """Request headers authenticating as root, an admin."""
    from models import accounts

    with sessions() as session:
        accounts.create_user(session, "root", role="admin")
        return {"Authorization": f"Bearer {accounts.create_api_key(session, 'root', 'test')}"}
