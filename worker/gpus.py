"""GPU slots: how many jobs a GPU worker runs at once, and which GPUs each of its pool processes uses; and
whether a worker serving the ``mps`` queue has Apple's MPS at all.

A worker that serves a GPU queue on a machine with N GPUs (``worker_gpus``) and k GPUs a slot
(``worker_gpus_per_slot``) runs N // k slots: its prefork pool gets that many processes, and pool process
i pins itself to GPUs i*k … i*k+k-1 by setting ``CUDA_VISIBLE_DEVICES`` as it starts, before anything in it
touches CUDA. Inside a job, ``cuda`` (and ``cuda:0`` … ``cuda:k-1`` for the ranks of a k-GPU job, which
inherit the variable) are then that slot's GPUs and no other job's. Billiard numbers its pool processes
0..n-1 and gives a replacement process the number of the one it replaces, so a slot keeps its GPUs when
its process is replaced.

The main process only counts GPUs (``torch.cuda.device_count()`` asks NVML without initialising CUDA),
so the pool can still fork; device names and memory, and whether MPS is there, come from short-lived
subprocesses (asking for MPS starts Metal, and a process that has started it must not fork).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from dataclasses import dataclass

from models.queues import MPS, queue_gpus, who_serves
from models.settings import Settings

log = logging.getLogger(__name__)

VISIBLE = "CUDA_VISIBLE_DEVICES"
MAX_DEVICE_LABEL = 100  # the jobs.device column
_PROPERTIES = (
    "import json, torch\n"
    "props = [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())]\n"
    "print(json.dumps([{'name': p.name, 'memory_bytes': p.total_memory} for p in props]))\n"
)
_MPS_AVAILABLE = "import torch; print(torch.backends.mps.is_available())"


@dataclass(frozen=True)
class GpuPlan:
    """A GPU worker's GPUs and how they are cut into job slots."""

    gpus: tuple[str, ...]  # the GPUs as CUDA_VISIBLE_DEVICES names them (indices, or UUIDs if so given)
    per_slot: int
    detected: int  # CUDA devices this machine has; GPUs past these are simulated (a machine without CUDA)

    @property
    def slots(self) -> int:
        return len(self.gpus) // self.per_slot

    def slot_gpus(self, index: int) -> tuple[str, ...]:
        """The GPUs of slot ``index``."""
        if not 0 <= index < self.slots:
            raise ValueError(f"slot {index} does not exist; this worker has {self.slots} slot(s)")
        return self.gpus[index * self.per_slot:(index + 1) * self.per_slot]


def detect_gpus() -> int:
    """CUDA devices visible to this process, counted through NVML (CUDA stays uninitialised)."""
    import torch

    return torch.cuda.device_count()


def make_plan(settings: Settings, detected: int | None = None) -> GpuPlan:
    """The GPU plan of ``settings`` on this machine; ValueError when it asks for GPUs that aren't there."""
    detected = detect_gpus() if detected is None else detected
    count = detected if settings.worker_gpus == "auto" else settings.worker_gpus
    if detected and count > detected:
        raise ValueError(f"TORCHYARD_WORKER_GPUS={count} but this machine has {detected} CUDA device(s)")
    visible = os.environ.get(VISIBLE)
    if detected and visible:
        # The worker itself may be confined (a container runtime, a scheduler): its slots share out the
        # GPUs it was given, named as it was given them.
        names = [name.strip() for name in visible.split(",") if name.strip()][:count]
    else:
        names = [str(index) for index in range(count)]
    return GpuPlan(gpus=tuple(names), per_slot=settings.worker_gpus_per_slot, detected=detected)


def gpu_slots(plan: GpuPlan, queues: list[str]) -> int | None:
    """How many slots a worker over ``queues`` runs: the plan's for a GPU worker, None for a CPU one.

    ValueError when the worker serves a GPU queue it can't hold a job of.
    """
    needs = {queue: queue_gpus(queue) for queue in queues if queue_gpus(queue)}
    if not needs:
        return None
    served = ", ".join(needs)
    if not plan.gpus:
        raise ValueError(f"queue(s) {served} need GPUs, but this worker has none (TORCHYARD_WORKER_GPUS)")
    if plan.slots == 0:
        raise ValueError(f"queue(s) {served} need GPUs, but this worker's {len(plan.gpus)} GPU(s) are fewer than "
                         f"one slot's {plan.per_slot} (TORCHYARD_WORKER_GPUS_PER_SLOT)")
    for queue, gpus in needs.items():
        if gpus > plan.per_slot:
            raise ValueError(
                f"queue {queue} is for jobs needing {gpus} GPUs, but a slot of this worker holds "
                f"{plan.per_slot} (TORCHYARD_WORKER_GPUS_PER_SLOT={gpus} serves it)")
    return plan.slots


