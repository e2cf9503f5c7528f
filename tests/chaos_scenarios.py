"""Fault-tolerance scenarios over the production stack, shared by tests/test_chaos_workers.py and bench/chaos.py.

A deployment is a fresh PostgreSQL database, a Redis db of its own, the API served over real HTTP by werkzeug
in a thread, and real ``celery worker`` processes (each in its own process group, so a SIGKILL or SIGSTOP hits
the main process and its pool child alike). Each scenario starts the workers it needs, does its damage,
waits for its jobs to end and returns an ``Outcome``: every job's final state as the API shows it, what a
watcher saw of the metric rows on the way (which attempt recorded which epoch), and scenario facts the tests
assert on. The bench only tabulates outcomes; the tests assert on them; neither repeats the machinery.

Jobs are slowed by data size only (600 rows, batches of 4): an epoch is a few tenths of a second on 2 cores.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as dt
import hashlib
import json
import os
import secrets
import signal
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from conftest import POSTGRES_ADMIN_URL, WorkerProcess, _admin_connection, flushed_redis, wait_for, worker_settings
from specs import long_spec
from sqlalchemy import select
from sqlalchemy.engine import make_url

from models.storage import job_prefix, sha256_file
from models.tables import Artifact, EpochMetrics, Job, Worker, utcnow

EPOCHS = 10
SPEC = long_spec(EPOCHS, n_samples=600, batch_size=4, seed=7, name="chaos")
FINAL = ("succeeded", "failed", "cancelled")
JOB_TIMEOUT = 180  # seconds a job may take to end; generous: other suites may share the 2 cores
# How Celery logs the end of an attempt that found its job taken over (a fenced write refused, or a file op
# failing because the new attempt removed the lost one's scratch folder, then the fenced failure refused).
LEASE_LOST = ": 'lease lost'"


def spec(name: str = "chaos", epochs: int = EPOCHS) -> dict:
    job_spec = {**copy.deepcopy(SPEC), "name": name}
    job_spec["training"]["epochs"] = epochs
    return job_spec


def uninterrupted_sha256(directory: Path) -> str:
    """SHA-256 of the weights of SPEC trained here, in one go (the reference for every resumed run)."""
    from models.validation import parse_spec
    from worker.engine import train

    result = train(parse_spec(SPEC), directory)
    return hashlib.sha256(result.weights_path.read_bytes()).hexdigest()


# --- what a scenario returns --------------------------------------------------------------------


@dataclass
class JobOutcome:
    job: dict  # the final job as GET /jobs/<id> shows it
    expected_status: str
    expected_attempts: int  # trainings the scenario forces (1, or 1 + the workers it took away)
    metrics: list[dict]  # GET /jobs/<id>/metrics
    rows: dict[int, tuple[int, dt.datetime]]  # epoch -> (attempt, created_at) of the final EpochMetrics rows
    seen: dict[int, set[int]]  # epoch -> every attempt the watcher saw recording it
    weights_sha256: str | None

    @property
    def lost(self) -> bool:
        return self.job["status"] not in FINAL

    @property
    def duplicated(self) -> bool:
        return self.job["attempts"] > self.expected_attempts

    @property
    def retrained(self) -> list[int]:
        """Epochs that more than one attempt recorded."""
        return sorted(epoch for epoch, attempts in self.seen.items() if len(attempts) > 1)


@dataclass
class Outcome:
    scenario: str
    jobs: list[JobOutcome]
    facts: dict = field(default_factory=dict)


# --- the deployment -----------------------------------------------------------------------------


class MetricsWatch:
    """Polls the epoch_metrics table from a thread and remembers every (job, epoch, attempt) it saw.

    A resumed attempt replaces the rows of the epochs it trains again, so the final rows alone can't show
    an epoch recorded twice; this can (rows live for seconds, polls are 0.1 s apart, and each scenario
    also polls at once right after it stops a worker).
    """

    def __init__(self, sessions):
        self.sessions = sessions
        self.seen: dict[tuple[str, int], set[int]] = {}
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.loop, name="metrics-watch", daemon=True)
        self.thread.start()

    def poll(self) -> None:
        with self.sessions() as session:
            rows = session.execute(select(EpochMetrics.job_id, EpochMetrics.epoch, EpochMetrics.attempt)).all()
        with self.lock:
            for job_id, epoch, attempt in rows:
                self.seen.setdefault((job_id, epoch), set()).add(attempt)

    def loop(self) -> None:
        while not self.stopped.wait(0.1):
            with contextlib.suppress(Exception):  # a blip; the next poll retries
                self.poll()

    def of(self, job_id: str) -> dict[int, set[int]]:
        self.poll()
        with self.lock:
            return {epoch: set(attempts) for (job, epoch), attempts in self.seen.items() if job == job_id}

    def close(self) -> None:
        self.stopped.set()
        self.thread.join(timeout=10)


class Deployment:
    """PostgreSQL + Redis + the API over HTTP + worker processes (see ``deployment``)."""

    def __init__(self, settings, base_url: str, token: str, sessions, publisher):
        self.settings = settings
        self.publisher = publisher  # the API's, to publish a job again by hand
        self.api = f"{base_url}/api/v1"
        self.token = token
        self.sessions = sessions
        self.watch = MetricsWatch(sessions)
        self.workers: list[WorkerProcess] = []

    # --- HTTP ---

    def call(self, method: str, path: str, body: dict | None = None) -> tuple[int, bytes]:
        headers = {"Authorization": f"Bearer {self.token}"}
        data = None
        if body is not None:
            data, headers["Content-Type"] = json.dumps(body).encode(), "application/json"
        request = urllib.request.Request(f"{self.api}{path}", data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    def call_json(self, method: str, path: str, body: dict | None = None, expect: tuple[int, ...] = (200,)):
        status, data = self.call(method, path, body)
        assert status in expect, f"{method} {path}: {status} {data[:500]!r}"
        return json.loads(data)

    def submit(self, job_spec: dict) -> str:
        return self.call_json("POST", "/jobs", job_spec, expect=(201,))["id"]

    def job(self, job_id: str) -> dict:
        return self.call_json("GET", f"/jobs/{job_id}")

    def cancel(self, job_id: str) -> dict:
        return self.call_json("POST", f"/jobs/{job_id}/cancel", expect=(200, 202))

    def weights_sha256(self, job_id: str) -> str:
        status, data = self.call("GET", f"/jobs/{job_id}/weights")
        assert status == 200, data[:500]
        return hashlib.sha256(data).hexdigest()

    # --- workers ---

    def spawn_workers(self, count: int, name: str) -> list[WorkerProcess]:
        """Start ``count`` workers at once, without waiting for them (a worker takes seconds to start)."""
        started = [WorkerProcess(self.settings, name=f"{name}-{i}") for i in range(count)]
        self.workers += started
        return started

    def start_workers(self, count: int, name: str) -> list[WorkerProcess]:
        """Start ``count`` workers at once, then wait until each is registered (consuming)."""
        started = self.spawn_workers(count, name)
        for worker in started:
            worker.wait_registered(self.sessions, timeout=120)
        return started

    def holder(self, job: Job) -> WorkerProcess:
        """The worker process whose id (hostname:pid of its main process) the job row names."""
        return next(w for w in self.workers if job.worker_id.endswith(f":{w.process.pid}"))

    def retire_workers(self) -> None:
        """SIGKILL every worker still running (a stopped one is woken first so it dies at once)."""
        for worker in self.workers:
            if worker.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(worker.process.pid, signal.SIGCONT)
                worker.kill()
        self.workers = []

    def log(self) -> str:
        return "\n".join(f"[{w.log_path.name}]\n{w.log(40)}" for w in self.workers)

    # --- the database ---

    def row(self, job_id: str) -> Job:
        with self.sessions() as session:
            return session.get(Job, job_id)

    def wait_row(self, job_id: str, predicate: Callable[[Job], bool], what: str, timeout: float = JOB_TIMEOUT,
                 every: float = 0.1) -> Job:
        """Poll the job row until ``predicate``; ``every`` 0.02 s where a signal must land within an epoch."""
        def reached():
            job = self.row(job_id)
            return job if predicate(job) else None

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if job := reached():
                return job
            time.sleep(every)
        return wait_for(reached, 0.5, f"job {job_id}: {what}", self.log)  # one more look, then fail with the logs

    def wait_final(self, job_id: str, timeout: float = JOB_TIMEOUT) -> Job:
        return self.wait_row(job_id, lambda job: job.status in FINAL, "a final status", timeout)

    def wait_maintenance_rounds(self, rounds: int = 2) -> None:
        """Wait until every live worker has run ``rounds`` more maintenance ticks (heartbeat, reap, reconcile)
        and the reconciler's staleness period has passed."""
        for worker in self.workers:
            if worker.worker_id is None and worker.process.poll() is None:
                worker.wait_registered(self.sessions, timeout=120)
        since = utcnow()
        wait_for(lambda: utcnow() - since > dt.timedelta(seconds=self.settings.reconcile_seconds + 1),
                 60, "the reconcile period")
        for _ in range(rounds):
            mark = utcnow()

            def ticked(mark=mark):
                with self.sessions() as session:
                    beats = session.scalars(select(Worker.last_heartbeat_at).where(
                        Worker.id.in_([w.worker_id for w in self.workers if w.process.poll() is None]))).all()
                return beats and all(beat > mark for beat in beats)

            wait_for(ticked, 60, "a maintenance round of every live worker", self.log)

    def snapshot(self, job_id: str) -> dict:
        """The job's metric rows, checkpoint rows and stored checkpoint files, now."""
        self.watch.poll()
        with self.sessions() as session:
            rows = session.execute(select(EpochMetrics.epoch, EpochMetrics.attempt, EpochMetrics.created_at)
                                   .where(EpochMetrics.job_id == job_id)).all()
            checkpoints = session.execute(select(Artifact.name, Artifact.epoch, Artifact.sha256, Artifact.uri)
                                          .where(Artifact.job_id == job_id, Artifact.kind == "checkpoint")).all()
        return {"rows": {epoch: (attempt, created) for epoch, attempt, created in rows},
                "checkpoints": {name: (epoch, sha) for name, epoch, sha, _uri in checkpoints},
                "checkpoint_paths": {uri.removeprefix("file://"): sha for _name, _epoch, sha, uri in checkpoints},
                "files": self.stored_checkpoint_files(job_id)}

    def stored_checkpoint_files(self, job_id: str) -> dict[str, str]:
        """path -> SHA-256 of every checkpoint file in the (local) artifact store, of every attempt."""
        folder = Path(self.settings.artifacts_url) / job_prefix(job_id)
        return {str(p): sha256_file(str(p))[1] for p in sorted(folder.rglob("*.pt")) if p.parent.name == "checkpoints"}

    def outcome(self, job_id: str, expected_status: str, expected_attempts: int) -> JobOutcome:
        job = self.job(job_id)
        metrics = self.call_json("GET", f"/jobs/{job_id}/metrics")["metrics"]
        rows = self.snapshot(job_id)["rows"]
        weights = self.weights_sha256(job_id) if job["status"] == "succeeded" else None
        return JobOutcome(job, expected_status, expected_attempts, metrics, rows, self.watch.of(job_id), weights)


