"""Early stopping follows Keras' rules, and a stopped run keeps the weights of its best epoch."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch

from models.validation import parse_spec
from worker.engine import train
from worker.engine.early_stopping import EarlyStopping


def first_stop(values, **options):
    """Feed a scripted metric sequence; return (0-based stop epoch or None, 0-based best epoch)."""
    stopper = EarlyStopping(**options)
    for epoch, value in enumerate(values):
        _improved, stop = stopper.decide(epoch, value)
        if stop:
            return epoch, stopper.best_epoch
    return None, stopper.best_epoch


@pytest.mark.parametrize("values, options, expected", [
    # No improvement for `patience` epochs after the best one (epoch 1) -> stop at epoch 3.
    ([1.0, 0.9, 0.95, 0.92, 0.91, 0.5], {"monitor": "val_loss", "patience": 2}, (3, 1)),
    # min_delta: 0.95 is not better than 1.0 by 0.1, so the wait runs out at once.
    ([1.0, 0.95, 0.85, 0.84], {"monitor": "val_loss", "patience": 1, "min_delta": 0.1}, (1, 0)),
    # 'auto' maximizes accuracy; an equal value is no improvement.
    ([0.5, 0.6, 0.6], {"monitor": "val_accuracy", "patience": 1}, (2, 1)),
    # mode given explicitly wins over the name.
    ([0.5, 0.6, 0.7], {"monitor": "val_loss", "mode": "max", "patience": 0}, (None, 2)),
    # Keras: improving on the best but not on the baseline keeps the wait growing, yet never stops...
    ([0.9, 0.8, 0.7, 0.6], {"monitor": "val_loss", "patience": 2, "baseline": 0.5}, (None, 3)),
    # ...while no improvement at all stops once the wait reaches patience.
    ([0.9, 0.95, 0.97], {"monitor": "val_loss", "patience": 2, "baseline": 0.5}, (1, 0)),
    # Epochs before start_from_epoch are ignored entirely.
    ([5, 4, 3, 3.5], {"monitor": "loss", "patience": 0, "start_from_epoch": 2}, (3, 2)),
    # patience 0 stops at the first epoch without improvement, never at epoch 0.
    ([1.0, 2.0], {"monitor": "loss", "patience": 0}, (1, 0)),
    ([float("nan"), 1.0], {"monitor": "loss", "patience": 0}, (None, 1)),
])
def test_stop_epochs_follow_keras_rules(values, options, expected):
    assert first_stop(values, **options) == expected


def read_metrics(path):
    return [json.loads(line) for line in open(path)]


def noisy_spec(restore: bool) -> dict:
    # A learning rate high enough that val_loss bounces and early stopping triggers well before 60 epochs.
    return {
        "seed": 1,
        "task": "regression",
        "data": {"source": "sklearn", "name": "make_regression", "validation_split": 0.3, "standardize": True,
                 "params": {"n_samples": 120, "n_features": 4, "noise": 30.0, "random_state": 0}},
        "model": {"layers": [{"type": "Linear", "out_features": 32}, {"type": "ReLU"},
                             {"type": "Linear", "out_features": 1}]},
        "optimizer": {"type": "Adam", "lr": 0.05},
        "training": {"epochs": 60, "batch_size": 16},
        "early_stopping": {"monitor": "val_loss", "patience": 3, "restore_best_weights": restore},
        "checkpoint": {"every_n_epochs": 1, "keep_last": 1},
    }


def checkpoint_model(directory, epoch):
    return torch.load(directory / "checkpoints" / f"epoch-{epoch:04d}.pt", weights_only=True)["model"]


def test_training_stops_after_patience_and_restores_the_best_weights(tmp_path):
    result = train(parse_spec(noisy_spec(restore=True)), tmp_path)
    rows = read_metrics(result.metrics_path)
    val_losses = [row["val_loss"] for row in rows]
    best_epoch = val_losses.index(min(val_losses)) + 1

    assert result.stop_reason == "early_stopping"
    assert result.epochs_completed == best_epoch + 3 < 60
    assert (result.best_epoch, result.best_value) == (best_epoch, min(val_losses))
    # The best epoch's checkpoint is kept beside the last one, and the saved weights are its weights.
    weights = safetensors.torch.load_file(tmp_path / "weights.safetensors")
    best_state = checkpoint_model(tmp_path, best_epoch)
    assert all(torch.equal(weights[name], best_state[name]) for name in best_state)
    assert json.loads((tmp_path / "model.json").read_text())["restored_best_weights"] is True


def test_without_restore_the_last_epochs_weights_are_kept(tmp_path):
    result = train(parse_spec(noisy_spec(restore=False)), tmp_path)
    weights = safetensors.torch.load_file(tmp_path / "weights.safetensors")
    last_state = checkpoint_model(tmp_path, result.epochs_completed)
    assert result.best_epoch != result.epochs_completed
    assert all(torch.equal(weights[name], last_state[name]) for name in last_state)
