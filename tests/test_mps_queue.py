"""Jobs asking for Apple's MPS: routed to a queue of their own, served only by workers on a Mac, waiting
(and saying why) rather than failing on a worker without MPS; and such a worker refuses the queue."""

from __future__ import annotations

import subprocess
import sys

from conftest import running_service, settings_env, worker_settings
from specs import blobs_spec
from sqlalchemy import select

from migrations.apply import upgrade
from models.db import make_engine, make_sessionmaker
from models.liveness import no_worker_reason
from models.queues import MPS, QUEUES, describe_queues, queue_for, queue_gpus, who_serves
from models.spec import Resources
from models.tables import Worker

MPS_SPEC = {**blobs_spec("on-mps"), "resources": {"device": "mps"}}
NO_MPS = ("torchyard worker can't start: queue mps is for jobs needing Apple's MPS, but "
          "torch.backends.mps.is_available() is false on this machine; serve it from a Mac with Apple silicon")


def test_mps_is_a_queue_of_its_own_that_needs_no_cuda_gpu():
    assert queue_for(Resources(device="mps")) == MPS == "mps"
    assert MPS in QUEUES and queue_gpus(MPS) == 0
    assert who_serves(MPS) == "jobs needing Apple's MPS"
    assert describe_queues().startswith("cpu, mps, gpu, gpu.2")
    assert queue_for(Resources(device="auto")) == queue_for(Resources(device="cpu")) == "cpu"


def test_a_job_asking_for_mps_is_stored_and_published_on_the_mps_queue(client, alice, published, live_worker):
    response = client.post("/api/v1/jobs", json=MPS_SPEC, headers=alice)

    assert response.status_code == 201, response.get_json()
    job = response.get_json()
    assert job["queue"] == "mps" and published == [(job["id"], "mps")]


def test_an_mps_job_waits_saying_why_while_only_a_cpu_worker_is_live(tmp_path):
    with running_service(worker_settings(tmp_path / "home")) as service:
        waiting = service.submit(MPS_SPEC)
        ran = service.wait_status(service.submit(blobs_spec("on-cpu")))  # the cpu worker takes its own jobs

        reason = service.wait_for(lambda: service.job(waiting)["pending_reason"], 30, "the pending reason")

        assert ran["status"] == "succeeded"
        assert reason == no_worker_reason("mps")
        assert reason.startswith("no live worker serves queue 'mps'")
        job = service.job(waiting)
        assert (job["status"], job["attempts"], job["worker_id"], job["queue"]) == ("queued", 0, None, "mps")


def test_a_worker_asked_to_serve_mps_on_a_machine_without_it_refuses_to_start(tmp_path):
    settings = worker_settings(tmp_path / "home")
    upgrade(settings.database_url)

    done = subprocess.run([sys.executable, "-m", "torchyard.cli", "worker", "--queues", "mps"],
                          env=settings_env(settings), capture_output=True, text=True, timeout=180)

    assert done.returncode != 0
    assert NO_MPS in done.stdout + done.stderr, done.stdout + done.stderr
    engine = make_engine(settings.database_url)
    try:
        with make_sessionmaker(engine)() as session:
            assert session.scalars(select(Worker.id)).all() == []  # it never registered
    finally:
        engine.dispose()