@contextlib.contextmanager
def deployment(home: Path, redis_db: int) -> Iterator[Deployment]:
    """A fresh PostgreSQL database and Redis db ``redis_db`` (flushed before and after), the API on a free
    port, publishing to that Redis; everything is removed on exit."""
    from werkzeug.serving import make_server

    from api import create_app
    from api.auth import create_api_key
    from migrations.apply import upgrade

    redis_url = f"redis://127.0.0.1:6379/{redis_db}"
    home.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        redis_client = flushed_redis(redis_url)
        stack.callback(redis_client.flushdb)
        name = f"torchyard_chaos_{secrets.token_hex(6)}"
        with _admin_connection() as conn:
            conn.execute(f'CREATE DATABASE "{name}"')

        def drop() -> None:
            with _admin_connection() as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

        stack.callback(drop)
        url = make_url(POSTGRES_ADMIN_URL).set(drivername="postgresql+psycopg", database=name)
        settings = worker_settings(home, broker_url=redis_url, database_url=url.render_as_string(hide_password=False))
        upgrade(settings.database_url)

        app = create_app({"TESTING": True, **settings.model_dump()})
        services = app.extensions["torchyard"]
        stack.callback(services.engine.dispose)
        server = make_server("127.0.0.1", 0, app, threaded=True)
        threading.Thread(target=server.serve_forever, name="chaos-api", daemon=True).start()
        stack.callback(server.shutdown)
        with services.sessions() as session:
            token = create_api_key(session, "chaos", "chaos")

        deploy = Deployment(settings, f"http://127.0.0.1:{server.server_port}", token, services.sessions,
                            services.publisher)
        stack.callback(deploy.watch.close)
        stack.callback(deploy.retire_workers)
        yield deploy


