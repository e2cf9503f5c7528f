"""Queue throughput against worker processes: N small jobs through PostgreSQL and Redis with 1, 2 and 4
worker processes, measured in the same run.

    python bench/scale.py [--jobs 200] [--processes 1,2,4] [--mode both|workers|concurrency|overhead|memory]

Each measurement is a fresh PostgreSQL database, a flushed Redis db (11) and a local artifact folder:
  workers      N separate ``celery worker`` processes of concurrency 1 (as N machines would run them,
               each with its own maintenance thread)
  concurrency  one worker with ``--concurrency N`` (N prefork pool processes under one main process)
The workers start and register first; then the jobs are submitted through the API (Flask test client, in
this process) as fast as it takes them, and the clock runs from the first submit until the last job has
finished. Prints jobs/s and the ratio to one process. Needs PostgreSQL at 127.0.0.1:5432 (user postgres)
and Redis at 127.0.0.1:6379.

With ``--mode overhead`` (and first, in ``both``) it prints where a job's time goes: the same specs trained
back to back by the engine in this process (``train()``: the in-process limit, with the same output files),
then run back to back as jobs by the worker's own ``run_job`` in this process (claim, fenced writes, uploads,
final record; no broker), then through one real worker process (the "workers 1" run). The service overhead
per job is the worker's time per job minus the in-process limit; it is split by phase (exclusive times,
measured around the runner's and the engine's own functions), and what is left is the broker, Celery and
the dispatcher.

First (and alone with ``--mode memory``) it prints the resident memory (VmRSS and PSS) of each process, idle: one
worker of concurrency 1 and 2 (its main process and its pool processes, once they have imported the engine) and
the API as ``torchyard api`` runs it (gunicorn's master and its workers, once they have imported scikit-learn);
then the same with 2 slots after MEMORY_JOBS small jobs.
"""

from __future__ import annotations

import argparse
import functools
import os
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import psycopg  # noqa: E402
import redis  # noqa: E402
from private_servers import ApiServer  # noqa: E402
from proc_info import children, has_torch, maps_any, pss_mb, rss_mb  # noqa: E402
from specs import blobs_spec  # noqa: E402
from sqlalchemy import func, select  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402

from models.settings import Settings  # noqa: E402

POSTGRES_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
REDIS_URL = "redis://127.0.0.1:6379/11"
SMALL_JOB = blobs_spec("small", epochs=3, n_samples=200)
MEMORY_JOBS = 20  # run before the last memory reading: enough that both pool processes of 2 slots run some


class Deployment:
    """A fresh database, a flushed Redis db, the API in this process, and worker processes."""

    def __init__(self, home: Path):
        self.database = f"torchyard_scalebench_{secrets.token_hex(6)}"
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{self.database}"')
        self.redis = redis.Redis.from_url(REDIS_URL)
        self.redis.flushdb()
        url = make_url(POSTGRES_ADMIN_URL).set(drivername="postgresql+psycopg", database=self.database)
        # All the bench's jobs may wait at once, submitted in a few seconds: the default queued-jobs quota (100)
        # and submit budget (120 a minute) would refuse the rest.
        self.settings = Settings(home=home, database_url=url.render_as_string(hide_password=False),
                                 broker_url=REDIS_URL, quota_queued_jobs=100_000,
                                 rate_limit_submit="100000/minute").resolved()
        self.workers: list[subprocess.Popen] = []
        self.app = None

    def start(self) -> None:
        from api import create_app
        from api.auth import create_api_key
        from migrations.apply import upgrade

        upgrade(self.settings.database_url)
        self.app = create_app({"TESTING": False, **self.settings.model_dump()})
        self.sessions = self.app.extensions["torchyard"].sessions
        self.client = self.app.test_client()
        with self.sessions() as session:
            self.headers = {"Authorization": f"Bearer {create_api_key(session, 'bench', 'bench')}"}

    def start_workers(self, count: int, concurrency: int) -> None:
        from models.tables import Worker
        from worker.processes import worker_argv

        env = {k: v for k, v in os.environ.items() if not k.startswith("TORCHYARD_")}
        env.update({f"TORCHYARD_{k.upper()}": str(v) for k, v in self.settings.model_dump().items()})
        for index in range(count):
            log = open(self.settings.home / f"worker-{index}.log", "ab")  # noqa: SIM115 - the worker's
            argv = worker_argv(["cpu"], concurrency, os.environ.get("BENCH_LOGLEVEL", "WARNING"))
            self.workers.append(subprocess.Popen([sys.executable, "-m", "celery", "-A", "worker.celery_app", *argv],
                                                 env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT))
        deadline = time.monotonic() + 120
        while True:
            with self.sessions() as session:
                if session.scalar(select(func.count()).select_from(Worker)) == count:
                    return
            if time.monotonic() > deadline or any(w.poll() is not None for w in self.workers):
                raise SystemExit(f"workers did not start; see {self.settings.home}/worker-*.log")
            time.sleep(0.2)

    def run(self, jobs: int) -> float:
        """Submit ``jobs`` jobs and wait for all to finish; return the seconds it took."""
        from models.tables import Job

        started = time.perf_counter()
        for index in range(jobs):
            response = self.client.post("/api/v1/jobs", json={**SMALL_JOB, "seed": index}, headers=self.headers)
            assert response.status_code == 201, response.get_json()
        while True:
            with self.sessions() as session:
                counts = dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).all())
            if counts.get("failed") or counts.get("cancelled"):
                raise SystemExit(f"jobs failed: {counts}")
            if counts.get("succeeded", 0) == jobs:
                return time.perf_counter() - started
            time.sleep(0.2)

    def close(self) -> None:
        for process in self.workers:
            process.terminate()
        for process in self.workers:
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
        if self.app is not None:
            self.app.extensions["torchyard"].engine.dispose()
        self.redis.flushdb()
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)')


