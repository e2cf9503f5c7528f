"""Broker queues: which queue a job goes to, shared by the API (routing) and the workers (serving).

``cpu`` takes everything that asks for neither CUDA nor Apple's MPS; ``mps`` takes the jobs that ask for MPS
(served by workers on Macs, started with ``--queues mps``); GPU jobs go to a queue named by how many GPUs one
job needs: ``gpu`` for one, ``gpu.k`` for k. A worker whose slots hold k GPUs each serves ``gpu.k`` (and,
if it likes, the queues of smaller jobs). A job waits in its queue until a worker that has its device
serves it, rather than failing on one that hasn't. Torch-free and broker-free, so the API may import it.
"""

from __future__ import annotations

from models.spec import Resources

CPU = "cpu"
MPS = "mps"
GPU = "gpu"
MAX_GPUS = 64  # the most GPUs a spec may ask for (Resources.gpus)


def gpu_queue(gpus: int) -> str:
    """The queue of jobs that need ``gpus`` GPUs."""
    if not 1 <= gpus <= MAX_GPUS:
        raise ValueError(f"a job needs 1 to {MAX_GPUS} GPUs, not {gpus}")
    return GPU if gpus == 1 else f"{GPU}.{gpus}"


QUEUES: tuple[str, ...] = (CPU, MPS, *(gpu_queue(k) for k in range(1, MAX_GPUS + 1)))


def queue_gpus(queue: str) -> int:
    """How many CUDA GPUs one job of ``queue`` needs (0 for ``cpu`` and ``mps``); ValueError for an unknown queue."""
    if queue not in QUEUES:
        raise ValueError(f"unknown queue {queue!r}; queues: {describe_queues()}")
    if queue in (CPU, MPS):
        return 0
    return 1 if queue == GPU else int(queue.split(".", 1)[1])


def queue_for(resources: Resources) -> str:
    """The queue of a spec's resources: GPU workers take only jobs that ask for CUDA or for GPUs, MPS workers
    only jobs that ask for MPS ("auto" runs on whatever a cpu worker has)."""
    if resources.device == "cuda" or resources.gpus:
        return gpu_queue(resources.gpus or 1)
    if resources.device == "mps":
        return MPS
    return CPU


def describe_queues() -> str:
    """The queue names, short: ``cpu, mps, gpu, gpu.2 … gpu.64``."""
    return f"{CPU}, {MPS}, {GPU}, {gpu_queue(2)} … {gpu_queue(MAX_GPUS)}"


def who_serves(queue: str) -> str:
    """What a queue is for, in words (for pending reasons): ``jobs needing 4 GPUs``."""
    if queue == MPS:
        return "jobs needing Apple's MPS"
    gpus = queue_gpus(queue)
    if gpus == 0:
        return "CPU jobs"
    return "jobs needing 1 GPU" if gpus == 1 else f"jobs needing {gpus} GPUs"
