"""``torchyard serve`` is the whole service on one machine: it migrates, saves a token, serves the API under
gunicorn, trains jobs submitted over real HTTP, says where everything is in one quiet banner, and on Ctrl-C or
SIGTERM stops its API and worker cleanly, leaving no process behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
from conftest import wait_for
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
    assert base in output and str(token_file) in output
    assert token not in output  # a secret stays out of logs: the banner names its file
    assert f"dashboard:  http://127.0.0.1:{settings.port}/\n" in output  # the URL to open, printed first
    engine = make_engine(settings.database_url)
    with make_sessionmaker(engine)() as session:
        assert session.scalars(select(Worker)).all() == []  # the worker shut down and left the registry
    engine.dispose()


def descendants(pid: int) -> set[int]:
    """Every process below ``pid``, from /proc (Linux)."""
    parents = {}
    for stat in os.listdir("/proc"):
        if stat.isdigit():
            try:
                with open(f"/proc/{stat}/stat") as file:
                    parents[int(stat)] = int(file.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):  # gone meanwhile
                pass
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie has ended: only its exit status waits to be read)."""
    try:
        with open(f"/proc/{pid}/stat") as file:
            return file.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_serve_prints_one_quiet_banner_answers_and_ends_on_sigterm_with_0_and_no_process_left(serve_deployment,
                                                                                             tmp_path):
    settings, env = serve_deployment
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:  # not a terminal: what a log file, systemd or docker records
        process = subprocess.Popen([sys.executable, "-m", "torchyard.cli", "serve"], env=env, stdout=log,
                                   stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{settings.port}"

    def output() -> str:
        assert process.poll() is None, f"serve exited:\n{log_path.read_text()}"
        return log_path.read_text()

    try:
        # Up: the banner (once the API answers) and the worker's own "ready." line.
        wait_for(lambda: "torchyard serve is ready" in output() and " ready.\n" in output(), 90, "serve", output)
        with urllib.request.urlopen(f"{url}/api/v1", timeout=10) as index:
            assert (index.status, json.loads(index.read())["name"]) == (200, "torchyard")
            # serve's own wait for the API spent none of this address's budget: this request is its first
            assert int(index.headers["RateLimit-Remaining"]) == int(index.headers["RateLimit-Limit"]) - 1
        with urllib.request.urlopen(f"{url}/", timeout=10) as page:  # the URL the banner says to open
            assert (page.status, page.headers.get_content_type()) == (200, "text/html")
        processes = descendants(process.pid)
        assert len(processes) >= 4, processes  # gunicorn's master and worker, Celery's worker and its pool child

        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=90)
    finally:
        if process.poll() is None:
            process.kill()
    text = log_path.read_text()
    assert code == 0, text
    assert [pid for pid in processes if alive(pid)] == [], text
    home = settings.home
    banner = text[text.index("torchyard serve is ready"):].split("Ctrl-C stops it", 1)[0]
    for line in (f"dashboard:  {url}/\n", f"API:        {url}/api/v1", f"token:      {home / 'token'}",
                 f"database:   {settings.database_url}\n", f"artifacts:  {settings.artifacts_url}\n",
                 f"broker:     filesystem:// (folders under {home / 'broker'})"):
        assert line in banner, banner
    assert text.count("torchyard serve is ready") == 1
    assert "development server" not in text.lower()  # werkzeug's, with its colours: gunicorn serves the API
    assert "\x1b[" not in text  # no colour codes in a file
    assert "SecurityWarning" not in text  # Celery's warning to root, which these tests may run as
    assert " -------------- " not in text  # Celery's banner: serve prints its own
    assert "Warm shutdown" in text  # the worker checkpointed and requeued what it ran
