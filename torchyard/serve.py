"""``torchyard serve``: the whole service on one machine — migrations, the API (under gunicorn, as ``torchyard
api`` runs it), one worker that is restarted when it dies, and the maintenance loop that reaps and explains jobs
even while no worker is alive."""

from __future__ import annotations

import contextlib
import http.client
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable

from models.settings import Settings, get_settings

WORKER_STOP_SECONDS = 60  # a warm shutdown checkpoints running jobs and requeues them; then we insist
QUICK_DEATH_SECONDS = 60  # a worker that dies sooner than this after its start counts towards giving up
MAX_RESTART_DELAY = 30  # seconds; the backoff doubles up to this
LOCAL_USER = "local"  # the user of the key serve saves
API_START_SECONDS = 60  # the API must answer within this; else serve says why and stops
# On stop, requests in flight get this long to finish. An open metrics stream (a dashboard tab following a job)
# never ends by itself: without a short bound it would hold Ctrl-C for gunicorn's default 30 s.
API_GRACEFUL_SECONDS = 5
# The Celery worker's warning when it runs as root (a container's default user): Celery fears a message that
# unpickles into code run as root. Our workers accept JSON only (worker/celery_app.py), and were pickle ever
# accepted Celery would refuse to start as root (SecurityError, unless C_FORCE_ROOT, which serve doesn't set):
# the warning can't apply here, so serve's worker drops it. `torchyard worker` keeps it: its images run as a user.
ROOT_WARNING = "ignore:You're running the worker with superuser privileges"


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
    """One worker over the configured queues, in its own process group so Ctrl-C reaches only us; without
    Celery's banner (serve prints its own)."""
    from worker.processes import worker_argv

    argv = worker_argv(worker_queues(settings), settings.worker_concurrency, loglevel)
    return subprocess.Popen([sys.executable, "-W", ROOT_WARNING, "-m", "celery", "-A", "worker.celery_app", "--quiet",
                             *argv], start_new_session=True)


def worker_queues(settings: Settings) -> list[str]:
    """The queues of serve's worker (TORCHYARD_WORKER_QUEUES)."""
    return [queue.strip() for queue in settings.worker_queues.split(",") if queue.strip()]


def api_argv(settings: Settings, host: str, port: int, access_log: bool = False) -> list[str]:
    """The API under gunicorn, as ``torchyard api`` runs it (the same worker class, limits, read timeout and
    metrics hooks), with one process: the rate-limit counts then live in its memory (api/rate_limits.py).
    Quiet: warnings only, and an access log only when asked. ValueError for settings that can't serve."""
    from api.gunicorn_worker import gunicorn_argv

    options = ["--log-level", "warning", "--graceful-timeout", str(API_GRACEFUL_SECONDS)]
    if access_log:
        options += ["--access-logfile", "-"]
    return gunicorn_argv(settings, f"{_bracketed(host)}:{port}", workers=1, options=options)


def start_api(argv: list[str]) -> subprocess.Popen:
    """gunicorn with ``argv``, in its own process group (as the worker: Ctrl-C reaches only us)."""
    from api.gunicorn_hooks import VARIABLE, metrics_directory

    # Its processes write their request metrics there, and /metrics sums them (api/gunicorn_hooks.py).
    env = {**os.environ, VARIABLE: metrics_directory()}
    return subprocess.Popen([sys.executable, "-m", *argv], env=env, start_new_session=True)


def wait_for_api(api: subprocess.Popen, url: str, timeout: float = API_START_SECONDS) -> bool:
    """Whether the API at ``url`` answered GET /api/v1/health before ``timeout`` (ok, or 503 while the worker
    starts); False at once when it exited. /health counts against no rate limit: asking it spends no budget of
    the machine's own address."""
    parsed = urllib.parse.urlsplit(url)
    deadline = time.monotonic() + timeout
    while api.poll() is None and time.monotonic() < deadline:
        connection = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=5)  # no proxy, unlike urllib
        try:
            connection.request("GET", "/api/v1/health")
            if connection.getresponse().status in (200, 503):
                return True
        except OSError:  # not listening yet
            pass
        finally:
            connection.close()
        time.sleep(0.1)
    return False


def stop_worker(worker: subprocess.Popen, timeout: float = WORKER_STOP_SECONDS) -> int:
    """Warm shutdown (SIGTERM: running jobs checkpoint and go back to the queue), then a kill if it hangs."""
    return stop_group(worker, timeout)


