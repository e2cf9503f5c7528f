"""Whether a job fits this machine: its memory estimate (models.memory) against the device's own memory.

The API refuses jobs over the deployment's ``max_job_memory``; a worker may still hold less than that (a
small GPU, a small container). It checks before it loads anything and fails the job with the reason,
rather than being killed for memory on every attempt.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from models.catalog import DataShape
from models.memory import CUDA_CONTEXT, MemoryEstimate, estimate_memory, field_for, format_bytes, sklearn_shape
from models.spec import JobSpec, Problem, SpecError
from models.tabular import TableError, csv_header, npz_members, open_csv, open_npz

# Where a container's memory limit is read: cgroup v2, then v1 (the host's RAM says nothing of it).
_CGROUP_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


def host_memory() -> int:
    """Bytes of RAM this process may use: the machine's, or its container's limit when lower."""
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    for path in _CGROUP_LIMITS:
        try:
            limit = Path(path).read_text().strip()
        except OSError:
            continue
        if limit.isdigit():
            total = min(total, int(limit))
        break
    return total


def device_memory(device: torch.device, world_size: int = 1) -> tuple[int, str]:
    """Bytes the device of each of ``world_size`` ranks has (the smallest GPU's), and what it is called."""
    if device.type == "cuda":
        first = device.index or 0
        ranks = min(world_size, max(torch.cuda.device_count() - first, 1))  # too few GPUs fail elsewhere
        gpus = [torch.cuda.get_device_properties(first + rank) for rank in range(ranks)]
        smallest = min(gpus, key=lambda gpu: gpu.total_memory)
        return smallest.total_memory, f"GPU ({smallest.name})"
    return host_memory(), "RAM"  # the CPU, and mps: Apple's GPUs share the host's memory


def file_shape(spec: JobSpec, path: Path) -> tuple[DataShape, str]:
    """A CSV or NPZ file's shape from its header (an NPZ's array headers; a CSV's columns and lines), and its
    format: enough for an estimate without reading the data. Classes are taken to be 2 (the outputs come
    from the network's last layer)."""
    classes = None if spec.task == "regression" else 2
    try:
        if path.suffix.lower() == ".npz":
            with open_npz(path) as archive:
                members = npz_members(archive)
            x, y = members["X"].header.shape, members["y"].header.shape
            return DataShape(x[0], math.prod(x[1:]), y[1] if len(y) == 2 else 1, classes), "npz"
        with open_csv(path) as handle:
            columns = len(csv_header(handle))
        return DataShape(max(_lines(path) - 1, 1), columns - 1, 1, classes), "csv"  # blank lines count too
    except TableError as exc:
        raise SpecError([Problem("data", f"{path.name}: {exc}")]) from None


def _lines(path: Path) -> int:
    """Lines of a text file, the last one whether or not it ends with a newline."""
    lines, last = 0, b"\n"
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            lines, last = lines + chunk.count(b"\n"), chunk[-1:]
    return lines + (last != b"\n")


def check_memory(spec: JobSpec, device: str | torch.device, data_path: Path | None = None,
                 memory: int = 0) -> MemoryEstimate | None:
    """Raise SpecError if ``spec`` needs more memory than this machine has; return its estimate.

    ``data_path`` is the job's file (an upload or a local file); ``memory`` stands for the training device's
    memory when set (an operator's figure), else it is measured. Data or a network that don't fit together
    aren't judged here: loading the data says why.
    """
    device = torch.device(device)
    shape = sklearn_shape(spec)
    if shape is None:
        shape, source = file_shape(spec, Path(data_path or spec.data.path))
    else:
        source = None
    estimate = estimate_memory(spec, shape, source)
    if estimate is None:
        return None
    has, what = (memory, "memory") if memory else device_memory(device, spec.resources.world_size)
    needs = estimate.device + CUDA_CONTEXT if device.type == "cuda" else estimate.total
    where = "on each GPU " if device.type == "cuda" else ""
    if needs > has:
        raise SpecError([Problem(field_for(spec, estimate), f"the job needs an estimated {format_bytes(needs)} of "
                                 f"memory {where}({estimate.largest_parts()}; batch size {estimate.batch_size}), "
                                 f"more than this worker's {format_bytes(has)} of {what}")])
    if device.type == "cuda" and estimate.host > host_memory():
        raise SpecError([Problem(field_for(spec, estimate), f"the job needs an estimated "
                                 f"{format_bytes(estimate.host)} of RAM to load its data, more than this "
                                 f"worker's {format_bytes(host_memory())}")])
    return estimate