# --- the scenarios ------------------------------------------------------------------------------


def baseline(deploy: Deployment, jobs: int = 4) -> Outcome:
    """No faults: two workers, a few jobs."""
    try:
        deploy.start_workers(2, "baseline")
        ids = [deploy.submit(spec(f"baseline-{i}")) for i in range(jobs)]
        for job_id in ids:
            deploy.wait_final(job_id)
        return Outcome("clean baseline", [deploy.outcome(job_id, "succeeded", 1) for job_id in ids])
    finally:
        deploy.retire_workers()


def killed_mid_run(deploy: Deployment) -> Outcome:
    """SIGKILL the worker's process group during epoch 3 of 10; a worker started afterwards finishes the job."""
    try:
        (first,) = deploy.start_workers(1, "killed")
        job_id = deploy.submit(spec("killed"))
        deploy.wait_row(job_id, lambda job: job.status == "running" and job.epoch >= 2, "epoch 2 recorded",
                        every=0.02)
        first.kill()
        at_kill = deploy.snapshot(job_id)  # attempt 1 is gone: this is all it ever recorded
        (second,) = deploy.start_workers(1, "killed-new")
        deploy.wait_final(job_id)
        outcome = deploy.outcome(job_id, "succeeded", 2)
        return Outcome("SIGKILL worker in epoch 3/10", [outcome],
                       {"at_kill": at_kill, "killed": first.worker_id, "finisher": second.worker_id,
                        "logs": {"finisher": second.log_path.read_text(errors="replace")}})
    finally:
        deploy.retire_workers()


