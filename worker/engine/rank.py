"""One of ranks 1..n-1 of a data-parallel run, started by ``distributed.start_ranks``.

It trains its share of each batch and writes nothing: rank 0 owns the output folder and the callbacks.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch.distributed as torch_dist

from worker.engine.distributed import read_job
from worker.engine.group import init_group
from worker.engine.run import finish, prepare_run


def main() -> None:
    """Join the process group with the arguments ``start_ranks`` passed and train until rank 0 ends."""
    parser = argparse.ArgumentParser()
    parser.add_argument("job_file", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--device", required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--data-path", type=Path)
    args = parser.parse_args()
    spec, limits = read_job(args.job_file)
    group = init_group(args.rank, args.world_size, args.port, args.device, args.threads)
    try:
        prepared = prepare_run(spec, args.out_dir, resume=args.resume, data_path=args.data_path,
                               device=args.device, limits=limits, group=group)
        finish(prepared, spec, args.out_dir)
    finally:
        torch_dist.destroy_process_group()


if __name__ == "__main__":
    main()