def check_mps(queues: list[str]) -> None:
    """ValueError when the worker serves ``mps`` on a machine where torch has no MPS: its jobs would fail
    there, while unserved they wait (saying so) for a worker on a Mac."""
    if MPS in queues and not mps_available():
        raise ValueError(f"queue {MPS} is for {who_serves(MPS)}, but torch.backends.mps.is_available() is "
                         f"false on this machine; serve it from a Mac with Apple silicon")


def mps_available() -> bool:
    """Whether torch can use Apple's MPS here, asked in a subprocess (Metal starts there only)."""
    try:
        done = subprocess.run([sys.executable, "-c", _MPS_AVAILABLE], capture_output=True, text=True,
                              timeout=120, check=True)
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("could not ask torch whether MPS is available (%s); taking it as not", exc)
        return False
    return done.stdout.strip().endswith("True")


def device_properties(plan: GpuPlan) -> list[dict]:
    """Name and memory of each real GPU, asked of torch in a subprocess (CUDA initialised there only)."""
    if not plan.detected:
        return []
    try:
        done = subprocess.run([sys.executable, "-c", _PROPERTIES], capture_output=True, text=True,
                              timeout=120, check=True)
        return json.loads(done.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError) as exc:
        log.warning("could not read the GPUs' names and memory (%s); the registry lists them unnamed", exc)
        return []


def registry_devices(plan: GpuPlan) -> dict:
    """What the workers table records of a GPU worker: cores, GPUs (name, memory, slot), GPUs a slot."""
    real = device_properties(plan)
    gpus = []
    for position, name in enumerate(plan.gpus):
        slot = position // plan.per_slot
        entry = {"id": name, "slot": slot if slot < plan.slots else None}
        if position < plan.detected:
            entry.update(real[position] if position < len(real) else {"name": None, "memory_bytes": None})
        else:
            entry.update(name="simulated", memory_bytes=None, simulated=True)
        gpus.append(entry)
    return {"cpu": os.cpu_count() or 1, "cuda": len(plan.gpus), "gpus_per_slot": plan.per_slot, "gpus": gpus}


# --- this process's slot -------------------------------------------------------------------------

# Set in the worker's main process before the pool forks (children inherit it), and per pool process.
_plan: GpuPlan | None = None
_slot: tuple[str, ...] | None = None


def set_plan(plan: GpuPlan | None) -> None:
    global _plan
    _plan = plan


def plan() -> GpuPlan | None:
    """The GPU plan of this worker; None for a CPU worker."""
    return _plan


def pin_slot(index: int) -> tuple[str, ...]:
    """Make this pool process slot ``index``: its jobs see only the slot's GPUs."""
    global _slot
    if _plan is None:
        raise RuntimeError("not a GPU worker")
    try:
        gpus = _plan.slot_gpus(index)
    except ValueError:
        # A process past the slots (it can't happen: the pool has as many processes as slots) sees no GPU
        # at all rather than all of them, so its jobs fail instead of sharing another slot's GPUs.
        log.error("pool process %s has no GPU slot; its jobs will see no GPU", index)
        gpus = ()
    os.environ[VISIBLE] = ",".join(gpus)
    _slot = gpus
    return gpus


def slot_gpus() -> tuple[str, ...] | None:
    """The GPUs pinned to this pool process; None outside a GPU worker's pool."""
    return _slot


def device_label(device: str | None) -> str | None:
    """What a job row records as its device: the torch device, and the slot's GPUs where pinned."""
    if _slot is None:
        return device
    label = f"{device or 'none'} ({VISIBLE}={','.join(_slot)})"
    return label if len(label) <= MAX_DEVICE_LABEL else label[:MAX_DEVICE_LABEL - 1] + "…"
