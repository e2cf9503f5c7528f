"""A slot's share of the machine's cores: the pool processes of a worker split torch's threads between them.

torch gives every process as many intra-op threads as the machine has cores. A worker of n slots runs n
jobs at once, so n processes would each start that many threads on the same cores: oversubscribed, their
OpenMP threads spin waiting on each other, and a small job's step runs several times slower (bench/scale.py).
Each pool process takes its share instead, as torchrun and Ray size OMP_NUM_THREADS per process.
"""

from __future__ import annotations

import os

import torch

from worker.engine import thread_share

_slots = 1  # set in the main process before the pool forks


def set_slots(slots: int) -> None:
    """Record how many pool processes (job slots) this worker runs; their children read it."""
    global _slots
    _slots = max(1, slots)


def take_share() -> int:
    """In a pool process: use this slot's share of torch's threads; return the count.

    An operator's OMP_NUM_THREADS is a per-process choice already, and stands.
    """
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(thread_share(torch.get_num_threads(), _slots))
    return torch.get_num_threads()
