"""The read path: the API's GETs against a bare Flask app doing the same lookups, on the same gunicorn settings.

    python bench/api.py [--rounds 10] [--requests 100] [--jobs 300] [--epochs 10000]

On a private Redis (a free port) and a fresh database on the shared PostgreSQL (127.0.0.1:5432), with a user,
its API key, ``--jobs`` jobs (and as many of another user's) and one job of ``--epochs`` epochs of metrics
rows, it serves
  torchyard  the API as ``torchyard api`` runs it (gunicorn, its worker class, processes and threads): key
             lookup, rate limiter (Redis), request histogram, pydantic responses;
  bare       a Flask app defined here, served by the same gunicorn command line but for the app, over the same
             database engine (models.db.make_engine: same pool, same pre-ping on checkout): each route
             looks the bearer key up by its SHA-256 (as api/auth.py does) and then the job, the first page
             of jobs or the metrics rows with SQLAlchemy Core, and answers json.dumps of about the same
             fields; no rate limit, no request metrics, no validation of the query beyond int();
and times, from one client in this process over a persistent connection (gthread keeps it alive), sequential
requests to each endpoint, alternating which side goes first in each round so that drifting load hits both
alike. The read budget is 1200 a second (rate_limit_read), which one client doesn't reach: the limiter still
counts each request, taking 12 units at a time from Redis as it does under the default budget of 1200 a minute.
It prints per endpoint p50 and p99 latency and requests/s of both, and the ratio of torchyard's throughput to
the bare app's (goal >= 0.9).
"""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import argparse  # noqa: E402
import datetime as dt  # noqa: E402
import http.client  # noqa: E402
import json  # noqa: E402
import secrets  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
API = "/api/v1"
BARE_APP = "bench.api:bare_app()"  # gunicorn imports this module as bench.api (ROOT on its path)
READ_BUDGET = "1200/second"  # no request refused; each is counted, in leases of 12 as the default's


# --- the bare app ---------------------------------------------------------------------------------


