"""A run that is killed and resumed ends with the same bytes of weights and the same metrics."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from models.validation import parse_spec
from worker.engine import PAUSED, Callback, StopTraining, train
from worker.engine.checkpoints import to_remove

TIMING = {"epoch_seconds", "samples_per_second"}


def resumable_spec(n_samples=300, epochs=6) -> dict:
    # Dropout (global RNG), shuffling (own generator), a scheduler and early-stopping state all
    # have to come back exactly for the bytes to match.
    return {
        "name": "resume",
        "seed": 7,
        "task": "multiclass",
        "data": {"source": "sklearn", "name": "make_classification", "validation_split": 0.2,
                 "params": {"n_samples": n_samples, "n_features": 20, "n_informative": 8, "n_classes": 3,
                            "random_state": 0}},
        "model": {"layers": [{"type": "Linear", "out_features": 64}, {"type": "ReLU"},
                             {"type": "Dropout", "p": 0.3}, {"type": "Linear", "out_features": 64},
                             {"type": "BatchNorm1d"}, {"type": "ReLU"}, {"type": "Linear", "out_features": 3}]},
        "optimizer": {"type": "AdamW", "lr": 0.003},
        "scheduler": {"type": "StepLR", "step_size": 2, "gamma": 0.7},
        "training": {"epochs": epochs, "batch_size": 64},
        "early_stopping": {"monitor": "val_loss", "patience": 100, "restore_best_weights": True},
        "checkpoint": {"every_n_epochs": 1, "keep_last": 2},
    }


def metrics_without_timing(path):
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in open(path)]


def test_resume_after_a_stop_continues_exactly(tmp_path):
    spec = parse_spec(resumable_spec())
    whole = train(spec, tmp_path / "whole")

    class StopInEpoch4(Callback):
        def on_batch_end(self, state):
            if state.epoch == 3 and state.batch == 2:
                raise StopTraining("preempted")

    stopped = train(spec, tmp_path / "parts", callbacks=[StopInEpoch4()])
    assert (stopped.status, stopped.epochs_completed) == ("stopped", 3)
    resumed = train(spec, tmp_path / "parts", resume=True)

    assert resumed.status == "succeeded"
    assert (tmp_path / "parts/weights.safetensors").read_bytes() == whole.weights_path.read_bytes()
    assert metrics_without_timing(resumed.metrics_path) == metrics_without_timing(whole.metrics_path)
    assert [row["epoch"] for row in metrics_without_timing(resumed.metrics_path)] == [1, 2, 3, 4, 5, 6]


def test_checkpoints_are_fsynced_unless_the_caller_keeps_its_own_durable_copies(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
    spec = parse_spec(resumable_spec(epochs=2))

    train(spec, tmp_path / "local")  # torchyard train: a resume reads these files
    assert len(synced) == 2 * 2  # each checkpoint, then its folder after the rename
    synced.clear()
    worker = train(spec, tmp_path / "worker", durable_checkpoints=False)  # the worker uploads each one
    assert synced == []
    # Otherwise the same: whole files under their names, and the same run (the same weights).
    assert sorted(p.name for p in (tmp_path / "worker/checkpoints").iterdir()) == ["epoch-0001.pt", "epoch-0002.pt"]
    assert worker.weights_path.read_bytes() == (tmp_path / "local/weights.safetensors").read_bytes()


def test_a_preemption_checkpoints_mid_epoch_and_the_resume_loses_no_batch(tmp_path):
    spec = parse_spec(resumable_spec())
    whole = train(spec, tmp_path / "whole")
    batches_run = []

    class PreemptInEpoch4(Callback):
        def on_batch_end(self, state):
            batches_run.append((state.epoch + 1, state.batch))
            if (state.epoch, state.batch) == (3, 2):
                raise StopTraining("preempted", checkpoint=True)

    stopped = train(spec, tmp_path / "parts", callbacks=[PreemptInEpoch4()])
    assert (stopped.status, stopped.stop_reason) == ("stopped", "preempted")
    assert (tmp_path / "parts/checkpoints/epoch-0003-batch-000002.pt").exists()

    class Count(Callback):
        def on_batch_end(self, state):
            batches_run.append((state.epoch + 1, state.batch))

    train(spec, tmp_path / "parts", resume=True, callbacks=[Count()])
    assert (tmp_path / "parts/weights.safetensors").read_bytes() == whole.weights_path.read_bytes()
    assert metrics_without_timing(tmp_path / "parts/metrics.jsonl") == metrics_without_timing(whole.metrics_path)
    # Every batch of the run was trained exactly once across the two attempts.
    assert len(batches_run) == len(set(batches_run)) == 6 * 4
    assert not (tmp_path / "parts/checkpoints/epoch-0003-batch-000002.pt").exists()


class _PauseAfter(Callback):
    """What a worker's PauseAt does: stop after ``epoch`` with the stop reason a resume goes on from."""

    def __init__(self, epoch):
        self.epoch = epoch

    def on_epoch_end(self, state, metrics):
        if metrics["epoch"] == self.epoch:
            state.stop_reason = PAUSED


