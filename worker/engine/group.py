"""This process's place in a run: one process alone, or one rank of a torch.distributed process group.

Every rank sees the same shuffled order and trains on its slice of each global batch, so the global
batch size is the spec's ``batch_size`` whatever the number of processes. NCCL on GPUs, gloo on the CPU.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

import torch
import torch.distributed as torch_dist

from worker.engine.callbacks import StopTraining, TrainingFailed

COLLECTIVE_TIMEOUT = dt.timedelta(minutes=10)
_SIGNAL_STOP, _SIGNAL_FAIL = 1, 2
MAX_REASON_BYTES = 100  # a stop reason's length at most (the jobs table's stop_reason column)


class Single:
    """One process: every collective is the identity."""

    rank = 0
    world_size = 1
    is_main = True

    def shard(self, batch: torch.Tensor) -> torch.Tensor:
        return batch

    def all_sum(self, values: torch.Tensor) -> torch.Tensor:
        return values

    def wrap(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        return model

    def sync_buffers(self, model: torch.nn.Module) -> None:
        pass

    def from_main(self, value: str | None) -> str | None:
        """Rank 0's ``value`` on every rank (a stop decision that rank 0's callbacks made)."""
        return value

    def agreed(self, step: Callable[[], None]) -> None:
        step()


class Group(Single):
    """Rank ``rank`` of ``world_size`` processes in an initialized process group."""

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size, self.is_main = rank, world_size, rank == 0

    def shard(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous slice of a global batch."""
        return torch.tensor_split(batch, self.world_size)[self.rank]

    def all_sum(self, values: torch.Tensor) -> torch.Tensor:
        values = values.clone()
        torch_dist.all_reduce(values)
        return values

    def wrap(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def sync_buffers(self, model: torch.nn.Module) -> None:
        """Give every rank rank 0's buffers (BatchNorm statistics) so all evaluate the same model."""
        for buffer in model.buffers():
            torch_dist.broadcast(buffer, src=0)

    def from_main(self, value: str | None) -> str | None:
        # A length and UTF-8 bytes in one tensor, sent as ``agreed`` sends its flag (no pickling).
        data = torch.zeros(MAX_REASON_BYTES + 1, dtype=torch.int32)
        if self.is_main and value is not None:
            encoded = value.encode()[:MAX_REASON_BYTES]
            data[0] = len(encoded) + 1  # 0: None
            data[1:len(encoded) + 1] = torch.tensor(list(encoded), dtype=torch.int32)
        torch_dist.broadcast(data, src=0)
        size = int(data[0]) - 1
        return None if size < 0 else bytes(data[1:size + 1].tolist()).decode(errors="ignore")

    def agreed(self, step: Callable[[], None]) -> None:
        """Run ``step`` (rank 0's callbacks); if it stops or fails, every rank stops at this same batch."""
        pending, signal = None, 0
        if self.is_main:
            try:
                step()
            except StopTraining as stop:
                pending, signal = stop, _SIGNAL_STOP
            except TrainingFailed as failure:
                pending, signal = failure, _SIGNAL_FAIL
        flag = torch.tensor([signal], dtype=torch.int32)
        torch_dist.broadcast(flag, src=0)
        if flag.item() == _SIGNAL_STOP:
            raise pending or StopTraining("stopped by rank 0")
        if flag.item() == _SIGNAL_FAIL:
            raise pending or TrainingFailed("failed on rank 0")


def init_group(rank: int, world_size: int, port: int, device_type: str, threads: int) -> Group:
    """Join the process group of ``world_size`` processes that meet at 127.0.0.1:``port``; on the CPU, train
    with ``threads`` intra-op threads (``device.thread_share`` of the job's)."""
    backend = "nccl" if device_type == "cuda" else "gloo"
    torch_dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                  world_size=world_size, timeout=COLLECTIVE_TIMEOUT)
    if device_type == "cpu":
        torch.set_num_threads(threads)
    return Group(rank, world_size)
