"""Which device a run uses."""

from __future__ import annotations

import torch

from models.spec import Problem, SpecError


def thread_share(threads: int, parts: int) -> int:
    """One of ``parts`` processes' share of ``threads`` intra-op threads, at least one: a worker's slots split the
    machine's (worker.cpus), a data-parallel job's ranks split their slot's, instead of each taking every core."""
    return max(1, threads // max(1, parts))


def pick_device(requested: str = "auto", rank: int = 0) -> torch.device:
    """cuda, then mps, then cpu for 'auto'; an explicit device that isn't there is a clear error.

    Under data parallelism rank r uses GPU r of those visible to the job.
    """
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", rank) if rank else torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not available[requested]:
        raise SpecError([Problem("resources.device", f"{requested!r} was asked for but this machine has none")])
    return torch.device("cuda", rank) if requested == "cuda" and rank else torch.device(requested)


def seed(value: int, device: torch.device) -> None:
    """Seed the CPU's generator (networks are built on the CPU) and, for a job on an accelerator, its own.

    Not ``torch.manual_seed``: that also queues a seed for each backend not yet initialised and formats the
    caller's stack for each one, about 1 ms deep inside a Celery worker, before every job.
    """
    torch.random.default_generator.manual_seed(value)
    if device.type == "cuda":
        torch.cuda.manual_seed_all(value)
    elif device.type == "mps":
        torch.mps.manual_seed(value)