def bare_app():
    """A minimal Flask service over the same tables: key lookup by hash, then one query, json.dumps."""
    import hashlib

    from flask import Flask, Response, request
    from sqlalchemy import func, select

    from api.epoch_rows import METRICS_PAGE
    from models.db import make_engine
    from models.tables import ApiKey, EpochMetrics, Job, User

    app = Flask(__name__)
    engine = make_engine(os.environ["TORCHYARD_DATABASE_URL"])  # the service's: same pool, same checks
    keys, users, jobs, epochs = (ApiKey.__table__, User.__table__, Job.__table__, EpochMetrics.__table__)
    key_query = (select(keys.c.revoked_at, keys.c.expires_at, users.c.id, users.c.name)
                 .join(users, users.c.id == keys.c.user_id))
    page_size, metrics_page = 20, METRICS_PAGE  # the API's pages

    def answer(body, status=200):
        return Response(json.dumps(body, default=str), status=status, mimetype="application/json")

    def caller(conn):
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        digest = hashlib.sha256(token.strip().encode()).hexdigest()
        row = conn.execute(key_query.where(keys.c.key_hash == digest)).first()
        now = dt.datetime.now(dt.timezone.utc)
        if scheme.lower() != "bearer" or row is None or row.revoked_at is not None or (
                row.expires_at is not None and row.expires_at.replace(tzinfo=dt.timezone.utc) <= now):
            return None
        return row

    def job_fields(job, owner):
        base = f"{API}/jobs/{job.id}"
        return {"id": job.id, "name": job.name, "owner": owner, "status": job.status, "paused": job.paused,
                "sweep_id": job.sweep_id, "sweep_trial": job.sweep_trial, "experiment": job.spec.get("experiment"),
                "tags": job.spec.get("tags", []), "progress": {"epoch": job.epoch, "epochs": job.epochs},
                "attempts": job.attempts, "max_attempts": job.max_attempts,
                "best": {"metric": job.best_metric, "value": job.best_value, "epoch": job.best_epoch},
                "final_metrics": job.final_metrics, "stop_reason": job.stop_reason, "error": job.error,
                "pending_reason": job.pending_reason, "cancel_requested": job.cancel_requested, "queue": job.queue,
                "device": job.device, "worker_id": job.worker_id, "created_at": job.created_at.isoformat(),
                "started_at": job.started_at and job.started_at.isoformat(),
                "finished_at": job.finished_at and job.finished_at.isoformat(),
                "updated_at": job.updated_at.isoformat(),
                "links": {name: f"{base}/{name}" for name in ("metrics", "logs", "weights", "checkpoints", "cancel")}
                | {"self": base}}

    @app.get(f"{API}/health")
    def health():
        return answer({"status": "ok"})

    @app.get(f"{API}/jobs/<job_id>")
    def get_job(job_id):
        with engine.connect() as conn:
            user = caller(conn)
            if user is None:
                return answer({"title": "Unauthorized"}, 401)
            job = conn.execute(select(jobs).where(jobs.c.id == job_id, jobs.c.user_id == user.id)).first()
        if job is None:
            return answer({"title": "Not Found"}, 404)
        return answer(job_fields(job, user.name) | {"spec": job.spec})

    @app.get(f"{API}/jobs")
    def list_jobs():
        with engine.connect() as conn:
            user = caller(conn)
            if user is None:
                return answer({"title": "Unauthorized"}, 401)
            rows = conn.execute(select(jobs).where(jobs.c.user_id == user.id)
                                .order_by(jobs.c.created_at.desc(), jobs.c.id.desc()).limit(page_size + 1)).all()
        page = rows[:page_size]
        more = len(rows) > page_size
        return answer({"jobs": [job_fields(job, user.name) for job in page],
                       "next_cursor": f"{page[-1].created_at.isoformat()},{page[-1].id}" if more else None})

    @app.get(f"{API}/jobs/<job_id>/metrics")
    def metrics(job_id):
        since = int(request.args.get("since_epoch", 0))
        most = int(request.args.get("max_points", 0))
        with engine.connect() as conn:
            user = caller(conn)
            if user is None:
                return answer({"title": "Unauthorized"}, 401)
            status = conn.scalar(select(jobs.c.status).where(jobs.c.id == job_id, jobs.c.user_id == user.id))
            if status is None:
                return answer({"title": "Not Found"}, 404)
            mine = (epochs.c.job_id == job_id, epochs.c.epoch > since)
            columns = select(epochs.c.epoch, epochs.c["values"])
            next_since = None
            if most:
                # The bench's epochs are contiguous: the chosen ones are computed from the count and the first.
                count, first = conn.execute(select(func.count(), func.min(epochs.c.epoch)).where(*mine)).one()
                chosen = [first + i for i in evenly_spaced(count, most)]
                rows = conn.execute(columns.where(epochs.c.job_id == job_id, epochs.c.epoch.in_(chosen))
                                    .order_by(epochs.c.epoch)).all()
            else:
                rows = conn.execute(columns.where(*mine).order_by(epochs.c.epoch).limit(metrics_page + 1)).all()
                if len(rows) > metrics_page:
                    rows = rows[:metrics_page]
                    next_since = rows[-1].epoch
        return answer({"metrics": [{"epoch": epoch, **values} for epoch, values in rows], "status": status,
                       "next_since_epoch": next_since})

    return app


def evenly_spaced(count: int, most: int) -> list[int]:
    """Indexes of at most ``most`` of ``count`` rows, evenly spaced, first and last kept (api/downsample.py's)."""
    from api.downsample import evenly

    return evenly(range(count), most)


# --- the data ------------------------------------------------------------------------------------


