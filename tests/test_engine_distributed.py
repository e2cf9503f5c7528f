"""Data-parallel training: 2 gloo processes follow the loss curve of one process on the same global batch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from models.spec import Limits
from models.validation import parse_spec
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


def test_the_ranks_split_the_threads_their_job_was_given_and_its_process_gets_its_own_back(tmp_path):
    # A worker's pool process trains with its slot's share of the cores (worker.cpus); a data-parallel job's
    # ranks split that share, not the whole machine's, and the pool process's next job has its share again.
    import torch

    from worker.engine import Callback

    seen = []

    class Threads(Callback):
        def on_train_begin(self, state) -> None:  # rank 0, in this process
            seen.append(torch.get_num_threads())

    before = torch.get_num_threads()
    torch.set_num_threads(4)  # a share unlike what the machine's core count would give each rank
    try:
        result = train(parse_spec(ddp_spec(2, epochs=1)), tmp_path, callbacks=[Threads()])
        assert result.status == "succeeded", result.error
        assert seen == [2] and torch.get_num_threads() == 4
    finally:
        torch.set_num_threads(before)


def test_every_rank_holds_the_job_to_the_limits_it_was_given(tmp_path):
    # More samples than the default max_samples: a rank that fell back to the defaults would refuse it.
    n_samples = Limits().max_samples + 2
    raised = Limits(max_samples=n_samples)
    spec = parse_spec({
        "seed": 1,
        "task": "binary",
        "data": {"source": "sklearn", "name": "make_moons", "validation_split": 0,
                 "params": {"n_samples": n_samples, "noise": 0.1, "random_state": 0}},
        "model": {"layers": [{"type": "Linear", "out_features": 4}, {"type": "ReLU"},
                             {"type": "Linear", "out_features": 1}]},
        "training": {"epochs": 2, "batch_size": n_samples // 4},
        "resources": {"device": "cpu", "processes": 2},
    }, raised)

    result = train(spec, tmp_path, limits=raised)

    assert (result.status, result.epochs_completed) == ("succeeded", 2), result.error
    assert [row["epoch"] for row in read_metrics(result.metrics_path)] == [1, 2]


def test_a_pause_that_rank_0_decides_stops_every_rank_and_the_resume_follows_the_uninterrupted_run(
        tmp_path, monkeypatch):
    from worker.engine import PAUSED, distributed
    from worker.job_callbacks import PauseAt

    exits = []
    stop_ranks = distributed.stop_ranks

    def recorded(ranks, timeout=30):  # a rank still training after rank 0 ended would be killed here
        stop_ranks(ranks, timeout)
        exits.append([rank.returncode for rank in ranks])

    monkeypatch.setattr(distributed, "stop_ranks", recorded)
    spec = parse_spec(ddp_spec(2, epochs=4, n_samples=240))
    whole = train(spec, tmp_path / "whole")
    paused = train(spec, tmp_path / "parts", callbacks=[PauseAt(2)])  # the callbacks run on rank 0 alone
    assert (paused.status, paused.stop_reason, paused.epochs_completed) == ("succeeded", PAUSED, 2), paused.error
    assert exits[-1] == [0], "rank 1 did not stop with rank 0"
    resumed = train(spec, tmp_path / "parts", resume=True)
    assert (resumed.status, resumed.epochs_completed) == ("succeeded", 4), resumed.error
    one, two = read_metrics(whole.metrics_path), read_metrics(resumed.metrics_path)
    assert [row["epoch"] for row in two] == [1, 2, 3, 4]
    for name in ("loss", "val_loss"):
        assert [row[name] for row in two] == pytest.approx([row[name] for row in one], rel=TOLERANCE, abs=TOLERANCE)


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


def test_a_data_parallel_model_predicts_like_its_weights_loaded_into_one_process(tmp_path):
    import safetensors.torch
    import torch
    from torch import nn

    import torchyard
    from worker.engine import Callback

    trained = {}

    class KeepModel(Callback):
        def on_train_end(self, state, result):
            trained["model"] = state.model

    spec = ddp_spec(2, epochs=3, n_samples=240)
    spec["data"]["standardize"] = True  # the standardization buffers are saved and loaded with the weights
    result = train(parse_spec(spec), tmp_path, callbacks=[KeepModel()])
    assert result.status == "succeeded"

    # Rank 0 saved the unwrapped module's state (no DistributedDataParallel "module." prefix), as trained.
    weights = safetensors.torch.load_file(result.weights_path)
    model = trained["model"].eval()
    assert sorted(weights) == ["body.0.bias", "body.0.weight", "body.2.bias", "body.2.weight",
                               "input_mean", "input_std"]
    assert [name for name, tensor in model.state_dict().items() if not torch.equal(weights[name], tensor)] == []

    # The same network written out by hand in this one process, with those weights loaded into it.
    reference = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 3))
    reference.load_state_dict({name.removeprefix("body."): tensor for name, tensor in weights.items()
                               if name.startswith("body.")})
    loaded = torchyard.load_model(tmp_path)
    assert repr(loaded.body) == repr(reference)  # the model card rebuilds the same architecture

    x = torch.randn(64, 10, generator=torch.Generator().manual_seed(0)) * 3
    with torch.no_grad():
        by_hand = reference((x - weights["input_mean"]) / weights["input_std"])
        torch.testing.assert_close(loaded(x), by_hand, rtol=0, atol=1e-6)
        assert torch.equal(loaded(x), model(x))
