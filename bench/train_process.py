"""`torchyard train SPEC` as a whole process against a plain PyTorch script of the same run.

    python bench/train_process.py [--epochs 3] [--repeats 5]

Both are started as fresh processes, interleaved (order alternating), each timed from its start to its
exit: imports, data generation, setup, training and writing the weights. The run is bench/engine.py's `mlp`
workload (20,000 rows of make_regression, 20-64-64-1, batch 64, Adam with the engine's kernels; no
validation split; a checkpoint at the end); bench/plain_train.py is the plain script. Prints the medians and
torchyard/plain (goal <= 0.9).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent


def spec(epochs: int) -> dict:
    """bench/engine.py's mlp workload (one definition of the run) for ``epochs``, a checkpoint at the end."""
    from engine import WORKLOADS  # bench/ is this script's folder: sys.path[0]

    mlp = WORKLOADS["mlp"]
    return {**mlp, "name": "process", "seed": 0, "training": {**mlp["training"], "epochs": epochs},
            "checkpoint": {"every_n_epochs": epochs, "keep_last": 1}, "resources": {"device": "cpu"}}


def seconds(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torchyard = str(Path(sys.executable).parent / "torchyard")
    print(f"{args.epochs} epochs of the mlp workload, median of {args.repeats} fresh processes each, interleaved")
    print(f"load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    times = {"torchyard": [], "plain": []}
    with tempfile.TemporaryDirectory() as tmp:
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_text(json.dumps(spec(args.epochs)))
        for repeat in range(args.repeats):
            runs = {"torchyard": [torchyard, "train", str(spec_path), "--out", f"{tmp}/torchyard{repeat}"],
                    "plain": [sys.executable, str(BENCH / "plain_train.py"), f"{tmp}/plain{repeat}", str(args.epochs)]}
            for kind in (list(runs) if repeat % 2 == 0 else list(runs)[::-1]):
                times[kind].append(seconds(runs[kind]))
    median = {kind: statistics.median(values) for kind, values in times.items()}
    print(f"torchyard train  {median['torchyard']:.3f} s   (all: {', '.join(f'{t:.2f}' for t in times['torchyard'])})")
    print(f"plain script     {median['plain']:.3f} s   (all: {', '.join(f'{t:.2f}' for t in times['plain'])})")
    print(f"torchyard/plain  {median['torchyard'] / median['plain']:.3f}   (goal <= 0.9)")
    print(f"load average after:  {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
