"""Data-parallel training on one machine: starting and stopping ranks 1..n-1 of a run.

The calling process is rank 0: it keeps the callbacks (metrics, checkpoints, lease) and writes every
file. Ranks 1..n-1 are subprocesses started here (``python -m worker.engine.rank``); a Celery pool
process may not fork multiprocessing children, but it may start plain subprocesses. Every rank reads
the spec and the limits from the one file rank 0 writes, so all check the job against the same limits.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import subprocess
import sys
from pathlib import Path

from models.spec import JobSpec, Limits

JOB_FILE = ".ranks.json"


def free_port() -> int:
    """A TCP port free on this machine now, for the process group to meet at."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def write_job(path: Path, spec: JobSpec, limits: Limits) -> None:
    """What every rank must agree on, as JSON: the spec and the limits it is held to."""
    path.write_text(json.dumps({"spec": spec.model_dump(mode="json"), "limits": dataclasses.asdict(limits)}))


def read_job(path: Path) -> tuple[JobSpec, Limits]:
    """The spec and limits ``write_job`` wrote."""
    job = json.loads(path.read_text())
    return JobSpec.model_validate(job["spec"]), Limits(**job["limits"])


def start_ranks(spec: JobSpec, limits: Limits, out_dir: Path, world_size: int, port: int, resume: bool,
                data_path: Path | None, device: str, threads: int) -> list[subprocess.Popen]:
    """Ranks 1..n-1 as subprocesses, each with ``threads`` CPU threads; they write nothing, rank 0 owns the
    output folder."""
    job_file = out_dir / JOB_FILE
    write_job(job_file, spec, limits)
    common = [sys.executable, "-m", "worker.engine.rank", str(job_file), str(out_dir),
              "--world-size", str(world_size), "--port", str(port), "--device", device, "--threads", str(threads)]
    common += ["--resume"] if resume else []
    common += ["--data-path", str(data_path)] if data_path else []
    return [subprocess.Popen([*common, "--rank", str(rank)]) for rank in range(1, world_size)]


def stop_ranks(ranks: list[subprocess.Popen], timeout: float = 30) -> None:
    """Wait for the ranks to end; kill one that doesn't within ``timeout`` seconds."""
    for process in ranks:
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