def wait_until(predicate, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.2)


def settled(pids: list[int], seconds: float = 1.0) -> bool:
    """Whether none of ``pids`` grows by more than 1 MB within ``seconds``."""
    before = [rss_mb(pid) for pid in pids]
    time.sleep(seconds)
    return all(rss_mb(pid) - mb < 1 for pid, mb in zip(pids, before, strict=True))


def measure_memory(slots: int, jobs: int = 0) -> list[tuple[str, float, float]]:
    """Each process's resident memory and PSS in MB, idle: one worker of ``slots`` and the API (gunicorn);
    after ``jobs`` small jobs when given (each pool process has then run some: what it holds once working)."""
    with tempfile.TemporaryDirectory(prefix="torchyard-bench-") as home:
        deployment = Deployment(Path(home))
        api = None
        try:
            deployment.start()
            env = {k: v for k, v in os.environ.items() if not k.startswith("TORCHYARD_")}
            env.update({f"TORCHYARD_{k.upper()}": str(v) for k, v in deployment.settings.model_dump().items()})
            api = ApiServer(env, Path(home) / "api.log")
            deployment.start_workers(1, concurrency=slots)
            main = deployment.workers[0].pid
            # The pool process is forked with the engine imported (the main process imports it with the task),
            # the gunicorn workers import scikit-learn in the background (api/gunicorn_hooks): wait for both,
            # then for no more growth.
            wait_until(lambda: children(main) and all(has_torch(pid) and maps_any(pid, ("/sklearn/",))
                                                      for pid in children(main)), "the worker's pool process")
            wait_until(lambda: children(api.process.pid) and all(
                maps_any(pid, ("/sklearn/",)) for pid in children(api.process.pid)), "the API workers to start")
            if jobs:
                deployment.run(jobs)
            wait_until(lambda: settled([main, *children(main), api.process.pid, *children(api.process.pid)]),
                       "the processes' memory to settle")
            named = [("worker main process", main)]
            named += [(f"worker pool process {n}", pid) for n, pid in enumerate(children(main), 1)]
            named.append(("API gunicorn master", api.process.pid))
            named += [(f"API gunicorn worker {n}", pid) for n, pid in enumerate(children(api.process.pid), 1)]
            return [(label, rss_mb(pid), pss_mb(pid)) for label, pid in named]
        finally:
            if api is not None:
                api.stop()
            deployment.close()