def fill(sessions, jobs: int, epoch_count: int) -> tuple[str, list[str], str]:
    """A user with its key, ``jobs`` jobs of it and as many of another user's, and one job of ``epoch_count``
    epochs; returns (the token, the user's job ids, the long job's id)."""
    from specs import blobs_spec
    from sqlalchemy import insert

    from api.auth import create_api_key
    from models.tables import EpochMetrics, Job, User, utcnow

    with sessions() as session:
        token = create_api_key(session, "bench", "bench")
        create_api_key(session, "other", "other")
        users = {user.name: user.id for user in session.query(User)}
        statuses = ("succeeded", "failed", "queued", "running", "cancelled")
        start = utcnow() - dt.timedelta(days=1)
        rows = []
        for owner in ("bench", "other"):
            for i in range(jobs):
                spec = {**blobs_spec(f"{owner}-{i}", epochs=20), "experiment": "bench", "tags": ["bench"]}
                rows.append(dict(id=f"job_{owner}_{i:05d}", user_id=users[owner], name=spec["name"], spec=spec,
                                 status=statuses[i % len(statuses)], epochs=20, epoch=20 if i % 5 != 2 else 0,
                                 best_metric="val_loss", best_value=0.1, best_epoch=17, queue="cpu",
                                 experiment="bench", attempts=1, final_metrics={"val_loss": 0.1, "loss": 0.09},
                                 created_at=start + dt.timedelta(seconds=i), updated_at=start))
        long_id = "job_bench_long"
        spec = blobs_spec("long", epochs=epoch_count)
        rows.append(dict(id=long_id, user_id=users["bench"], name="long", spec=spec, status="succeeded",
                         epochs=epoch_count, epoch=epoch_count, queue="cpu", attempts=1, created_at=start,
                         updated_at=start))
        session.execute(insert(Job), rows)
        session.execute(insert(EpochMetrics), [
            dict(job_id=long_id, epoch=epoch, attempt=1, created_at=start,
                 values={"loss": 1 / epoch, "val_loss": 1.1 / epoch, "accuracy": 0.9, "val_accuracy": 0.88,
                         "lr": 0.001, "epoch_seconds": 0.01})
            for epoch in range(1, epoch_count + 1)])
        session.commit()
    return token, [row["id"] for row in rows if row["user_id"] == users["bench"] and row["id"] != long_id], long_id


# --- the servers and the client ------------------------------------------------------------------