def test_a_paused_run_writes_its_outputs_and_resumes_as_if_it_had_never_stopped(tmp_path):
    spec = parse_spec(resumable_spec())
    whole = train(spec, tmp_path / "whole")

    first = train(spec, tmp_path / "parts", callbacks=[_PauseAfter(2)])
    assert (first.status, first.stop_reason, first.epochs_completed) == ("succeeded", PAUSED, 2)
    assert json.loads(first.card_path.read_text())["stop_reason"] == PAUSED
    assert torch.load(tmp_path / "parts/checkpoints/epoch-0002.pt", weights_only=True)["stop_reason"] == PAUSED
    paused_weights = first.weights_path.read_bytes()
    second = train(spec, tmp_path / "parts", resume=True, callbacks=[_PauseAfter(4)])
    assert (second.stop_reason, second.epochs_completed) == (PAUSED, 4)
    assert second.weights_path.read_bytes() != paused_weights
    last = train(spec, tmp_path / "parts", resume=True)

    assert (last.status, last.stop_reason, last.epochs_completed) == ("succeeded", "completed", 6)
    assert last.weights_path.read_bytes() == whole.weights_path.read_bytes()
    assert metrics_without_timing(last.metrics_path) == metrics_without_timing(whole.metrics_path)


def test_a_run_resumed_at_its_pause_epoch_pauses_again_without_training(tmp_path):
    # Its attempt died while recording the pause: the next one, still asked to pause at 2, trains nothing.
    from worker.job_callbacks import PauseAt

    spec = parse_spec(resumable_spec())
    first = train(spec, tmp_path, callbacks=[PauseAt(2)])
    paused_weights = first.weights_path.read_bytes()
    epochs_trained = []

    class Count(Callback):
        def on_epoch_end(self, state, metrics):
            epochs_trained.append(metrics["epoch"])

    again = train(spec, tmp_path, resume=True, callbacks=[PauseAt(2), Count()])
    assert (again.status, again.stop_reason, again.epochs_completed, epochs_trained) == ("succeeded", PAUSED, 2, [])
    assert again.weights_path.read_bytes() == paused_weights


def test_a_run_that_stopped_early_stays_stopped_on_resume(tmp_path):
    spec = resumable_spec()
    spec["early_stopping"].update(patience=0, min_delta=10.0)  # epoch 2 does not improve enough: it stops there
    stopped = train(parse_spec(spec), tmp_path)
    assert (stopped.stop_reason, stopped.epochs_completed) == ("early_stopping", 2)
    resumed = train(parse_spec(spec), tmp_path, resume=True)
    assert (resumed.stop_reason, resumed.epochs_completed) == ("early_stopping", 2)


def test_checkpoints_hold_everything_and_load_with_weights_only(tmp_path):
    train(parse_spec(resumable_spec(epochs=3)), tmp_path)
    state = torch.load(tmp_path / "checkpoints/epoch-0003.pt", weights_only=True)
    assert {"model", "optimizer", "scheduler", "callbacks", "rng", "epoch", "history"} <= set(state)
    assert state["epoch"] == 3 and len(state["history"]) == 3
    assert set(state["rng"]) == {"torch", "cuda", "shuffle"}
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["epoch-0002.pt", "epoch-0003.pt"]


