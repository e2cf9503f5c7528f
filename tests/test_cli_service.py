"""The service's CLI commands: db upgrade, token create, api (gunicorn) and worker argument checks."""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request

from conftest import wait_for
from proc_info import children, maps_any
from sqlalchemy import create_engine, inspect, select

from api.db import get_session
from models.tables import User


def cli_env(tmp_path, **extra) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("TORCHYARD_")}
    return {**env, "TORCHYARD_HOME": str(tmp_path / "home"), **extra}


def torchyard(*args, env, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torchyard.cli", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


def test_db_upgrade_creates_the_schema_and_token_create_prints_a_working_key(tmp_path):
    env = cli_env(tmp_path)
    upgraded = torchyard("db", "upgrade", env=env)
    assert upgraded.returncode == 0, upgraded.stderr
    tables = set(inspect(create_engine(f"sqlite:///{tmp_path / 'home/torchyard.db'}")).get_table_names())
    assert {"jobs", "epoch_metrics", "artifacts", "datasets", "api_keys", "users", "workers"} <= tables

    created = torchyard("token", "create", "laptop", "--user", "carol", env=env)
    assert created.returncode == 0, created.stderr
    token = created.stdout.strip()
    assert token.startswith("ty_") and len(token) > 30

    from api import create_app

    app = create_app({"TESTING": True, "database_url": f"sqlite:///{tmp_path / 'home/torchyard.db'}",
                      "artifacts_url": str(tmp_path / "artifacts")})
    client = app.test_client()
    assert client.get("/api/v1/jobs", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    assert client.get("/api/v1/jobs", headers={"Authorization": f"Bearer {token}x"}).status_code == 401

    refused = torchyard("token", "create", "laptop", "--user", "eve\x1b[2J", env=env)
    assert refused.returncode == 2
    assert "user name 'eve\\x1b[2J': '\\x1b' at position 3 is a control character" in refused.stderr
    with app.app_context():
        assert get_session().scalars(select(User.name)).all() == ["carol"]  # nothing stored for the refusal


@contextlib.contextmanager
def served_api(env, on_start=None):
    """``torchyard api`` (gunicorn, one process) on a free port; yields its base URL once /health answers
    (having called ``on_start`` with the gunicorn master's pid)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "torchyard.cli", "api", "--bind", f"127.0.0.1:{port}",
                               "--workers", "1"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline, health = time.monotonic() + 60, None
        while health is None and time.monotonic() < deadline and server.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/health", timeout=2) as response:
                    health = json.loads(response.read())
            except OSError:
                time.sleep(0.2)
        assert health is not None, server.stdout.read1().decode() if server.poll() is not None else "no answer"
        assert health["status"] == "ok"
        if on_start is not None:
            on_start(server.pid)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_torchyard_api_serves_under_gunicorn_and_its_worker_imports_scikit_learn_before_a_spec_needs_it(tmp_path):
    env = cli_env(tmp_path)
    assert torchyard("db", "upgrade", env=env).returncode == 0
    masters = []
    with served_api(env, on_start=masters.append) as url:  # it waits for /health to say ok
        assert url.startswith("http://127.0.0.1:")
        (worker,) = children(masters[0])
        # No spec was submitted: only the warm-up (api.gunicorn_hooks.post_worker_init) loads scikit-learn.
        wait_for(lambda: maps_any(worker, ("/sklearn/",)), 60,
                 "the API worker to import scikit-learn")



def test_a_spec_or_an_upload_over_the_server_s_limit_is_said_as_its_413_not_as_a_connection_error(tmp_path):
    # The server answers 413 before reading the body and closes, so the CLI's send breaks midway (a body
    # far larger than the socket buffers): it must still read and print that answer.
    env = cli_env(tmp_path, TORCHYARD_MAX_UPLOAD_BYTES=str(1024 * 1024))
    assert torchyard("db", "upgrade", env=env).returncode == 0
    key = torchyard("token", "create", "laptop", "--user", "carol", env=env).stdout.strip()
    big_spec = tmp_path / "big.json"
    big_spec.write_text(json.dumps({"name": "big", "notes": "x" * 8_000_000}))
    big_csv = tmp_path / "big.csv"
    big_csv.write_text("a,b,label\n" + "0.5,0.25,1\n" * 2_000_000)
    with served_api(env) as url:
        client_env = {**env, "TORCHYARD_URL": url, "TORCHYARD_TOKEN": key}
        submitted = torchyard("submit", str(big_spec), env=client_env)
        uploaded = torchyard("upload", str(big_csv), env=client_env)
    assert (submitted.returncode, submitted.stdout) == (1, "")
    assert submitted.stderr == ("Error: 413 Content Too Large: the spec is larger than 1048576 bytes "
                                "(max_spec_bytes)\n")
    assert (uploaded.returncode, uploaded.stdout) == (1, "")
    assert uploaded.stderr == ("Error: 413 Content Too Large: the request body is larger than 1048576 bytes "
                               "(max_upload_bytes)\n")


def test_worker_refuses_an_unknown_queue(tmp_path):
    refused = torchyard("worker", "--queues", "tpu", env=cli_env(tmp_path))
    assert refused.returncode == 2
    assert "unknown queue(s) tpu" in refused.stderr


def test_an_unknown_setting_is_an_error_not_ignored(tmp_path):
    run = torchyard("db", "upgrade", env=cli_env(tmp_path, TORCHYARD_DATABSE_URL="sqlite://"))
    assert run.returncode != 0
    assert "unknown setting TORCHYARD_DATABSE_URL" in run.stderr


def test_an_api_that_does_not_answer_is_named_by_its_url(tmp_path):
    with socket.socket() as sock:  # a free port, closed again: nothing listens there
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    run = torchyard("status", "job_1", env=cli_env(tmp_path, TORCHYARD_URL=url, TORCHYARD_TOKEN="ty_x"))
    assert run.returncode == 1
    assert f"can't reach the torchyard API at {url} (" in run.stderr
    assert "TORCHYARD_URL" in run.stderr and "Traceback" not in run.stderr


def test_no_api_key_says_where_one_is_looked_for_and_how_to_make_one(tmp_path):
    run = torchyard("status", "job_1", env=cli_env(tmp_path))
    assert run.returncode == 2
    assert f"save one in {tmp_path / 'home' / 'token'}" in run.stderr
    assert "TORCHYARD_TOKEN" in run.stderr and "torchyard token create NAME" in run.stderr


def test_a_server_that_cuts_an_upload_off_without_an_answer_is_said_plainly_with_the_size_sent(tmp_path):
    listener = socket.create_server(("127.0.0.1", 0))

    def cut_off():  # reads the start of the request, then resets the connection: no answer at all
        connection, _ = listener.accept()
        connection.recv(65536)
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        connection.close()

    thread = threading.Thread(target=cut_off, daemon=True)
    thread.start()
    big_csv = tmp_path / "big.csv"
    big_csv.write_text("a,b,label\n" + "0.5,0.25,1\n" * 2_000_000)
    env = cli_env(tmp_path, TORCHYARD_URL=f"http://127.0.0.1:{listener.getsockname()[1]}", TORCHYARD_TOKEN="ty_x")
    try:
        uploaded = torchyard("upload", str(big_csv), env=env)
    finally:
        thread.join(timeout=30)
        listener.close()
    assert uploaded.returncode == 1 and "Traceback" not in uploaded.stderr
    said = re.fullmatch(r"Error: the server closed the connection while the request's body \(([\d,]+) bytes\) was "
                        r"being sent, likely because it is larger than the server's limit \(max_spec_bytes for a "
                        r"spec, max_upload_bytes for an upload\)\n", uploaded.stderr)
    assert said and int(said[1].replace(",", "")) > big_csv.stat().st_size, uploaded.stderr
