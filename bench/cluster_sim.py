"""A thousand workers, simulated: what a large cluster does to one PostgreSQL and one Redis.

    python bench/cluster_sim.py [--jobs 1000000] [--metric-rows 10000000] [--workers 1000] [--slots 8]
                                [--seconds 120] [--keep]
    python bench/cluster_sim.py --jobs 10000 --metric-rows 100000 --workers 50 --seconds 20   # a smoke run

It builds a fresh PostgreSQL database (migrated with the project's Alembic migrations) holding ``--jobs``
finished jobs of ``--users`` users and ``--metric-rows`` epoch-metric rows, loaded with COPY, plus a backlog of
queued jobs (one per slot), and starts a private Redis. Then ``--processes`` processes each drive a share of
the ``--workers`` simulated workers of ``--slots`` slots through the functions a real worker calls, over three
bounded connection pools per process (``--pool`` connections each, one per group of operations, named by
``application_name`` so that the database's CPU is read per group; a real deployment of 1,000 machines would
put PgBouncer in front of PostgreSQL, whose ``max_connections`` is far below 1,000 × 8). ``--slowdown N`` makes
every interval N times longer: the same state at 1/N of the rates, for a machine that can't drive them all.

  a worker starts                 ``maintenance.join``: it registers, then dispatches for its free slots
  every worker, every heartbeat   ``maintenance.heartbeat_worker``, then it asks for the cluster's round
                                  (``rounds.take_round``) and, when it takes it, ``maintenance.sweep`` (reap,
                                  reconcile, sweeps, dispatch, prune), as ``maintenance.tick`` does
  a slot takes a message          from the Redis list the dispatcher's ``BrokerPublisher`` publishes to (BRPOP,
                                  as kombu's Redis transport does, without Celery's ack bookkeeping)
  claim                           ``lifecycle.claim`` and ``job_log.start_log``, as ``runner.claim``
  each second of a running job    ``LeaseKeeper.on_batch_end``: a cancel check, or a lease renewal every heartbeat
  each epoch                      ``DatabaseMetrics.on_epoch_end`` and ``on_epoch_done``, as the trainer calls
                                  them: one fenced transaction of the progress and the epoch's metrics row
  the end                         ``lifecycle.finish`` with 3 artifact rows and the log's last line (as
                                  ``runner.record_result``), then ``runner.after_run`` (dispatch)
  a new job per finished one      ``api.submit.submit_job``, so the queue never runs dry

One more process plays the users through the API (Flask's test client, with API keys): the first page of their
jobs, a page deep in the list (keyset cursor), one job, one job's metrics. Each kind's latency is the time
its call took; "late" is how long events waited past their time (the simulator's own lag: if it grows, the
rates were not met). The database's CPU is read from /proc/<pid>/stat of its backends.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import datetime as dt
import heapq
import itertools
import json
import multiprocessing
import os
import random
import secrets
import shutil
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import psycopg  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402

POSTGRES_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
QUEUE = "cpu"
# kombu's Redis transport keeps one list per priority step of a queue; the publisher's messages land in these.
BROKER_LISTS = [QUEUE, *(f"{QUEUE}\x06\x16{step}" for step in (3, 6, 9))]
READER_USERS = 20  # users with an API key, who read their jobs while the cluster runs
SPEC = {"name": "sim", "task": "binary", "seed": 0,
        "data": {"source": "sklearn", "name": "make_circles",
                 "params": {"n_samples": 300, "factor": 0.5, "noise": 0.1, "random_state": 0}},
        "model": {"layers": [{"type": "Linear", "out_features": 16}, {"type": "ReLU"},
                             {"type": "Linear", "out_features": 1}]},
        "optimizer": {"type": "Adam", "lr": 0.01}, "training": {"epochs": 30, "batch_size": 50}}


def job_id(index: int) -> str:
    """The id of bulk job ``index`` (the readers know them without asking)."""
    return f"job_{index:024x}"


def user_id(index: int) -> str:
    return f"usr_{index:024x}"


# --- building the database --------------------------------------------------------------------


def build(args: argparse.Namespace, database_url: str, conninfo: str) -> dict[str, str]:
    """Migrate, COPY users, keys, finished jobs, metrics and the queued backlog in, ANALYZE; the readers' tokens."""
    from migrations.apply import upgrade
    from models.accounts import hash_token

    upgrade(database_url)
    spec = normalized_spec(database_url)
    now = dt.datetime.now(dt.timezone.utc)
    tokens = {user_id(u): f"tyk_{secrets.token_urlsafe(24)}" for u in range(min(READER_USERS, args.users))}
    with psycopg.connect(conninfo, autocommit=True) as conn:
        copy_lines(conn, "users (id, name, created_at, role, share)",
                   (f"{user_id(u)}\tsim-user-{u}\t{now.isoformat()}\tuser\t1\n" for u in range(args.users)))
        copy_lines(conn, "api_keys (id, user_id, name, key_hash, prefix, created_at)",
                   (f"key_{u}\t{uid}\tsim\t{hash_token(token)}\t{token[:8]}\t{now.isoformat()}\n"
                    for u, (uid, token) in enumerate(tokens.items())))
        started = time.perf_counter()
        copy_lines(conn, JOB_COLUMNS, finished_jobs(args, spec, now))
        print(f"  {args.jobs:,} finished jobs: {time.perf_counter() - started:.1f} s", flush=True)
        started = time.perf_counter()
        copy_lines(conn, "epoch_metrics (job_id, epoch, attempt, \"values\", created_at)", metric_rows(args, now))
        print(f"  {args.metric_rows:,} metric rows: {time.perf_counter() - started:.1f} s", flush=True)
        copy_lines(conn, JOB_COLUMNS, backlog(args, spec, now))
        started = time.perf_counter()
        conn.execute("ANALYZE")
        print(f"  ANALYZE: {time.perf_counter() - started:.1f} s", flush=True)
    return tokens