def always_killed(deploy: Deployment) -> Outcome:
    """Whichever worker starts the job is SIGKILLed at once, each time; two live workers are kept."""
    try:
        deploy.start_workers(2, "doomed")
        job_id = deploy.submit(spec("always-killed"))
        killed: list[tuple[int, str]] = []
        while True:
            job = deploy.wait_row(job_id, lambda job: job.status in FINAL or (
                job.status == "running" and job.attempts > len(killed)), f"attempt {len(killed) + 1} to start")
            if job.status in FINAL:
                break
            holder = deploy.holder(job)
            holder.kill()
            killed.append((job.attempts, job.worker_id))
            deploy.spawn_workers(1, f"doomed-{len(killed)}")  # a replacement: two live workers again
        failed_at = deploy.job(job_id)
        deploy.wait_maintenance_rounds(2)
        return Outcome("job kills its worker every time", [deploy.outcome(job_id, "failed", job.max_attempts)],
                       {"killed": killed, "when_failed": failed_at})
    finally:
        deploy.retire_workers()


def stopped_past_lease(deploy: Deployment) -> Outcome:
    """SIGSTOP the job's worker until the reaper gives the job to another worker and it is training there,
    then SIGCONT it: the woken attempt must write nothing."""
    try:
        deploy.start_workers(2, "stopped")
        job_id = deploy.submit(spec("stopped"))
        job = deploy.wait_row(job_id, lambda job: job.status == "running" and job.epoch >= 2, "epoch 2 recorded",
                              every=0.02)
        stopped = deploy.holder(job)
        os.killpg(stopped.process.pid, signal.SIGSTOP)
        at_stop = deploy.snapshot(job_id)
        taken = deploy.wait_row(job_id, lambda job: job.attempts == 2 and job.status == "running",
                                "another worker to take the job")
        wait_for(lambda: 2 in {attempt for attempt, _ in deploy.snapshot(job_id)["rows"].values()}, JOB_TIMEOUT,
                 "the second attempt to record an epoch", deploy.log)
        before_wake = deploy.snapshot(job_id)
        os.killpg(stopped.process.pid, signal.SIGCONT)
        woke = utcnow()
        wait_for(lambda: LEASE_LOST in stopped.log_path.read_text(errors="replace"), 60,
                 "the woken worker to see it lost the lease", deploy.log)
        after_wake = deploy.row(job_id)
        deploy.wait_final(job_id)
        outcome = deploy.outcome(job_id, "succeeded", 2)
        return Outcome("SIGSTOP worker past its lease", [outcome],
                       {"stopped": stopped.worker_id, "taker": taken.worker_id, "takeover_at": taken.started_at,
                        "woke_at": woke, "at_stop": at_stop, "before_wake": before_wake,
                        "after_wake": {"status": after_wake.status, "attempts": after_wake.attempts,
                                       "worker_id": after_wake.worker_id},
                        "final": deploy.snapshot(job_id), "stopped_alive": stopped.process.poll() is None})
    finally:
        deploy.retire_workers()


