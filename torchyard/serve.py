"""``torchyard serve``: the whole service on one machine — migrations, the API, one worker that is restarted
when it dies, and the maintenance loop that reaps and explains jobs even while no worker is alive."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable

from models.settings import Settings, get_settings

WORKER_STOP_SECONDS = 60  # a warm shutdown checkpoints running jobs and requeues them; then we insist
QUICK_DEATH_SECONDS = 60  # a worker that dies sooner than this after its start counts towards giving up
MAX_RESTART_DELAY = 30  # seconds; the backoff doubles up to this
LOCAL_USER = "local"  # the user of the key serve prints


def local_token(settings: Settings) -> str:
    """The API key of user 'local', kept in TORCHYARD_HOME/token; made when missing or no longer valid
    (revoked, expired). 'local' is made an admin: on one machine, whoever runs serve runs the service."""
    from models import accounts
    from models.db import make_engine, make_sessionmaker
    from models.tables import utcnow

    path = settings.home / "token"
    engine = make_engine(settings.database_url)
    try:
        with make_sessionmaker(engine)() as session:
            saved = path.read_text().strip() if path.is_file() else ""
            key = accounts.key_for_token(session, saved) if saved else None
            if key is not None and accounts.refusal(key, utcnow()) is None:
                return saved
            if accounts.find_user(session, LOCAL_USER) is None:
                accounts.create_user(session, LOCAL_USER, role="admin")
            token = accounts.create_api_key(session, LOCAL_USER, "torchyard serve")
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


def how_it_ended(returncode: int) -> str:
    """``killed by SIGKILL`` or ``exited with status 1``."""
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with status {returncode}"


def say(line: str) -> None:
    """One line from serve itself on stderr, apart from the worker's log."""
    print(f"torchyard serve: {line}", file=sys.stderr, flush=True)


class WorkerSupervisor:
    """Keeps one worker running: reports a worker that exits unexpectedly, ends what is left of it and starts
    another after a backoff (1 s, then doubling while it keeps dying within QUICK_DEATH_SECONDS of its start);
    gives up after ``max_restarts`` such quick deaths in a row.

    ``watch`` runs in a thread; ``on_give_up`` is called from it when the supervisor gives up.
    """

    def __init__(self, start: Callable[[], subprocess.Popen], max_restarts: int, on_give_up: Callable[[], None]):
        self._start, self._max_restarts, self._on_give_up = start, max_restarts, on_give_up
        self._lock = threading.Lock()  # no restart once stop() has begun
        self._stopping = threading.Event()
        self.gave_up = False
        self.worker = start()

    def watch(self) -> None:
        """Wait for the worker to exit; restart it unless ``stop`` was asked, or give up."""
        quick_deaths = 0
        while True:
            worker, started = self.worker, time.monotonic()
            returncode = worker.wait()
            if self._stopping.is_set():
                return
            end_leftovers(worker)
            quick_deaths = quick_deaths + 1 if time.monotonic() - started < QUICK_DEATH_SECONDS else 0
            if quick_deaths > self._max_restarts:
                say(f"the worker (pid {worker.pid}) died: {how_it_ended(returncode)}; it died {quick_deaths} times "
                    f"in a row, each within {QUICK_DEATH_SECONDS} s of its start: giving up (its log is above)")
                self.gave_up = True
                self._on_give_up()
                return
            delay = min(2 ** max(quick_deaths - 1, 0), MAX_RESTART_DELAY)  # 1 s; quick deaths: 1, 2, 4 s…
            say(f"the worker (pid {worker.pid}) died: {how_it_ended(returncode)}; restarting it in {delay} s")
            if self._stopping.wait(delay):
                return
            with self._lock:
                if self._stopping.is_set():
                    return
                self.worker = self._start()
            say(f"worker restarted (pid {self.worker.pid})")

    def stop(self) -> int:
        """Stop supervising and stop the worker (warm shutdown); its exit status."""
        with self._lock:
            self._stopping.set()
        return stop_worker(self.worker)


def end_leftovers(worker: subprocess.Popen) -> None:
    """SIGKILL what is left of a worker whose main process died.

    Celery's pool processes die with it (PDEATHSIG), but what they started need not: the other ranks of a
    data-parallel job would hold the CPUs or GPUs the new worker needs. With them gone, the job's lease
    runs out and the reaper requeues it; it resumes from its checkpoint.
    """
    with contextlib.suppress(ProcessLookupError):  # nothing was left
        os.killpg(worker.pid, signal.SIGKILL)  # the worker leads its own process group (start_new_session)


def _interrupt(_signum, _frame) -> None:
    raise KeyboardInterrupt


def serve(host: str | None = None, port: int | None = None) -> None:
    """Migrate the database, print the URL and token, then run the API, a supervised worker and the
    maintenance loop until Ctrl-C or SIGTERM; exit 1 when the worker keeps dying at start."""
    from werkzeug.serving import run_simple

    from api import create_app
    from api.http_server import request_handler
    from migrations.apply import upgrade
    from worker.context import context
    from worker.maintenance import start_sweeping

    settings = get_settings()
    host, port = host or settings.host, port or settings.port
    upgrade(settings.database_url)
    token = local_token(settings)
    # The first URL is the one to open: the dashboard (sign in with the token), which links the API's docs.
    print(f"torchyard:     http://{host}:{port}/   (the dashboard; API docs at /docs)", flush=True)
    print(f"API:           http://{host}:{port}/api/v1", flush=True)
    print(f"token:         {token}   (saved in {settings.home / 'token'})", flush=True)
    # SIGTERM (systemd, docker stop, kill) stops like Ctrl-C, so the worker is never left behind; the
    # supervisor sends it to us when it gives up.
    signal.signal(signal.SIGTERM, _interrupt)
    supervisor = WorkerSupervisor(lambda: start_worker(settings), settings.serve_worker_restarts,
                                  on_give_up=lambda: os.kill(os.getpid(), signal.SIGTERM))
    threading.Thread(target=supervisor.watch, name="torchyard-supervisor", daemon=True).start()
    stop_sweeping = start_sweeping(context())  # in this process: it outlives any worker
    try:
        # Returns on Ctrl-C. The handler: `torchyard api`'s limits and read timeout, its refusals problem+json.
        run_simple(host, port, create_app(), threaded=True, request_handler=request_handler(settings))
    finally:
        stop_sweeping.set()
        if not supervisor.gave_up:
            print("stopping the worker (running jobs are checkpointed and requeued)…", flush=True)
        supervisor.stop()
    if supervisor.gave_up:
        sys.exit(1)