def normalized_spec(database_url: str) -> dict:
    """The spec as the API stores it (``validate_spec``'s normalized dump), so the rows look like real ones."""
    from models.settings import Settings
    from models.validation import parse_service_spec

    return parse_service_spec(SPEC, Settings(database_url=database_url).limits).model_dump(mode="json")


JOB_COLUMNS = ("jobs (id, user_id, name, status, spec, queue, priority, epoch, epochs, best_metric, best_value, "
               "best_epoch, final_metrics, stop_reason, cancel_requested, attempts, max_attempts, worker_id, device, "
               "created_at, started_at, finished_at, updated_at)")


def finished_jobs(args: argparse.Namespace, spec: dict, now: dt.datetime):
    """``--jobs`` succeeded jobs, created over the last 90 days, user by user in turn."""
    spec_text = json.dumps(spec)
    step = dt.timedelta(days=90) / max(args.jobs, 1)
    for index in range(args.jobs):
        created = now - dt.timedelta(days=90) + index * step
        final = json.dumps({"epoch": 10, "loss": round(random.random(), 4), "val_loss": round(random.random(), 4),
                            "accuracy": round(random.random(), 4)})
        yield (f"{job_id(index)}\t{user_id(index % args.users)}\tsim-{index}\tsucceeded\t{spec_text}\t{QUEUE}\t1\t"
               f"10\t10\tval_loss\t0.1\t7\t{final}\tcompleted\tf\t1\t3\tsim-worker\tcpu\t{created.isoformat()}\t"
               f"{created.isoformat()}\t{(created + dt.timedelta(minutes=5)).isoformat()}\t{created.isoformat()}\n")