def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(tmp_path):
    spec = parse_spec(resumable_spec(epochs=4))
    whole = train(spec, tmp_path / "whole")
    train(spec, tmp_path / "parts", callbacks=[_StopAtEpochStart(4)])
    (tmp_path / "parts/checkpoints/epoch-0003.pt").write_bytes(b"torn write")
    resumed = train(spec, tmp_path / "parts", resume=True)
    assert (tmp_path / "parts/weights.safetensors").read_bytes() == whole.weights_path.read_bytes()
    assert resumed.epochs_completed == 4


def test_a_resume_that_holds_only_its_checkpoint_still_prunes_the_ones_before_it(tmp_path):
    # A worker's resumed attempt downloads just the checkpoint it continues from; the earlier ones are stored
    # elsewhere, and the callbacks hear of each the policy drops. Epoch 1 comes again: its removal may not
    # have reached the callbacks before the first attempt ended, since epoch 3's checkpoint was saved first.
    spec = parse_spec(resumable_spec())
    train(spec, tmp_path / "first", callbacks=[_StopAtEpochStart(4)])
    (tmp_path / "second/checkpoints").mkdir(parents=True)
    shutil.copy(tmp_path / "first/checkpoints/epoch-0003.pt", tmp_path / "second/checkpoints")
    removed = []

    class Removals(Callback):
        def on_checkpoint_removed(self, state, path, epoch):
            removed.append(path.name)

    resumed = train(spec, tmp_path / "second", resume=True, callbacks=[Removals()])
    assert (resumed.status, resumed.best_epoch) == ("succeeded", 6)
    assert removed == ["epoch-0001.pt", "epoch-0002.pt", "epoch-0003.pt", "epoch-0004.pt"]
    assert sorted(p.name for p in (tmp_path / "second/checkpoints").iterdir()) == ["epoch-0005.pt", "epoch-0006.pt"]


class _StopAtEpochStart(Callback):
    def __init__(self, epoch):
        self.epoch = epoch

    def on_batch_end(self, state):
        if state.epoch + 1 == self.epoch:
            raise StopTraining("preempted")


def run_cli(*args, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "torchyard.cli", "train", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_gives_byte_identical_weights(tmp_path):
    spec_path = tmp_path / "spec.json"
    # Big enough that an epoch takes a while, so the kill lands in the middle of the run.
    spec_path.write_text(json.dumps(resumable_spec(n_samples=20_000, epochs=6)))

    whole = run_cli(str(spec_path), "--out", str(tmp_path / "whole"))
    assert whole.wait(timeout=300) == 0, whole.stdout.read()

    killed = run_cli(str(spec_path), "--out", str(tmp_path / "killed"), start_new_session=True)
    checkpoint = tmp_path / "killed/checkpoints/epoch-0003.pt"
    deadline = time.monotonic() + 120
    while not checkpoint.exists() and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert killed.poll() is None, "the run ended before it could be killed"
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    assert not (tmp_path / "killed/weights.safetensors").exists()

    resumed = run_cli(str(spec_path), "--out", str(tmp_path / "killed"), "--resume")
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, output
    assert "resuming after epoch 3" in output or "resuming after epoch 4" in output

    assert (tmp_path / "killed/weights.safetensors").read_bytes() == \
        (tmp_path / "whole/weights.safetensors").read_bytes()
    assert metrics_without_timing(tmp_path / "killed/metrics.jsonl") == \
        metrics_without_timing(tmp_path / "whole/metrics.jsonl")


def test_pruning_keeps_the_last_k_and_the_best_and_drops_superseded_mid_epoch_checkpoints():
    positions = [(1, 0), (2, 0), (2, 40), (3, 0), (4, 0), (4, 17), (5, 0)]
    assert to_remove(positions, keep_last=2, best_epoch=2) == [(1, 0), (2, 40), (3, 0), (4, 17)]
    assert to_remove(positions, keep_last=2, best_epoch=5) == [(1, 0), (2, 0), (2, 40), (3, 0), (4, 17)]
    assert to_remove([(3, 0), (3, 12)], keep_last=1, best_epoch=None) == [(3, 12)]
