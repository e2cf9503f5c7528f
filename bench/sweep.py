"""ASHA against the exhaustive search: the same trials, the compute each uses, the best each finds.

    python bench/sweep.py [--epochs 9] [--workers 1]

The search: the digits CNN (examples/digits-cnn.json, without its early stopping, so that only the sweep
decides) over 3 learning rates x 3 widths x 3 batch sizes, a grid of 27 trials, by val_accuracy. It runs
twice on one deployment (SQLite, the filesystem broker and a local store in a temporary home, as ``torchyard
serve`` runs; ``--workers`` worker processes of one slot): every trial to ``--epochs`` epochs, then with ASHA
(rungs at 1, 3, 9 epochs for the default: min_epochs 1, reduction_factor 3). The compute of a search is the
training time of its trials, the sum of their epochs' ``epoch_seconds`` (CPU-seconds of a slot on this
machine; a GPU's seconds on a GPU worker), and its wall time from the POST to the sweep's end.
"""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import argparse  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from conftest import running_service, worker_settings  # noqa: E402

SPACE = {
    "optimizer.lr": {"choice": [0.0003, 0.003, 0.03]},
    "model.layers[0].out_channels": {"choice": [4, 8, 16]},
    "training.batch_size": {"choice": [32, 64, 128]},
}


def base_spec(epochs: int) -> dict:
    """The digits CNN of the examples, with no early stopping and its schedule fit to ``epochs``."""
    spec = json.loads((Path(ROOT) / "examples" / "digits-cnn.json").read_text())
    spec.pop("early_stopping")
    spec["scheduler"] = {"type": "CosineAnnealingLR", "T_max": epochs}
    spec["training"]["epochs"] = epochs
    return spec


def request(name: str, epochs: int, asha: bool) -> dict:
    body = {"name": name, "base": base_spec(epochs), "space": SPACE, "method": "grid", "parallelism": 3,
            "metric": "val_accuracy", "mode": "max"}
    if asha:
        body["scheduler"] = {"type": "asha", "min_epochs": 1, "max_epochs": epochs, "reduction_factor": 3}
    return body


def run(service, body: dict) -> dict:
    """Submit the sweep, wait for its end; its best value, compute (s), wall time (s) and epochs trained."""
    started = time.monotonic()
    response = service.client.post("/api/v1/sweeps", json=body, headers=service.headers)
    assert response.status_code == 201, response.get_json()
    sweep_id = response.get_json()["id"]
    while True:
        sweep = service.client.get(f"/api/v1/sweeps/{sweep_id}", headers=service.headers).get_json()
        if sweep["status"] != "running":
            break
        time.sleep(0.5)
    wall = time.monotonic() - started
    assert sweep["status"] == "succeeded", sweep
    trials = service.client.get(f"/api/v1/sweeps/{sweep_id}/trials", headers=service.headers).get_json()["trials"]
    seconds, epochs = 0.0, 0
    for trial in trials:
        rows = service.client.get(f"/api/v1/jobs/{trial['job_id']}/metrics",
                                  headers=service.headers).get_json()["metrics"]
        seconds += sum(row["epoch_seconds"] for row in rows)
        epochs += len(rows)
    return {"best": sweep["best"]["value"], "params": sweep["best"]["params"], "compute": seconds, "wall": wall,
            "epochs": epochs, "counts": sweep["counts"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=9, help="epochs of a full trial (max_epochs)")
    parser.add_argument("--workers", type=int, default=1, help="worker processes of one slot each")
    args = parser.parse_args()
    import torch

    with tempfile.TemporaryDirectory() as home:
        settings = worker_settings(Path(home), quota_queued_jobs=1000, quota_running_jobs=100)
        with running_service(settings) as service:
            for _ in range(args.workers - 1):
                service.start_worker()
            print(f"27 trials of the digits CNN (grid: lr x width x batch size), {args.epochs} epochs at most; "
                  f"{args.workers} worker(s) of 1 slot; {os.cpu_count()} cores, torch {torch.__version__}")
            full = run(service, request("exhaustive", args.epochs, asha=False))
            asha = run(service, request("asha", args.epochs, asha=True))
    print(f"{'search':<12} {'epochs':>7} {'compute s':>10} {'wall s':>8} {'best val_accuracy':>18}")
    for name, result in (("exhaustive", full), ("asha", asha)):
        print(f"{name:<12} {result['epochs']:>7} {result['compute']:>10.1f} {result['wall']:>8.1f} "
              f"{result['best']:>18.4f}")
    print(f"asha / exhaustive: compute {asha['compute'] / full['compute']:.2f} (goal <= 0.33), best "
          f"{asha['best'] - full['best']:+.4f} (goal >= -0.005)")
    print(f"asha's trials by state: {asha['counts']}")
    print(f"best of the exhaustive search: {full['params']}; of asha: {asha['params']}")


if __name__ == "__main__":
    main()
