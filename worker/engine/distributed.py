"""Data-parallel training on one machine: torch.distributed with DistributedDataParallel.

The calling process is rank 0: it keeps the callbacks (metrics, checkpoints, lease) and writes every
file. Ranks 1..n-1 are subprocesses started here (``python -m worker.engine.distributed``); a Celery
pool process may not fork multiprocessing children, but it may start plain subprocesses. Every rank
sees the same shuffled order and trains on its slice of each global batch, so the global batch size
is the spec's ``batch_size`` whatever the number of processes. NCCL on GPUs, gloo on the CPU.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as torch_dist

from worker.engine.callbacks import StopTraining, TrainingFailed

COLLECTIVE_TIMEOUT = dt.timedelta(minutes=10)
_SIGNAL_STOP, _SIGNAL_FAIL = 1, 2


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


def init_group(rank: int, world_size: int, port: int, device_type: str) -> Group:
    backend = "nccl" if device_type == "cuda" else "gloo"
    torch_dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                  world_size=world_size, timeout=COLLECTIVE_TIMEOUT)
    if device_type == "cpu":  # n processes share the cores instead of each taking all of them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    return Group(rank, world_size)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_ranks(spec_json: str, out_dir: Path, world_size: int, port: int, resume: bool,
                data_path: Path | None, device: str) -> list[subprocess.Popen]:
    """Ranks 1..n-1 as subprocesses; they write nothing, rank 0 owns the output folder."""
    spec_file = out_dir / ".spec.json"
    spec_file.write_text(spec_json)
    common = [sys.executable, "-m", "worker.engine.distributed", str(spec_file), str(out_dir),
              "--world-size", str(world_size), "--port", str(port), "--device", device]
    common += ["--resume"] if resume else []
    common += ["--data-path", str(data_path)] if data_path else []
    return [subprocess.Popen([*common, "--rank", str(rank)]) for rank in range(1, world_size)]


def stop_ranks(ranks: list[subprocess.Popen], timeout: float = 30) -> None:
    for process in ranks:
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _rank_main() -> None:
    from models.spec import JobSpec
    from worker.engine.run import finish, prepare_run

    parser = argparse.ArgumentParser()
    parser.add_argument("spec_file", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--device", required=True)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--data-path", type=Path)
    args = parser.parse_args()
    spec = JobSpec.model_validate(json.loads(args.spec_file.read_text()))
    group = init_group(args.rank, args.world_size, args.port, args.device)
    try:
        prepared = prepare_run(spec, args.out_dir, resume=args.resume, data_path=args.data_path,
                               device=args.device, group=group)
        finish(prepared, spec, args.out_dir)
    finally:
        torch_dist.destroy_process_group()


if __name__ == "__main__":
    _rank_main()