def stop_group(process: subprocess.Popen, timeout: float) -> int:
    """SIGTERM ``process`` (once; it leads its own process group), wait up to ``timeout``, then SIGKILL its
    whole group (the worker's pool children, gunicorn's workers); its exit status."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # its children too; the reaper requeues a killed worker's jobs
            process.wait()
    return process.returncode


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


def serve(host: str | None = None, port: int | None = None, access_log: bool = False) -> None:
    """Migrate the database, start the API and a supervised worker, print where everything is, and run the
    maintenance loop until Ctrl-C or SIGTERM; exit 1 when the API stops or the worker keeps dying at start."""
    from migrations.apply import upgrade
    from worker.context import context
    from worker.maintenance import start_sweeping

    settings = get_settings()
    host, port = host or settings.host, port or settings.port
    url = f"http://{_browsable(host)}:{port}"
    try:
        argv = api_argv(settings, host, port, access_log)
    except ValueError as error:
        say(f"can't start: {error}")
        sys.exit(2)
    upgrade(settings.database_url)
    local_token(settings)
    # After the migration: Alembic logs its steps when logging is set up. This process logs the maintenance.
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s: %(levelname)s/serve] %(message)s")
    # SIGTERM (systemd, docker stop, kill) stops like Ctrl-C, so nothing is left behind; the supervisor sends
    # it to us when it gives up.
    signal.signal(signal.SIGTERM, _interrupt)
    api = start_api(argv)
    supervisor = WorkerSupervisor(lambda: start_worker(settings), settings.serve_worker_restarts,
                                  on_give_up=lambda: os.kill(os.getpid(), signal.SIGTERM))
    threading.Thread(target=supervisor.watch, name="torchyard-supervisor", daemon=True).start()
    stop_sweeping = start_sweeping(context())  # in this process: it outlives any worker
    api_failed = False
    try:
        if wait_for_api(api, url):
            print(banner(settings, host, port, url), flush=True)
            api.wait()  # until it dies; Ctrl-C and SIGTERM end the wait with KeyboardInterrupt
        api_failed = True
        say(f"the API (gunicorn, pid {api.pid}) "
            + (f"stopped: {how_it_ended(api.returncode)}" if api.poll() is not None
               else f"did not answer within {API_START_SECONDS} s") + "; stopping (its log is above)")
    except KeyboardInterrupt:
        pass
    finally:
        stop_sweeping.set()
        if not supervisor.gave_up:
            print("stopping the API and the worker (running jobs are checkpointed and requeued)…", flush=True)
        if api.poll() is None:
            api.send_signal(signal.SIGTERM)  # both stop at once
        supervisor.stop()
        stop_group(api, API_GRACEFUL_SECONDS + 10)
    if supervisor.gave_up or api_failed:
        sys.exit(1)


def banner(settings: Settings, host: str, port: int, url: str) -> str:
    """What serve prints once the API answers: where to go and where everything is."""
    from sqlalchemy.engine import make_url

    def hidden(value: str) -> str:  # a password in a URL stays out of logs
        return make_url(value).render_as_string(hide_password=True)

    broker = hidden(settings.broker_url)
    if broker == "filesystem://":
        broker = f"filesystem:// (folders under {settings.home / 'broker'})"
    listening = "" if _browsable(host) == host else f"   (listening on {host}:{port})"
    lines = [
        "torchyard serve is ready",
        f"  dashboard:  {url}/{listening}",  # the one to open: it signs in with the token and links the docs
        f"  API:        {url}/api/v1   (docs at {url}/docs)",
        f"  token:      {settings.home / 'token'}   (the dashboard's sign-in; the torchyard CLI reads it)",
        f"  database:   {hidden(settings.database_url)}",
        f"  broker:     {broker}",
        f"  artifacts:  {settings.artifacts_url}",
        f"  worker:     queues {','.join(worker_queues(settings))}, {settings.worker_concurrency} at a time"
        " (restarted if it dies)",
        "Ctrl-C stops it; running jobs are checkpointed and requeued.",
    ]
    return "\n".join(lines)


def _browsable(host: str) -> str:
    """The host of a URL that reaches a server listening on ``host`` from this machine."""
    if host in ("", "0.0.0.0"):  # every IPv4 address: loopback is one
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return _bracketed(host)


def _bracketed(host: str) -> str:
    """An IPv6 address in brackets, as URLs and gunicorn's --bind write it."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