class BareServer:
    """The bare app under the same gunicorn command line as ``torchyard api`` (api/gunicorn_worker.py)."""

    def __init__(self, settings, env: dict[str, str], log_path: Path, workers: int):
        from private_servers import _wait, free_port

        from api.gunicorn_worker import gunicorn_argv

        self.port = free_port()
        argv = gunicorn_argv(settings, f"127.0.0.1:{self.port}", workers)
        assert argv[-1] == "api:create_app()", argv
        argv = [*argv[:-1], "--pythonpath", ROOT, BARE_APP]
        self.log_path = log_path
        with open(log_path, "ab") as log:
            self.process = subprocess.Popen([sys.executable, "-m", *argv], env=env, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        _wait(self.answers, 60, f"the bare app (gunicorn) on {self.port}", log_path)

    def answers(self) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError(f"the bare app exited ({self.process.returncode}): see {self.log_path}")
        try:
            connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
            connection.request("GET", f"{API}/health")
            return connection.getresponse().status == 200
        except OSError:
            return False

    def stop(self) -> None:
        from private_servers import _stop_process

        _stop_process(self.process)


def timed(port: int, token: str, paths: list[str], count: int) -> list[float]:
    """Seconds of each of ``count`` sequential GETs (cycling through ``paths``) on one kept-alive connection,
    after one untimed request that opens it."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Authorization": f"Bearer {token}"}

    def get(path: str) -> None:
        connection.request("GET", path, headers=headers)
        response = connection.getresponse()
        body = response.read()
        if response.status != 200:
            raise RuntimeError(f"GET {path} on {port}: {response.status} {body[:300]!r}")

    get(paths[0])
    seconds = []
    for i in range(count):
        started = time.perf_counter()
        get(paths[i % len(paths)])
        seconds.append(time.perf_counter() - started)
    connection.close()
    return seconds


def load() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=10, help="rounds; each times every endpoint on both sides")
    parser.add_argument("--requests", type=int, default=100, help="sequential requests per endpoint, side, round")
    parser.add_argument("--jobs", type=int, default=300, help="jobs of the user (and as many of another user)")
    parser.add_argument("--epochs", type=int, default=10_000, help="epochs of metrics of the long job")
    parser.add_argument("--workers", type=int, default=None, help="gunicorn processes (default: the setting's)")
    args = parser.parse_args()

    import psycopg
    from conftest import settings_env
    from private_servers import ApiServer, PrivateRedis

    from migrations.apply import upgrade
    from models.db import make_engine, make_sessionmaker
    from models.settings import Settings

    home = Path(tempfile.mkdtemp(prefix="torchyard-bench-api-"))
    redis = PrivateRedis(home / "redis")
    database = f"torchyard_bench_api_{secrets.token_hex(6)}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{database}"')
    servers: list = []
    engine = None
    try:
        settings = Settings(home=home, broker_url=redis.url(), rate_limit_read=READ_BUDGET, database_url=(
            f"postgresql+psycopg://postgres@127.0.0.1:5432/{database}")).resolved()
        workers = args.workers or settings.api_workers
        upgrade(settings.database_url)
        engine = make_engine(settings.database_url)
        token, job_ids, long_id = fill(make_sessionmaker(engine), args.jobs, args.epochs)
        env = settings_env(settings)
        before = load()
        sides = {"torchyard": ApiServer(env, home / "api.log", workers=workers)}
        servers.append(sides["torchyard"])
        sides["bare"] = BareServer(settings, env, home / "bare.log", workers)
        servers.append(sides["bare"])
        ports = {"torchyard": sides["torchyard"].port, "bare": sides["bare"].port}
        endpoints = {
            "GET /jobs/<id>": [f"{API}/jobs/{job_id}" for job_id in job_ids[:50]],
            "GET /jobs (first page)": [f"{API}/jobs"],
            "GET /jobs/<id>/metrics": [f"{API}/jobs/{long_id}/metrics"],
            "  ?max_points=500": [f"{API}/jobs/{long_id}/metrics?max_points=500"],
        }
        seconds = {(name, side): [] for name in endpoints for side in sides}
        for round_number in range(args.rounds + 1):  # round 0 warms both up and is not counted
            order = list(sides) if round_number % 2 else list(reversed(sides))
            for name, paths in endpoints.items():
                for side in order:
                    taken = timed(ports[side], token, paths, args.requests if round_number else 10)
                    if round_number:
                        seconds[(name, side)].extend(taken)
        after = load()
        print(f"PostgreSQL database {database}, private Redis; {args.jobs} jobs of the caller and {args.jobs} of "
              f"another user, one job of {args.epochs} epochs; gunicorn {workers} processes x "
              f"{settings.api_threads} threads each side; "
              f"{args.rounds} rounds x {args.requests} sequential requests per endpoint and side, one client, "
              "keep-alive")
        print(f"load average before: {before} (other processes on this machine skew the figures)")
        print(f"{'endpoint':<24}{'torchyard p50':>14}{'p99':>11}{'req/s':>8}{'bare p50':>11}{'p99':>11}{'req/s':>8}"
              f"{'ratio':>8}")
        for name in endpoints:
            figures = {side: seconds[(name, side)] for side in sides}
            rates = {side: len(taken) / sum(taken) for side, taken in figures.items()}
            cells = "".join(f"{ms(p50(taken)):>{14 if side == 'torchyard' else 11}}{ms(p99(taken)):>11}"
                            f"{rates[side]:>8.0f}" for side, taken in figures.items())
            print(f"{name:<24}{cells}{rates['torchyard'] / rates['bare']:>8.2f}")
        print("ratio: torchyard requests/s / bare requests/s (goal >= 0.9)")
        print(f"load average after:  {after}")
    finally:
        for server in reversed(servers):
            server.stop()
        redis.close()
        if engine is not None:
            engine.dispose()
        with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


def p50(values: list[float]) -> float:
    return statistics.median(values)


def p99(values: list[float]) -> float:
    return sorted(values)[min(len(values) - 1, int(len(values) * 0.99))]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


if __name__ == "__main__":
    main()
