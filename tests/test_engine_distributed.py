"""Data-parallel training: 2 gloo processes follow the loss curve of one process on the same global batch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from models.spec import parse_spec
from worker.engine import train

# Per-epoch losses agree to float32 rounding: the two shards' mean gradients average to the global
# batch's gradient exactly in real arithmetic; only the order of float additions differs.
TOLERANCE = 1e-4


def ddp_spec(processes: int | None, epochs: int = 5, n_samples: int = 480, batch_size: int = 32) -> dict:
    return {
        "seed": 5,
        "task": "multiclass",
        "data": {"source": "sklearn", "name": "make_classification", "validation_split": 0.2,
                 "params": {"n_samples": n_samples, "n_features": 10, "n_informative": 6, "n_classes": 3,
                            "random_state": 0}},
        "model": {"layers": [{"type": "Linear", "out_features": 32}, {"type": "ReLU"},
                             {"type": "Linear", "out_features": 3}]},
        "optimizer": {"type": "SGD", "lr": 0.1, "momentum": 0.9},
        "training": {"epochs": epochs, "batch_size": batch_size},
        "resources": {"device": "cpu", **({"processes": processes} if processes else {})},
    }


def read_metrics(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_two_gloo_processes_follow_the_single_process_loss_curve(tmp_path):
    single = train(parse_spec(ddp_spec(None)), tmp_path / "single")
    double = train(parse_spec(ddp_spec(2)), tmp_path / "ddp")
    assert double.status == "succeeded"
    one, two = read_metrics(single.metrics_path), read_metrics(double.metrics_path)
    for name in ("loss", "accuracy", "val_loss", "val_accuracy"):
        assert [row[name] for row in two] == pytest.approx([row[name] for row in one], rel=TOLERANCE, abs=TOLERANCE)
    # Rank 0 writes the outputs; they load like any other run's.
    import torchyard

    assert torchyard.load_model(tmp_path / "ddp") is not None


def test_a_killed_data_parallel_run_resumes_and_finishes(tmp_path):
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(ddp_spec(2, epochs=6, n_samples=20_000, batch_size=128)))
    out = tmp_path / "out"
    command = [sys.executable, "-m", "torchyard.cli", "train", str(spec_path), "--out", str(out)]
    run = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while not (out / "checkpoints/epoch-0002.pt").exists() and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert run.poll() is None, "the run ended before it could be killed"
    os.killpg(run.pid, signal.SIGKILL)  # rank 0 and rank 1 alike
    run.wait()

    resumed = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resuming after epoch" in resumed.stdout
    assert [row["epoch"] for row in read_metrics(out / "metrics.jsonl")] == list(range(1, 7))
    assert (out / "weights.safetensors").exists()
