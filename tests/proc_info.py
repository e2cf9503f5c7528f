"""What a running process holds, read from Linux's /proc: its resident memory, its children, and whether it
has mapped a library (torch's native code is mapped once ``import torch`` has run, and never unmapped).

Shared by the tests that check which process imports torch and by bench/scale.py, which prints the
resident memory of each worker and API process.
"""

from __future__ import annotations

import os
from pathlib import Path

# torch's native libraries: libtorch*.so and the torch/_C extension, mapped by ``import torch``.
TORCH_MARKERS = ("/libtorch", "/torch/_C")


def rss_mb(pid: int) -> float:
    """The resident memory (VmRSS) of process ``pid``, in MB (10^6 bytes)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024 / 1e6
    raise ValueError(f"process {pid} has no VmRSS (a zombie?)")


def pss_mb(pid: int) -> float:
    """The proportional set size of ``pid`` in MB: its resident pages, each shared one divided among the
    processes sharing it (so the figures of several processes add up to the memory they use together)."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) * 1024 / 1e6
    raise ValueError(f"process {pid} has no Pss (a zombie?)")


def children(pid: int) -> list[int]:
    """The live child processes of ``pid``, oldest first."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue  # it ended meanwhile
        # Fields after the name, which is in parentheses and may hold spaces: state, ppid, ...
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append((int(fields[19]), int(entry.name)))  # its start time orders them
    return [child for _start, child in sorted(found)]


def maps_any(pid: int, markers: tuple[str, ...]) -> bool:
    """Whether process ``pid`` has mapped a file whose path holds one of ``markers``."""
    with open(f"/proc/{pid}/maps") as maps:
        return any(marker in line for line in maps for marker in markers)


def has_torch(pid: int) -> bool:
    """Whether process ``pid`` has imported torch (its native libraries are mapped)."""
    return maps_any(pid, TORCH_MARKERS)