class PhaseClock:
    """Exclusive time per phase: each timed function's own time, less the time of timed functions it calls."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self._local = threading.local()
        self._undo: list[tuple[object, str, object]] = []

    def time(self, owner: object, attribute: str, phase: str) -> None:
        """Time every call of ``owner.attribute`` (a module's function or a class's method) as ``phase``."""
        original = getattr(owner, attribute)
        clock = self

        @functools.wraps(original)
        def timed(*args, **kwargs):
            stack = clock._stack()
            stack.append(0.0)  # the time of the timed calls inside this one
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - started
                clock.seconds[phase] += elapsed - stack.pop()
                if stack:
                    stack[-1] += elapsed

        setattr(owner, attribute, timed)
        self._undo.append((owner, attribute, original))

    def _stack(self) -> list[float]:
        if not hasattr(self._local, "stack"):
            self._local.stack = []
        return self._local.stack

    def restore(self) -> None:
        for owner, attribute, original in reversed(self._undo):
            setattr(owner, attribute, original)
        self._undo.clear()


def timed_phases(clock: PhaseClock) -> None:
    """The phases of a job that the overhead mode reports, timed around the functions that do them."""
    from models.storage import ArtifactStore
    from worker import job_callbacks, runner
    from worker.engine import checkpoints, outputs, run, trainer

    for owner, attribute, phase in (
        (runner, "claim", "claim (and the log's first line)"),
        (run, "prepare_run", "data, network, trainer"),
        (trainer.Trainer, "run_epoch", "training and evaluation"),
        (job_callbacks.LeaseKeeper, "on_batch_end", "lease and cancel checks"),
        (job_callbacks.DatabaseMetrics, "on_epoch_end", "per-epoch rows"),
        (job_callbacks.DatabaseMetrics, "on_epoch_done", "per-epoch rows"),
        (outputs.MetricsFile, "on_epoch_end", "metrics.jsonl"),
        (checkpoints, "save_atomically", "checkpoint files (fsync)"),
        (job_callbacks.ArtifactUploader, "on_checkpoint", "checkpoint rows"),
        (job_callbacks.ArtifactUploader, "on_checkpoint_removed", "checkpoint rows"),
        (run, "write_outputs", "weights and model card files"),
        (ArtifactStore, "put_file", "uploads (copy and SHA-256)"),
        (runner, "record_result", "final record"),
    ):
        clock.time(owner, attribute, phase)


def in_process_seconds(specs: list[dict], home: Path, clock: PhaseClock) -> float:
    """Train ``specs`` back to back with the engine in this process (the limit); return the seconds."""
    from models.validation import parse_spec
    from worker.engine import train

    parsed = [parse_spec(spec) for spec in specs]
    train(parsed[0], home / "warm-up")  # the first run pays for lazy imports and allocator growth
    clock.seconds.clear()
    started = time.perf_counter()
    for index, spec in enumerate(parsed):
        train(spec, home / f"in-process-{index}")
    return time.perf_counter() - started


def run_job_seconds(deployment: Deployment, specs: list[dict], clock: PhaseClock) -> float:
    """Run ``specs`` as jobs, back to back, through the worker's ``run_job`` in this process; the seconds."""
    from sqlalchemy import update

    from models.services import make_services
    from models.tables import Job, utcnow
    from worker import runner

    ids = []
    for spec in specs:
        response = deployment.client.post("/api/v1/jobs", json=spec, headers=deployment.headers)
        assert response.status_code == 201, response.get_json()
        ids.append(response.get_json()["id"])
    with deployment.sessions() as session:  # no worker is registered: release them as the dispatcher would
        session.execute(update(Job).where(Job.released_at.is_(None)).values(released_at=utcnow()))
        session.commit()
    ctx = make_services(deployment.settings)
    chosen, runner.context = runner.context, lambda: ctx
    try:
        assert runner.run_job(ids[0]) == "succeeded"  # warm-up: the first claim builds its statement
        clock.seconds.clear()
        started = time.perf_counter()
        for job_id in ids[1:]:
            assert runner.run_job(job_id) == "succeeded", job_id
        return time.perf_counter() - started
    finally:
        runner.context = chosen
        ctx.engine.dispose()