def published_twice(deploy: Deployment) -> Outcome:
    """The same job id rung twice, with two idle workers: each worker gets one message."""
    try:
        workers = deploy.start_workers(2, "twice")
        job_id = deploy.submit(spec("twice"))  # rings once
        deploy.publisher.publish(job_id, "cpu")  # and once more
        deploy.wait_final(job_id)
        # Both messages were consumed (the duplicate by the other worker, as a no-op) once the task is acked.
        wait_for(lambda: sum(w.log_path.read_text(errors="replace").count("succeeded in") for w in workers) >= 2,
                 60, "both messages to be handled", deploy.log)
        returns = [w.log_path.read_text(errors="replace") for w in workers]
        return Outcome("same job published twice", [deploy.outcome(job_id, "succeeded", 1)], {"logs": returns})
    finally:
        deploy.retire_workers()


def cancelled_then_restarted(deploy: Deployment, sig: signal.Signals = signal.SIGTERM) -> Outcome:
    """Cancel a running job, at once stop its worker with ``sig`` (SIGTERM: a warm shutdown; SIGKILL: the
    process group), start a new worker and let its reaper and reconciler run."""
    try:
        (first,) = deploy.start_workers(1, f"cancel-{sig.name}")
        job_id = deploy.submit(spec(f"cancel-{sig.name}", epochs=5 * EPOCHS))  # never near its end when cancelled
        deploy.wait_row(job_id, lambda job: job.status == "running" and job.epoch >= 1, "epoch 1 recorded")
        (second,) = deploy.spawn_workers(1, f"cancel-{sig.name}-new")  # it starts while the first stops
        requested = deploy.cancel(job_id)
        if sig == signal.SIGKILL:
            first.kill()
        else:
            first.stop()
        after_stop = deploy.job(job_id)
        second.wait_registered(deploy.sessions, timeout=120)
        deploy.wait_final(job_id)
        deploy.publisher.publish(job_id, "cpu")  # a stale message for the cancelled job, beside the reconciler's
        deploy.wait_maintenance_rounds(2)
        return Outcome(f"cancel, then {sig.name} worker", [deploy.outcome(job_id, "cancelled", 1)],
                       {"requested": requested, "after_stop": after_stop})
    finally:
        deploy.retire_workers()


SCENARIOS: list[Callable[[Deployment], Outcome]] = [
    baseline, killed_mid_run, always_killed, stopped_past_lease, published_twice,
    lambda deploy: cancelled_then_restarted(deploy, signal.SIGTERM),
    lambda deploy: cancelled_then_restarted(deploy, signal.SIGKILL),
]


def table(outcomes: list[Outcome], reference_sha256: str | None = None) -> str:
    """The summary table of bench/chaos.py."""
    head = ["scenario", "jobs", "succeeded", "failed (expected)", "cancelled (expected)", "lost",
            "duplicated (trained twice)", "epochs retrained", "weights = uninterrupted"]
    lines = []
    for outcome in outcomes:
        jobs = outcome.jobs

        def count(status: str, jobs=jobs) -> int:
            return sum(j.job["status"] == status for j in jobs)

        def expected(status: str, jobs=jobs) -> int:
            return sum(j.expected_status == status for j in jobs)

        succeeded = [j for j in jobs if j.job["status"] == "succeeded"]
        same = sum(j.weights_sha256 == reference_sha256 for j in succeeded)
        lines.append([outcome.scenario, str(len(jobs)), str(count("succeeded")),
                      f"{count('failed')} ({expected('failed')})", f"{count('cancelled')} ({expected('cancelled')})",
                      str(sum(j.lost for j in jobs)), str(sum(j.duplicated for j in jobs)),
                      str(sum(len(j.retrained) for j in jobs)),
                      f"{same}/{len(succeeded)}" if reference_sha256 and succeeded else "-"])
    widths = [max(len(row[i]) for row in [head, *lines]) for i in range(len(head))]
    out = [" | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in [head, *lines]]
    out.insert(1, "-|-".join("-" * w for w in widths))
    return "\n".join(out)
