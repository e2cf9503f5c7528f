"""No silent stall when a worker dies: ``torchyard serve`` restarts its worker and says so, ``torchyard
maintenance`` reaps and explains jobs while no worker is alive, and ``/health`` says degraded meanwhile."""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys

import pytest
from conftest import settings_env, wait_for
from specs import blobs_spec, long_spec
from sqlalchemy import select

from models.db import make_engine, make_sessionmaker
from models.tables import EpochMetrics, Job, Worker, utcnow
from torchyard.client import Client

EPOCHS = 30  # with fused Adam 12 epochs ended too soon for a kill to land mid-run
LONG = long_spec(EPOCHS, n_samples=3000, batch_size=8)  # seconds, on a fast machine too: a kill lands mid-run
HEALTH = "/api/v1/health"
NO_CPU_WORKER = "no live worker serves queue 'cpu'"
NOBODY_REAPS = "with an expired lease that nobody reaps (no worker and no `torchyard maintenance` is running)"


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request) -> str:
    """The /health tests run over both backends."""
    return request.getfixturevalue("postgres_url" if request.param == "postgresql" else "sqlite_url")


def torchyard(*args: str, env: dict, log_path) -> subprocess.Popen:
    """``torchyard ARGS`` as a process of its own, its output in ``log_path``."""
    with open(log_path, "ab") as log:
        return subprocess.Popen([sys.executable, "-m", "torchyard.cli", *args], env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)


