"""``torchyard serve``: the whole service on one machine — migrations, the API and one worker."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from models.settings import Settings, get_settings

WORKER_STOP_SECONDS = 60  # a warm shutdown checkpoints running jobs and requeues them; then we insist


def local_token(settings: Settings) -> str:
    """The API key of user 'local', kept in TORCHYARD_HOME/token; made when missing or no longer valid."""
    from sqlalchemy import select

    from api.auth import create_api_key, hash_token
    from models.db import make_engine, make_sessionmaker
    from models.tables import ApiKey

    path = settings.home / "token"
    engine = make_engine(settings.database_url)
    try:
        with make_sessionmaker(engine)() as session:
            saved = path.read_text().strip() if path.is_file() else ""
            valid = saved and session.scalar(select(ApiKey.id).where(ApiKey.key_hash == hash_token(saved),
                                                                     ApiKey.revoked_at.is_(None)))
            if valid:
                return saved
            token = create_api_key(session, "local", "torchyard serve")
    finally:
        engine.dispose()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.write_text(token + "\n")
    return token


def start_worker(settings: Settings, loglevel: str = "INFO") -> subprocess.Popen:
    """One worker over the configured queues, in its own process group so Ctrl-C reaches only us."""
    from worker.processes import worker_argv

    queues = [queue.strip() for queue in settings.worker_queues.split(",") if queue.strip()]
    argv = worker_argv(queues, settings.worker_concurrency, loglevel)
    return subprocess.Popen([sys.executable, "-m", "celery", "-A", "worker.celery_app", *argv],
                            start_new_session=True)


def stop_worker(worker: subprocess.Popen, timeout: float = WORKER_STOP_SECONDS) -> int:
    """Warm shutdown (SIGTERM: running jobs checkpoint and go back to the queue), then a kill if it hangs."""
    if worker.poll() is None:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)  # its pool children too; the reaper requeues their jobs
            worker.wait()
    return worker.returncode


def _interrupt(_signum, _frame) -> None:
    raise KeyboardInterrupt


def serve(host: str | None = None, port: int | None = None) -> None:
    """Migrate the database, print the URL and token, run one worker and the API until Ctrl-C."""
    from werkzeug.serving import run_simple

    from api import create_app
    from migrations.apply import upgrade

    settings = get_settings()
    host, port = host or settings.host, port or settings.port
    upgrade(settings.database_url)
    token = local_token(settings)
    print(f"torchyard API: http://{host}:{port}/api/v1", flush=True)
    print(f"token:         {token}   (saved in {settings.home / 'token'})", flush=True)
    worker = start_worker(settings)
    # SIGTERM (systemd, docker stop, kill) stops like Ctrl-C, so the worker is never left behind.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        run_simple(host, port, create_app(), threaded=True)  # returns on Ctrl-C
    finally:
        print("stopping the worker (running jobs are checkpointed and requeued)…", flush=True)
        stop_worker(worker)