def metric_rows(args: argparse.Namespace, now: dt.datetime):
    """``--metric-rows`` rows spread over the finished jobs, epochs 1, 2, … of each."""
    per_job = max(args.metric_rows // max(args.jobs, 1), 1)
    stamp = (now - dt.timedelta(days=1)).isoformat()
    rows = 0
    for index in itertools.cycle(range(args.jobs)):
        jid = job_id(index)
        for epoch in range(1, per_job + 1):
            loss = 1.0 / (epoch + random.random())
            yield (f'{jid}\t{epoch}\t1\t{{"epoch": {epoch}, "loss": {loss:.6f}, "val_loss": {loss * 1.1:.6f}, '
                   f'"accuracy": {1 - loss / 2:.6f}, "val_accuracy": {1 - loss / 1.8:.6f}, "lr": 0.01, '
                   f'"seconds": 0.31}}\t{stamp}\n')
            rows += 1
            if rows == args.metric_rows:
                return
        if index == args.jobs - 1:
            return  # every job has its rows (fewer than asked when --metric-rows isn't a multiple)


def backlog(args: argparse.Namespace, spec: dict, now: dt.datetime):
    """A queued job per slot of the cluster (held: the dispatcher releases them), to fill it as it starts."""
    spec_text = json.dumps(spec)
    for index in range(args.jobs, args.jobs + args.workers * args.slots):
        yield (f"{job_id(index)}\t{user_id(index % args.users)}\tsim-{index}\tqueued\t{spec_text}\t{QUEUE}\t1\t0\t30"
               f"\t\\N\t\\N\t\\N\t\\N\t\\N\tf\t0\t3\t\\N\t\\N\t{now.isoformat()}\t\\N\t\\N\t{now.isoformat()}\n")


def copy_lines(conn: psycopg.Connection, target: str, lines) -> None:
    """COPY ``lines`` (text format) into ``target``, 64k lines a write."""
    with conn.cursor() as cursor, cursor.copy(f"COPY {target} FROM STDIN") as copy:
        for chunk in iter(lambda: list(itertools.islice(lines, 65536)), []):
            copy.write("".join(chunk))


# --- the simulated workers ---------------------------------------------------------------------


class Stats:
    """Latencies (ms) by kind, counted only inside the measured window, and the lag of events."""

    def __init__(self, window: tuple[float, float]):
        self.window = window
        self.times: dict[str, list[float]] = defaultdict(list)
        self.errors: dict[str, list[str]] = defaultdict(list)
        self.lock = threading.Lock()

    def timed(self, kind: str, call, *args, **kwargs):
        """``call(*args)``'s result, its time recorded as ``kind``; None when it raised (counted as an error)."""
        started = time.time()
        try:
            return call(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - counted and shown; the simulation goes on
            self.error(kind, exc)
            return None
        finally:
            self.record(kind, started)

    def record(self, kind: str, started: float) -> None:
        if self.window[0] <= started < self.window[1]:
            with self.lock:
                self.times[kind].append((time.time() - started) * 1000)

    def error(self, kind: str, exc: Exception) -> None:
        with self.lock:
            self.errors[kind].append(f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}")

    def late(self, loop: str, seconds: float, at: float) -> None:
        if self.window[0] <= at < self.window[1]:
            with self.lock:
                self.times[f"(late: {loop})"].append(seconds * 1000)


class Loop:
    """Events due at a time, run by ``threads`` threads (each holds at most one pooled connection)."""

    def __init__(self, stats: Stats, threads: int, until: float, name: str):
        self.heap: list = []
        self.counter = itertools.count()
        self.ready = threading.Condition()
        self.stats, self.until, self.name = stats, until, name
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def at(self, when: float, call, *args) -> None:
        with self.ready:
            heapq.heappush(self.heap, (when, next(self.counter), call, args))
            self.ready.notify()

    def _run(self) -> None:
        while True:
            with self.ready:
                while True:
                    now = time.time()
                    if now >= self.until:
                        return
                    if self.heap and self.heap[0][0] <= now:
                        when, _, call, args = heapq.heappop(self.heap)
                        break
                    self.ready.wait(min(self.heap[0][0] - now if self.heap else 0.5, self.until - now))
            self.stats.late(self.name, now - when, now)
            call(*args)

    def run(self) -> None:
        for thread in self.threads:
            thread.start()
        for thread in self.threads:
            thread.join()


class Shard:
    """One process's share of the workers: their maintenance, their slots and the jobs they run."""

    def __init__(self, args: argparse.Namespace, index: int, settings, window: tuple[float, float]):
        from worker.runner import device_labels

        self.args, self.settings = args, settings
        # One pool per group of operations, told apart by application_name, so that the database's CPU can
        # be read per group (see GROUPS).
        self.upkeep, self.checks, self.ctx = (services(settings, group, args.pool) for group in GROUPS_ORDER[:3])
        self.devices = device_labels()
        self.stats = Stats(window)
        # A loop per group too: the many batch-end checks queue behind each other, not before a heartbeat.
        self.upkeep_loop, self.checks_loop, self.jobs_loop = (Loop(self.stats, args.pool, window[1], name)
                                                         for name in ("upkeep", "batch ends", "jobs"))
        self.until = window[1]
        self.workers = [f"sim-{index}-{w}" for w in range(index, args.workers, args.processes)]
        self.free = threading.Semaphore(0)
        self.free_slots: list[str] = []
        self.free_lock = threading.Lock()
        self.rng = random.Random(index)
        self.first_jobs = 0  # the cluster's first fill: those jobs are part-way through their run

    def run(self) -> dict:
        start = time.time()
        heartbeat = self.settings.heartbeat_seconds
        for worker in self.workers:  # machines start within 10 s, and their rounds spread over a heartbeat
            self.upkeep_loop.at(start + self.rng.uniform(0, 10), self.start_worker, worker,
                                start + self.rng.uniform(0, heartbeat))
        threading.Thread(target=self.take_messages, daemon=True).start()
        loops = [threading.Thread(target=loop.run) for loop in (self.upkeep_loop, self.checks_loop, self.jobs_loop)]
        for thread in loops:
            thread.start()
        for thread in loops:
            thread.join()
        return {"times": dict(self.stats.times), "errors": dict(self.stats.errors)}

    def start_worker(self, worker: str, first_round: float) -> None:
        from worker import maintenance

        register = {"queues": [QUEUE], "slots": self.args.slots, "devices": {"cpu": 8, "cuda": 0}}
        self.stats.timed("register", maintenance.join, self.upkeep, worker, *register.values())
        self.upkeep_loop.at(first_round, self.tick, worker, register)
        for _slot in range(self.args.slots):
            self.slot_free(worker)

    def tick(self, worker: str, register: dict) -> None:
        """``maintenance.tick``, its heartbeat, its ask for the round and its sweep timed apart."""
        from models import rounds
        from models.tables import utcnow
        from worker import maintenance

        if self.stats.timed("heartbeat", maintenance.heartbeat_worker, self.upkeep, worker) is False:
            maintenance.register_worker(self.upkeep, worker, **register)
        with self.upkeep.sessions() as session:
            taken = self.stats.timed("round asked", rounds.take_round, session, worker, utcnow(),
                                     rounds.every(self.settings))
        if taken:
            self.stats.timed("maintenance round", maintenance.sweep, self.upkeep)
        self.upkeep_loop.at(time.time() + self.settings.heartbeat_seconds, self.tick, worker, register)

    def slot_free(self, worker: str) -> None:
        with self.free_lock:
            self.free_slots.append(worker)
        self.free.release()

    def take_messages(self) -> None:
        """A free slot takes the next message (BRPOP), as a worker's consumer does."""
        redis = __import__("redis").Redis.from_url(self.settings.broker_url)
        while time.time() < self.until:
            if not self.free.acquire(timeout=0.5):
                continue
            taken = None
            while taken is None and time.time() < self.until:
                taken = redis.brpop(BROKER_LISTS, timeout=1)
            if taken is None:
                return
            message = json.loads(taken[1])
            (job,), _kwargs, _embed = json.loads(base64.b64decode(message["body"]))
            with self.free_lock:
                worker = self.free_slots.pop()
            self.jobs_loop.at(time.time(), self.claim, worker, job)

    def claim(self, worker: str, job_id: str) -> None:
        from worker.job_log import start_log
        from worker.runner import give_up_if_exhausted

        def claim_job():  # runner.claim, without parsing the spec (the worker's CPU, not the database's)
            from models import lifecycle

            with self.ctx.sessions() as session:
                job = lifecycle.claim(session, job_id, worker, self.settings.lease_seconds, devices=self.devices)
                if job is None:
                    return None
                job_log = start_log(session, job, self.settings)
                session.commit()
            job_log.written(session)
            return job, job_log

        claimed = self.stats.timed("claim", claim_job)
        if claimed is None:
            self.stats.timed("claim (skipped)", give_up_if_exhausted, self.ctx, job_id)
            self.slot_free(worker)
            return
        self.start_run(worker, *claimed)

    def start_run(self, worker: str, job, job_log) -> None:
        from worker.engine import RunState
        from worker.job_callbacks import DatabaseMetrics, Fence, LeaseKeeper

        fence = Fence(self.ctx, job.id, job.attempts, job.queue, job_log)
        keeper = LeaseKeeper(Fence(self.checks, job.id, job.attempts, job.queue, job_log), lambda: False)
        state = RunState(epochs=job.epochs)
        keeper.on_train_begin(state)
        length = self.args.job_seconds * self.rng.uniform(0.5, 1.5)
        if self.first_jobs < len(self.workers) * self.args.slots:  # the fill: spread the first ends out
            self.first_jobs += 1
            length = self.args.job_seconds * self.rng.uniform(0.02, 1.0)
        now = time.time()
        run = {"worker": worker, "job": job, "fence": fence, "keeper": keeper, "state": state,
               "metrics": DatabaseMetrics(fence), "ends": now + length}
        self.checks_loop.at(now + self.args.check_seconds, self.batch_end, run)
        self.jobs_loop.at(now + self.args.epoch_seconds * self.rng.uniform(0.5, 1.0), self.epoch_end, run)
        self.jobs_loop.at(run["ends"], self.finish, run)

    def batch_end(self, run: dict) -> None:
        """``LeaseKeeper.on_batch_end``: a cancel check, or at each heartbeat a renewal."""
        if run.get("done"):
            return
        before, started = run["keeper"].last_renew, time.time()
        try:
            run["keeper"].on_batch_end(run["state"])
        except Exception as exc:  # noqa: BLE001 - a lost lease or a blip: counted and shown
            self.stats.error("batch end", exc)
        kind = "lease renewal" if run["keeper"].last_renew != before else "cancel check"
        self.stats.record(kind, started)
        self.checks_loop.at(time.time() + self.args.check_seconds, self.batch_end, run)

    def epoch_end(self, run: dict) -> None:
        """An epoch's end as the trainer reports it: ``DatabaseMetrics.on_epoch_end`` (the row, deferred) and
        ``on_epoch_done`` (one fenced transaction of the progress and the row)."""
        from worker.engine.callbacks import Best

        if run.get("done"):
            return
        state = run["state"]
        state.epoch += 1
        loss = 1.0 / (state.epoch + self.rng.random())
        state.best = Best("val_loss", loss, state.epoch)
        metrics = {"epoch": state.epoch, "loss": loss, "val_loss": loss * 1.1, "accuracy": 1 - loss / 2,
                   "val_accuracy": 1 - loss / 1.8, "lr": 0.01, "seconds": 0.31}
        self.stats.timed("metric write", self.write_epoch, run["metrics"], state, metrics)
        self.jobs_loop.at(time.time() + self.args.epoch_seconds, self.epoch_end, run)

    @staticmethod
    def write_epoch(callback, state, metrics: dict) -> None:
        callback.on_epoch_end(state, metrics)
        callback.on_epoch_done(state)

    def finish(self, run: dict) -> None:
        """The run's end as ``runner.record_result`` writes a success, then ``after_run``; then a new job."""
        from models import lifecycle
        from worker.job_callbacks import record_artifacts
        from worker.runner import after_run

        run["done"] = True
        fence, state = run["fence"], run["state"]

        def write(session) -> None:
            fence.require(session, lifecycle.finish(session, fence.job_id, fence.attempt, "succeeded",
                                                    stop_reason="completed", epoch=state.epoch,
                                                    final_metrics={"loss": 0.1}, best_metric="val_loss",
                                                    best_value=0.1, best_epoch=state.epoch))
            record_artifacts(session, fence.job_id, [
                (kind, name, (f"file:///sim/{fence.job_id}/{name}", 4096, "0" * 64), None)
                for kind, name in (("weights", "weights.safetensors"), ("model_card", "model.json"),
                                   ("metrics", "metrics.csv"))])
            fence.log.close(session, "INFO", f"succeeded after {state.epoch} epochs (completed)")

        self.stats.timed("finish", fence.transaction, write)
        self.stats.timed("dispatch after a job ends", after_run, self.ctx, run["job"])
        self.slot_free(run["worker"])
        self.stats.timed("submit", self.submit)

    def submit(self) -> None:
        """A user submits a new job (``api.submit.submit_job``), so that the queue never runs dry."""
        from api.submit import submit_job
        from models.tables import User

        with self.ctx.sessions() as session:
            user = session.get(User, user_id(self.rng.randrange(self.args.users)))
            submit_job(session, user, {**SPEC, "seed": self.rng.randrange(10**6)}, None, self.ctx)


GROUPS = {  # application_name: the operations whose connections carry it
    "sim-upkeep": ("register", "heartbeat", "round asked", "maintenance round"),
    "sim-batch-ends": ("cancel check", "lease renewal"),
    "sim-jobs": ("claim", "claim (skipped)", "metric write", "finish", "dispatch after a job ends", "submit"),
    "sim-reads": ("list first page", "list deep page", "get job", "job metrics"),
}
GROUPS_ORDER = list(GROUPS)


def named(database_url: str, group: str) -> str:
    """``database_url`` with ``application_name`` set to ``group``."""
    return make_url(database_url).update_query_dict({"application_name": group}).render_as_string(hide_password=False)


def services(settings, group: str, pool: int):
    """Services whose engine pools ``pool`` connections named ``group``, with the worker's session timeout."""
    from models.db import make_engine
    from models.services import make_services
    from worker.context import end_stalled_transactions

    engine = make_engine(named(settings.database_url, group), pool_size=pool, max_overflow=0)
    end_stalled_transactions(engine, settings.lease_seconds)
    return make_services(settings, engine=engine)


def run_shard(args: argparse.Namespace, index: int, settings_dump: dict, gate) -> dict:
    """A process of simulated workers, from the start ``gate`` gives until the window ends."""
    import logging

    import api.submit  # noqa: F401 - imported before the start, as a worker's modules are
    import worker.runner  # noqa: F401
    from models.settings import Settings

    # What the workers' code logs (a re-published job, a dispatch that failed) goes to a file, counted at the end.
    logging.basicConfig(filename=Path(settings_dump["home"]) / f"shard-{index}.log", level=logging.WARNING)

    return Shard(args, index, Settings(**settings_dump), wait_for_start(gate)).run()


def wait_for_start(gate) -> tuple[float, float]:
    """Say this process is ready, then wait for the measured window (every process starts at once)."""
    ready, go = gate
    ready.put(os.getpid())
    return go.get()


# --- the users ---------------------------------------------------------------------------------


def run_readers(args: argparse.Namespace, settings_dump: dict, tokens: dict[str, str], gate) -> dict:
    """Users reading through the API at ``--reads`` per second: a first page, a deep page, a job, its metrics."""
    from api import create_app
    from api.pagination import encode_cursor

    app = create_app({"TESTING": False, **settings_dump,
                      "database_url": named(settings_dump["database_url"], "sim-reads")})
    client = app.test_client()
    window = wait_for_start(gate)
    stats = Stats(window)
    rng = random.Random(7)
    users = list(tokens)
    per_user = max(args.jobs // args.users, 1)
    now = dt.datetime.now(dt.timezone.utc)
    reads = itertools.cycle(["list first page", "list deep page", "get job", "job metrics"])
    next_at = time.time()
    while next_at < window[1]:
        time.sleep(max(next_at - time.time(), 0))
        next_at += 1 / args.reads
        owner = rng.randrange(len(users))
        headers = {"Authorization": f"Bearer {tokens[users[owner]]}"}
        job = job_id(owner + args.users * rng.randrange(per_user))
        kind = next(reads)
        if kind == "list first page":
            url = "/api/v1/jobs?limit=20"
        elif kind == "list deep page":
            cursor = encode_cursor(now - dt.timedelta(days=rng.uniform(1, 89)), "job_~")
            url = f"/api/v1/jobs?limit=20&cursor={cursor}"
        elif kind == "get job":
            url = f"/api/v1/jobs/{job}"
        else:
            url = f"/api/v1/jobs/{job}/metrics"
        response = stats.timed(kind, client.get, url, headers=headers)
        if response is not None and response.status_code != 200:
            stats.errors[kind].append(f"HTTP {response.status_code}: {response.get_data(as_text=True)[:200]}")
    return {"times": dict(stats.times), "errors": dict(stats.errors)}


# --- measuring ---------------------------------------------------------------------------------


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of ``pids`` so far (processes gone meanwhile count nothing)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]
    ticks = os.sysconf("SC_CLK_TCK")
    return (sum(values) - idle) / ticks, sum(values) / ticks


def backends(conninfo: str, database: str) -> dict[int, tuple[str, float]]:
    """This database's backends now: pid -> (application_name, CPU seconds so far)."""
    with psycopg.connect(conninfo, autocommit=True) as conn:
        rows = conn.execute("SELECT pid, application_name FROM pg_stat_activity WHERE datname = %s", [database])
        return {pid: (name, cpu_seconds([pid])) for pid, name in rows}


def cpu_by_group(before: dict, after: dict) -> dict[str, float]:
    """CPU seconds each application_name's backends used between two ``backends`` readings (a backend that
    started meanwhile counts all of its CPU; one that ended meanwhile is lost: the pools keep theirs open)."""
    used: dict[str, float] = defaultdict(float)
    for pid, (name, seconds) in after.items():
        used[name] += seconds - before.get(pid, (name, 0.0))[1]
    return used


def count_running(admin: psycopg.Connection, database: str) -> int:
    """How many jobs run now (the slots the cluster filled)."""
    conninfo = make_url(POSTGRES_ADMIN_URL).set(database=database).render_as_string(hide_password=False)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        return conn.execute("SELECT count(*) FROM jobs WHERE status = 'running'").fetchone()[0]


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(fraction * len(ordered)), len(ordered) - 1)]