def stop(process: subprocess.Popen, timeout: float = 90) -> int:
    """SIGTERM, as systemd and docker stop do; SIGKILL (and fail) if it hangs."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            pytest.fail("it did not stop on SIGTERM")
    return process.returncode


def epochs_by_attempt(sessions, job_id: str) -> dict[int, int]:
    with sessions() as session:
        rows = session.execute(select(EpochMetrics.attempt, EpochMetrics.epoch)
                               .where(EpochMetrics.job_id == job_id)).all()
    return {attempt: sum(1 for a, _ in rows if a == attempt) for attempt in sorted({a for a, _ in rows})}


# --- /health -------------------------------------------------------------------------------------


def add_worker(sessions, queues: str, heartbeat_age: dt.timedelta = dt.timedelta(0)) -> None:
    with sessions() as session:
        session.add(Worker(id=f"box:{queues}", hostname="box", queues=queues, slots=1,
                           last_heartbeat_at=utcnow() - heartbeat_age))
        session.commit()


def test_health_is_degraded_while_queued_jobs_have_no_live_worker_and_ok_once_one_serves_them(
        client, alice, spec, sessions):
    assert client.get(HEALTH).json["checks"]["workers"] == "ok"  # nothing queued: nothing stalls
    for _ in range(2):
        assert client.post("/api/v1/jobs", json=spec, headers=alice).status_code == 201
    add_worker(sessions, "cpu", heartbeat_age=dt.timedelta(minutes=5))  # dead: missed its heartbeats

    response = client.get(HEALTH)
    assert response.status_code == 200  # the API serves; restarting it would cure nothing
    assert response.json == {"status": "degraded", "checks": {
        "database": "ok", "broker": "skipped (filesystem transport)",
        "workers": f"degraded: {NO_CPU_WORKER} (2 queued jobs)",
        "rate_limits": "skipped (counted in this process's memory: one API process)"}}

    add_worker(sessions, "gpu,cpu")  # alive
    response = client.get(HEALTH)
    assert (response.status_code, response.json["status"], response.json["checks"]["workers"]) == (200, "ok", "ok")


def test_health_names_running_jobs_whose_expired_leases_nobody_reaps(client, alice, spec, set_job):
    job_id = client.post("/api/v1/jobs", json=spec, headers=alice).json["id"]
    set_job(job_id, status="running", attempts=1, worker_id="gone:1", lease_expires_at=utcnow())
    assert client.get(HEALTH).json["status"] == "ok"  # just expired: a live reaper's next round takes it

    set_job(job_id, lease_expires_at=utcnow() - dt.timedelta(minutes=5))
    response = client.get(HEALTH)
    assert (response.status_code, response.json["status"]) == (200, "degraded")
    assert response.json["checks"]["workers"] == f"degraded: 1 running job {NOBODY_REAPS}"


def test_health_is_an_error_not_degraded_when_the_database_is_down(make_app, tmp_path):
    down = make_app(database_url=f"sqlite:///{tmp_path / 'missing' / 'torchyard.db'}")
    response = down.test_client().get(HEALTH)
    assert (response.status_code, response.json["status"]) == (503, "error")
    assert response.json["checks"]["workers"].startswith("error: ")


# --- with no worker at all -----------------------------------------------------------------------


def test_with_no_worker_alive_health_says_so_and_torchyard_maintenance_requeues_and_explains(
        http_deployment, postgres_url):
    service = http_deployment(postgres_url, "filesystem://", workers=1)
    running = service.submit(LONG)
    service.wait_for(lambda: service.job(running)["progress"]["epoch"] >= 2, 90, "epoch 2")
    service.workers[0].kill()  # the only worker vanishes, pool and all: no reaper is left
    waiting = service.submit(blobs_spec())

    # Only the API is left. It requeues nothing, but /health says what stalls, and why.
    stalled = (f"degraded: {NO_CPU_WORKER} (1 queued job); 1 running job {NOBODY_REAPS}")
    health = service.wait_for(lambda: (h := service.http.health())["checks"]["workers"] == stalled and h,
                              60, "/health to name the stall")
    assert health["status"] == "degraded"
    assert service.job(running)["status"] == "running"
    assert service.job(waiting)["pending_reason"] is None

    log_path = service.settings.home / "maintenance.log"
    maintenance = torchyard("maintenance", env=settings_env(service.settings), log_path=log_path)
    try:
        def explained():
            jobs = [service.job(job_id) for job_id in (running, waiting)]
            return all(job["pending_reason"] == NO_CPU_WORKER for job in jobs) and jobs

        requeued, _ = wait_for(explained, 60, "both jobs to say no worker serves them", log_path.read_text)
        assert (requeued["status"], requeued["attempts"]) == ("queued", 1)
        assert f"reaper: job {running} (attempt 1) lost its worker {service.workers[0].worker_id}: queued" \
            in log_path.read_text()
        assert service.http.health()["checks"]["workers"] == f"degraded: {NO_CPU_WORKER} (2 queued jobs)"

        service.start_worker(name="second")  # a worker comes back: both run, the first resumes
        resumed = service.wait_status(running, timeout=180)
        assert (resumed["status"], resumed["attempts"], resumed["pending_reason"]) == ("succeeded", 2, None)
        by_attempt = epochs_by_attempt(service.sessions, running)
        assert set(by_attempt) == {1, 2} and sum(by_attempt.values()) == EPOCHS
        assert service.wait_status(waiting)["status"] == "succeeded"
        assert service.http.health() == {"status": "ok", "checks": {
            "database": "ok", "broker": "skipped (filesystem transport)", "workers": "ok",
            "rate_limits": "skipped (counted in this process's memory: one API process)"}}
    finally:
        assert stop(maintenance) == 0, log_path.read_text()
    assert "maintenance stopped" in log_path.read_text()


# --- torchyard serve -----------------------------------------------------------------------------


def serve(env: dict, log_path) -> subprocess.Popen:
    return torchyard("serve", env=env, log_path=log_path)


def test_serve_restarts_a_worker_killed_mid_job_and_the_job_resumes(serve_deployment, tmp_path):
    settings, env = serve_deployment
    log_path = tmp_path / "serve.log"
    process = serve(env, log_path)
    engine = make_engine(settings.database_url)
    sessions = make_sessionmaker(engine)
    try:
        def log() -> str:
            assert process.poll() is None, f"serve exited:\n{log_path.read_text()}"
            return log_path.read_text()

        token_file = settings.home / "token"
        wait_for(lambda: log() and token_file.is_file() and "API:" in log(), 60, "the token", log)
        client = Client(f"http://127.0.0.1:{settings.port}", token_file.read_text().strip())
        job_id = wait_for(lambda: _submit(client, LONG), 60, "the API", log)

        def epoch_and_worker():
            with sessions() as session:
                job = session.get(Job, job_id)
                return job.epoch >= 3 and job.worker_id
        worker_id = wait_for(epoch_and_worker, 90, "the job at epoch 3", log)
        assert client.job(job_id)["progress"]["epoch"] < EPOCHS // 2, "too quick to interrupt; make it longer"
        pid = int(worker_id.rsplit(":", 1)[1])  # the Celery main process (hostname:pid)

        os.kill(pid, signal.SIGKILL)

        finished = wait_for(lambda: (job := client.job(job_id))["status"] in ("succeeded", "failed") and job,
                            180, "the job to finish", log)
        assert (finished["status"], finished["attempts"]) == ("succeeded", 2), finished
        assert set(epochs_by_attempt(sessions, job_id)) == {1, 2}
        output = log()
        assert f"torchyard serve: the worker (pid {pid}) died: killed by SIGKILL; restarting it in 1 s" in output
        assert "torchyard serve: worker restarted (pid " in output
        assert f"reaper: job {job_id} (attempt 1) lost its worker {worker_id}: queued" in output
    finally:
        code = stop(process)
        engine.dispose()
    assert code == 0, log_path.read_text()


def test_serve_gives_up_loudly_on_a_worker_that_dies_at_start(serve_deployment, tmp_path):
    settings, env = serve_deployment
    # A GPU queue on a worker given no GPUs: the worker refuses to start, every time.
    env = {**env, "TORCHYARD_WORKER_QUEUES": "gpu", "TORCHYARD_WORKER_GPUS": "0",
           "TORCHYARD_SERVE_WORKER_RESTARTS": "1"}
    log_path = tmp_path / "serve.log"
    process = serve(env, log_path)
    try:
        code = process.wait(timeout=180)
    finally:
        stop(process)
    output = log_path.read_text()
    assert code == 1, output
    assert output.count("torchyard worker can't start: queue(s) gpu need GPUs") == 2
    assert "died: exited with status 1; restarting it in 1 s" in output
    assert "died 2 times in a row, each within 60 s of its start: giving up" in output


def _submit(client: Client, spec: dict) -> str | None:
    try:
        return client.submit(spec)["id"]
    except OSError:  # not listening yet
        return None