def measure_overhead(jobs: int) -> None:
    """Print the in-process limit, run_job in-process and one worker process, per job, and the phases."""
    specs = [{**SMALL_JOB, "seed": index} for index in range(jobs)]
    clock = PhaseClock()
    timed_phases(clock)
    with tempfile.TemporaryDirectory(prefix="torchyard-bench-") as home:
        try:
            limit = in_process_seconds(specs, Path(home), clock) / jobs
            engine_phases = dict(clock.seconds)
            deployment = Deployment(Path(home) / "run-job")
            try:
                deployment.start()
                in_runner = run_job_seconds(deployment, [{**SMALL_JOB, "seed": jobs}, *specs], clock) / jobs
            finally:
                deployment.close()
            runner_phases = dict(clock.seconds)
        finally:
            clock.restore()
    service = measure(jobs, 1, "workers") / jobs
    ms = 1000
    print(f"per job: in-process train() {limit * ms:.1f} ms   run_job in-process {in_runner * ms:.1f} ms   "
          f"one worker process {service * ms:.1f} ms")
    print(f"service overhead per job (worker process - in-process train()): {(service - limit) * ms:.1f} ms "
          f"(goal <= 25 ms), of which:")
    print(f"  {'phase':<34}{'train() ms':>11}{'run_job ms':>11}{'overhead ms':>13}")
    for phase in dict.fromkeys([*runner_phases, *engine_phases]):
        alone, in_job = engine_phases.get(phase, 0.0) / jobs, runner_phases.get(phase, 0.0) / jobs
        print(f"  {phase:<34}{alone * ms:>11.2f}{in_job * ms:>11.2f}{(in_job - alone) * ms:>13.2f}")
    untimed_alone = limit - sum(engine_phases.values()) / jobs
    untimed_job = in_runner - sum(runner_phases.values()) / jobs
    print(f"  {'the rest of train() and run_job':<34}{untimed_alone * ms:>11.2f}{untimed_job * ms:>11.2f}"
          f"{(untimed_job - untimed_alone) * ms:>13.2f}")
    print(f"  {'broker, Celery, dispatcher, submit':<34}{'':>11}{'':>11}{(service - in_runner) * ms:>13.2f}"
          "   (worker process - run_job in-process)")


def measure(jobs: int, processes: int, mode: str) -> float:
    with tempfile.TemporaryDirectory(prefix="torchyard-bench-") as home:
        deployment = Deployment(Path(home))
        try:
            deployment.start()
            if mode == "workers":
                deployment.start_workers(processes, concurrency=1)
            else:
                deployment.start_workers(1, concurrency=processes)
            return deployment.run(jobs)
        finally:
            deployment.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--processes", default="1,2,4")
    parser.add_argument("--mode", choices=["both", "workers", "concurrency", "overhead", "memory"], default="both")
    args = parser.parse_args()
    counts = [int(n) for n in args.processes.split(",")]
    modes = {"both": ["workers", "concurrency"], "memory": [], "overhead": []}.get(args.mode, [args.mode])

    import torch

    print(f"{args.jobs} jobs ({SMALL_JOB['training']['epochs']} epochs of make_blobs, 200 samples), "
          f"PostgreSQL + Redis, local artifact folder; {os.cpu_count()} cores, torch {torch.__version__}")
    print("load average before: {:.2f} {:.2f} {:.2f} (other processes on this machine skew the figures)"
          .format(*os.getloadavg()))
    if args.mode in ("both", "memory"):
        for slots, jobs in ((1, 0), (2, 0), (2, MEMORY_JOBS)):
            when = f"after {jobs} jobs" if jobs else "idle"
            print(f"memory, {when}: one worker of {slots} slot(s) and the API (torchyard api); VmRSS counts the "
                  f"pages a process shares in full, PSS shares them out")
            rows = measure_memory(slots, jobs)
            for label, rss, pss in rows:
                print(f"  {label:<24}VmRSS {rss:>5.0f} MB   PSS {pss:>5.0f} MB", flush=True)
            worker = [pss for label, _rss, pss in rows if label.startswith("worker")]
            print(f"  {'the worker, all told':<24}{'':>18}PSS {sum(worker):>5.0f} MB", flush=True)
    if args.mode in ("both", "overhead"):
        measure_overhead(args.jobs)
    if not modes:
        return
    print(f"{'mode':<13}{'processes':>10}{'seconds':>10}{'jobs/s':>10}{'vs 1':>8}")
    for mode in modes:
        base = None
        for count in counts:
            seconds = measure(args.jobs, count, mode)
            rate = args.jobs / seconds
            base = base or rate
            print(f"{mode:<13}{count:>10}{seconds:>10.1f}{rate:>10.2f}{rate / base:>8.2f}", flush=True)
    print("load average after:  {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))


if __name__ == "__main__":
    main()