def report(args: argparse.Namespace, results: list[dict], targets: dict[str, float]) -> None:
    times: dict[str, list[float]] = defaultdict(list)
    errors: dict[str, list[str]] = defaultdict(list)
    for result in results:
        for kind, values in result["times"].items():
            times[kind] += values
        for kind, values in result["errors"].items():
            errors[kind] += values
    print(f"{'operation':28} {'count':>8} {'per s':>8} {'target/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    for kind in [*targets, *sorted(set(times) - set(targets))]:
        values = times.get(kind, [])
        target = f"{targets[kind]:9.1f}" if targets.get(kind) else f"{'':9}"
        if not values:
            print(f"{kind:28} {0:8} {'':8} {target}")
            continue
        print(f"{kind:28} {len(values):8} {len(values) / args.seconds:8.1f} {target} {percentile(values, 0.5):8.1f} "
              f"{percentile(values, 0.99):8.1f} {max(values):8.1f}")
    for kind, messages in errors.items():
        print(f"errors in {kind}: {len(messages)}, first: {messages[0]}")
    return times


def report_cpu(args: argparse.Namespace, used: dict[str, float], times: dict[str, list[float]],
               targets: dict[str, float], wall: float, count: int) -> None:
    """The database's CPU per group of operations: its share of the machine now, per operation, and what the
    target rates would take (an extrapolation: CPU per operation measured here, times the target rate)."""
    cores = os.cpu_count() or 1
    total = sum(used.values())
    print(f"database CPU over the {wall:.0f} s window: {total:.1f} s = {total / (wall * cores):.0%} of "
          f"{cores} cores ({count} backends of this database)")
    print(f"{'group':16} {'CPU s':>7} {'share':>6} {'ops/s':>8} {'CPU ms/op':>10} {'target ops/s':>13} "
          f"{'cores at target':>16}")
    needed = 0.0
    for group, kinds in GROUPS.items():
        ops = sum(len(times.get(kind, [])) for kind in kinds)
        target = sum(targets.get(kind, 0.0) for kind in kinds)
        per_op = used.get(group, 0.0) / ops if ops else 0.0
        needed += per_op * target
        print(f"{group:16} {used.get(group, 0.0):7.1f} {used.get(group, 0.0) / (wall * cores):6.0%} {ops / wall:8.1f} "
              f"{per_op * 1000:10.2f} {target:13.1f} {per_op * target:16.2f}")
    real = f"; at the real rates (x{args.slowdown:g}) about {needed * args.slowdown:.1f}" if args.slowdown != 1 else ""
    print(f"at the target rates the database would need about {needed:.1f} cores (extrapolated){real}")


# --- the run -----------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=1_000_000, help="finished jobs in the table")
    parser.add_argument("--metric-rows", type=int, default=10_000_000, help="epoch-metric rows in the table")
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=1000)
    parser.add_argument("--slots", type=int, default=8, help="slots (concurrent jobs) per worker")
    parser.add_argument("--seconds", type=float, default=120, help="the measured window")
    parser.add_argument("--warmup", type=float, default=40, help="seconds before the window (the cluster fills)")
    parser.add_argument("--job-seconds", type=float, default=300, help="a job's mean length")
    parser.add_argument("--epoch-seconds", type=float, default=10, help="seconds between a job's epochs")
    parser.add_argument("--check-seconds", type=float, default=None,
                        help="seconds between a running job's batch-end checks (default: LeaseKeeper's)")
    parser.add_argument("--reads", type=float, default=20, help="user reads per second (all users together)")
    parser.add_argument("--processes", type=int, default=4, help="processes driving the simulated workers")
    parser.add_argument("--pool", type=int, default=6, help="database connections (and threads) per process")
    parser.add_argument("--slowdown", type=float, default=1,
                        help="every interval (heartbeat, lease, batch-end check, epoch, job length) this many times "
                             "longer: the same state at 1/N of the rates, for a machine that can't drive them all")
    parser.add_argument("--keep", action="store_true", help="keep the database (its name is printed)")
    args = parser.parse_args()
    from worker.job_callbacks import CANCEL_CHECK_SECONDS

    args.check_seconds = (args.check_seconds or CANCEL_CHECK_SECONDS) * args.slowdown
    args.job_seconds *= args.slowdown
    args.epoch_seconds *= args.slowdown
    run(args)


