"""Servers of a test's (or a bench's) own, on free ports, that it may flush, stop and restart.

The shared PostgreSQL (5432) and Redis (6379) are never stopped or flushed by tests that break servers:
they start one of these instead. Each start fails loudly (RuntimeError with the server's log) when the
server does not come up; nothing here skips.

Used by tests/conftest.py (fixtures ``private_redis``, ``private_postgres``, ``http_service``) and by
bench/queue_latency.py, so it imports neither pytest nor the conftest.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _wait(predicate, timeout: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not come up within {timeout} s\n--- {log} ---\n{_tail(log)}")


def _stop_process(process: subprocess.Popen, timeout: float = 30) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


class PrivateRedis:
    """``redis-server`` without persistence on a free port: a restart loses every key, as a crash would."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.log_path = self.directory / "redis.log"
        self.process: subprocess.Popen | None = None
        self.start()

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def client(self):
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=2, socket_timeout=10)

    def ping(self) -> bool:
        import redis

        try:
            return bool(self.client().ping())
        except redis.RedisError:
            return False

    def start(self, timeout: float = 30) -> None:
        if shutil.which("redis-server") is None:
            raise RuntimeError("redis-server is not on PATH")
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--dir", str(self.directory)],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        _wait(lambda: self.process.poll() is None and self.ping(), timeout, f"redis-server on {self.port}",
              self.log_path)

    def stop(self) -> None:
        if self.process is not None:
            _stop_process(self.process)

    def restart(self) -> None:
        """Stop the server and start it again on the same port (empty: it keeps nothing on disk)."""
        self.stop()
        self.start()

    def flushall(self) -> None:
        self.client().flushall()

    def close(self) -> None:
        self.stop()


def _as_postgres(command: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: run its tools as the ``postgres`` user then."""
    if os.geteuid() != 0:
        return command
    if shutil.which("runuser"):
        return ["runuser", "-u", "postgres", "--", *command]
    return ["su", "postgres", "-c", " ".join(command)]


class PrivatePostgres:
    """A throwaway PostgreSQL cluster (initdb, trust auth) on a free port, under a folder of its own.

    The folder is made in the system temp folder (pytest's are private to root, and the server runs as
    ``postgres`` when this runs as root) and removed by ``close``.
    """

    def __init__(self):
        for tool in ("initdb", "pg_ctl"):
            if shutil.which(tool) is None:
                raise RuntimeError(f"{tool} is not on PATH")
        self.directory = Path(tempfile.mkdtemp(prefix="torchyard-pg-"))
        self.data = self.directory / "data"
        self.log_path = self.directory / "postgres.log"
        self.port = free_port()
        if os.geteuid() == 0:
            shutil.chown(self.directory, "postgres")
        self._run(["initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "--no-sync"], 120)
        self.start()

    def _run(self, command: list[str], timeout: float) -> None:
        done = subprocess.run(_as_postgres(command), capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
                               f"\n--- {self.log_path} ---\n{_tail(self.log_path)}")

    def _pg_ctl(self, action: str, *extra: str, timeout: float = 120) -> None:
        options = f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(["pg_ctl", "-D", str(self.data), "-l", str(self.log_path), "-w", "-t", str(int(timeout)),
                   "-o", options, action, *extra], timeout + 10)

    def start(self) -> None:
        self._pg_ctl("start")

    def stop(self, mode: str = "fast") -> None:
        self._pg_ctl("stop", "-m", mode)

    def restart(self, mode: str = "fast") -> None:
        self._pg_ctl("restart", "-m", mode)

    def url(self, database: str = "postgres") -> str:
        """A SQLAlchemy URL (psycopg 3 driver)."""
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(f"postgresql://postgres@127.0.0.1:{self.port}/postgres", autocommit=True,
                             connect_timeout=10) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def close(self) -> None:
        try:
            if (self.data / "postmaster.pid").exists():
                self.stop("immediate")
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)


class ApiServer:
    """The production API process, ``torchyard api`` (gunicorn), on a free port of 127.0.0.1."""

    def __init__(self, env: dict[str, str], log_path: Path, workers: int = 2):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_path)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "torchyard.cli", "api", "--bind", f"127.0.0.1:{self.port}",
                 "--workers", str(workers)],
                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        _wait(self.answers, 60, f"the API (gunicorn) on {self.port}", self.log_path)

    def answers(self) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError(f"the API exited ({self.process.returncode}):\n{_tail(self.log_path)}")
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/health", timeout=5):
                return True
        except urllib.error.HTTPError:
            return True  # 503: it answers, a dependency doesn't (yet)
        except OSError:
            return False

    def log(self, lines: int = 40) -> str:
        return _tail(self.log_path, lines)

    def stop(self) -> None:
        _stop_process(self.process)
