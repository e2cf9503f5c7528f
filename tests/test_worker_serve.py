"""``serve()`` is the whole service on one machine: it migrates, prints a token, trains jobs submitted
over real HTTP, and on Ctrl-C or SIGTERM stops its worker cleanly."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
from sqlalchemy import select

from models.db import make_engine, make_sessionmaker
from models.tables import Worker

SPEC = {"task": "binary",
        "data": {"source": "sklearn", "name": "make_moons", "params": {"n_samples": 200, "random_state": 0}},
        "model": {"layers": [{"type": "Linear", "out_features": 8}, {"type": "ReLU"},
                             {"type": "Linear", "out_features": 1}]},
        "training": {"epochs": 3, "batch_size": 50}}


def call(url: str, token: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Authorization": f"Bearer {token}",
                                                              "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def poll(predicate, timeout: float, what: str, process: subprocess.Popen):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"serve exited early:\n{process.stdout.read()}"
        try:
            value = predicate()
        except OSError:  # not listening yet
            value = None
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_serve_trains_a_job_over_http_and_stops_its_worker_on_ctrl_c_or_sigterm(serve_deployment, stop_signal):
    settings, env = serve_deployment
    base = f"http://127.0.0.1:{settings.port}/api/v1"
    process = subprocess.Popen([sys.executable, "-c", "from torchyard.serve import serve; serve()"], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        token_file = settings.home / "token"
        token = poll(lambda: token_file.is_file() and token_file.read_text().strip(), 60, "the token", process)
        job = poll(lambda: call(f"{base}/jobs", token, SPEC), 60, "the API", process)
        finished = poll(lambda: (j := call(f"{base}/jobs/{job['id']}", token))["status"] in ("succeeded", "failed")
                        and j, 90, "the job to finish", process)
        assert finished["status"] == "succeeded", finished
        assert oct(token_file.stat().st_mode & 0o777) == "0o600"
        with urllib.request.urlopen(f"http://127.0.0.1:{settings.port}/", timeout=10) as page:  # the dashboard
            assert page.headers.get_content_type() == "text/html"

        process.send_signal(stop_signal)
        output, _ = process.communicate(timeout=90)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, output
    assert token in output and base in output
    assert f"http://127.0.0.1:{settings.port}/ " in output  # the dashboard's URL, printed first
    engine = make_engine(settings.database_url)
    with make_sessionmaker(engine)() as session:
        assert session.scalars(select(Worker)).all() == []  # the worker shut down and left the registry
    engine.dispose()