def run(args: argparse.Namespace) -> None:
    from private_servers import PrivateRedis

    from models import rounds
    from models.settings import Settings

    database = f"torchyard_clustersim_{secrets.token_hex(6)}"
    admin = psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True)
    max_connections = admin.execute("SHOW max_connections").fetchone()[0]
    admin.execute(f'CREATE DATABASE "{database}"')
    conninfo = make_url(POSTGRES_ADMIN_URL).set(database=database).render_as_string(hide_password=False)
    url = make_url(conninfo).set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
    home = Path(tempfile.mkdtemp(prefix="torchyard-clustersim-"))
    redis = PrivateRedis(home / "redis")
    try:
        settings = Settings(home=home, database_url=url, broker_url=redis.url(0),
                           quota_running_jobs=10**6, quota_queued_jobs=10**6, rate_limit_read="100000/minute",
                           rate_limit_submit="100000/minute", heartbeat_seconds=round(10 * args.slowdown),
                           lease_seconds=round(60 * args.slowdown),
                           reconcile_seconds=round(30 * args.slowdown)).resolved()
        slots = args.workers * args.slots
        print(f"cluster_sim: {args.workers} workers x {args.slots} slots = {slots} slots, {args.processes} processes, "
              f"each with 3 pools (upkeep, batch ends, jobs) of {args.pool} connections (PostgreSQL max_connections "
              f"{max_connections}: a real cluster needs PgBouncer); {os.cpu_count()} cores, load average before: "
              f"{' '.join(f'{load:.2f}' for load in os.getloadavg())}")
        started = time.perf_counter()
        print(f"building {database}: {args.jobs:,} finished jobs of {args.users} users, {args.metric_rows:,} metric "
              f"rows, {slots} queued jobs", flush=True)
        tokens = build(args, url, conninfo)
        size = admin.execute("SELECT pg_size_pretty(pg_database_size(%s))", [database]).fetchone()[0]
        print(f"built in {time.perf_counter() - started:.1f} s ({size})", flush=True)
        heartbeat = settings.heartbeat_seconds
        targets = {
            "claim": slots / args.job_seconds, "heartbeat": args.workers / heartbeat,
            "round asked": args.workers / heartbeat, "maintenance round": 1 / rounds.every(settings).total_seconds(),
            "lease renewal": slots / heartbeat,
            "cancel check": slots / args.check_seconds - slots / heartbeat, "metric write": slots / args.epoch_seconds,
            "finish": slots / args.job_seconds, "dispatch after a job ends": slots / args.job_seconds,
            "submit": slots / args.job_seconds, **{kind: args.reads / 4 for kind in
                                                   ("list first page", "list deep page", "get job", "job metrics")},
        }
        print(f"rates: heartbeat every {heartbeat} s, lease {settings.lease_seconds} s, jobs of {args.job_seconds:g} s "
              f"(x0.5-1.5), an epoch every {args.epoch_seconds:g} s, a batch-end check every {args.check_seconds:g} s, "
              f"{args.reads:g} user reads/s (--slowdown {args.slowdown:g}: the real intervals x {args.slowdown:g}); "
              f"{args.warmup:g} s warm-up, then {args.seconds:g} s measured", flush=True)
        dump = settings.model_dump()
        spawn = multiprocessing.get_context("spawn")
        with spawn.Manager() as manager, concurrent.futures.ProcessPoolExecutor(args.processes + 1,
                                                                                mp_context=spawn) as pool:
            gate = manager.Queue(), manager.Queue()
            shards = [pool.submit(run_shard, args, index, dump, gate) for index in range(args.processes)]
            readers = pool.submit(run_readers, args, dump, tokens, gate)
            for _ in range(args.processes + 1):
                gate[0].get(timeout=600)
            window = (time.time() + args.warmup, time.time() + args.warmup + args.seconds)
            for _ in range(args.processes + 1):
                gate[1].put(window)
            time.sleep(max(window[0] - time.time(), 0))
            running = [count_running(admin, database)]
            before = backends(POSTGRES_ADMIN_URL, database), machine_busy(), time.time()
            time.sleep(max(window[1] - time.time(), 0))
            after = backends(POSTGRES_ADMIN_URL, database), machine_busy(), time.time()
            running.append(count_running(admin, database))
            results = [future.result() for future in [*shards, readers]]
        print(f"running jobs: {running[0]} as the window began, {running[1]} as it ended (of {slots} slots)")
        times = report(args, results, targets)
        wall = after[2] - before[2]
        machine = (after[1][0] - before[1][0]) / (after[1][1] - before[1][1])
        report_cpu(args, cpu_by_group(before[0], after[0]), times, targets, wall, len(after[0]))
        print(f"the whole machine was {machine:.0%} busy over the window (the simulator, PostgreSQL, Redis and "
              "whatever else runs here)")
        print(f"load average after: {' '.join(f'{load:.2f}' for load in os.getloadavg())}")
        print(f"deadlocks the workers' code logged (a dispatch that failed and left it to the next round): "
              f"{sum(path.read_text().count('DeadlockDetected') for path in home.glob('shard-*.log'))}")
    finally:
        redis.close()
        shutil.rmtree(home, ignore_errors=True)
        if args.keep:
            print(f"kept database {database}")
        else:
            admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        admin.close()


if __name__ == "__main__":
    main()
