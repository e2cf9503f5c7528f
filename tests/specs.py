"""Job specs the service tests share: small, seeded, and cheap enough for a 2-core CI machine."""

from __future__ import annotations

CHECKPOINT_EVERY_EPOCH = {"every_n_epochs": 1, "keep_last": 2}


def blobs_spec(name: str = "blobs", epochs: int = 3, n_samples: int = 300, checkpoints: bool = False) -> dict:
    """A 3-class MLP on make_blobs: the quickest job that trains for real."""
    spec = {
        "name": name,
        "seed": 0,
        "task": "multiclass",
        "data": {"source": "sklearn", "name": "make_blobs",
                 "params": {"n_samples": n_samples, "centers": 3, "n_features": 4, "random_state": 0}},
        "model": {"layers": [{"type": "Linear", "out_features": 16}, {"type": "ReLU"},
                             {"type": "Linear", "out_features": 3}]},
        "training": {"epochs": epochs, "batch_size": 50},
    }
    return {**spec, "checkpoint": dict(CHECKPOINT_EVERY_EPOCH)} if checkpoints else spec


def circles_spec(name: str = "circles", epochs: int = 5, lr: float = 0.1, checkpoints: bool = False) -> dict:
    """A binary MLP on make_circles, the data of the README's walkthrough."""
    spec = {
        "name": name,
        "seed": 0,
        "task": "binary",
        "data": {"source": "sklearn", "name": "make_circles",
                 "params": {"n_samples": 300, "factor": 0.5, "noise": 0.1, "random_state": 2020}},
        "model": {"layers": [{"type": "Linear", "out_features": 16}, {"type": "ReLU"},
                             {"type": "Linear", "out_features": 1}]},
        "optimizer": {"type": "Adam", "lr": lr},
        "training": {"epochs": epochs, "batch_size": 50},
    }
    return {**spec, "checkpoint": dict(CHECKPOINT_EVERY_EPOCH)} if checkpoints else spec


def long_spec(epochs: int, n_samples: int, batch_size: int, seed: int = 1, name: str = "long") -> dict:
    """A binary MLP on make_moons with a checkpoint every epoch (keep_last 2): a job to interrupt.

    How long it runs is ``epochs * n_samples / batch_size`` batches; each test sizes it so a kill lands mid-run.
    """
    return {
        "name": name,
        "seed": seed,
        "task": "binary",
        "data": {"source": "sklearn", "name": "make_moons",
                 "params": {"n_samples": n_samples, "noise": 0.2, "random_state": 0}},
        "model": {"layers": [{"type": "Linear", "out_features": 32}, {"type": "Tanh"},
                             {"type": "Linear", "out_features": 1}]},
        "optimizer": {"type": "Adam", "lr": 0.01},
        "training": {"epochs": epochs, "batch_size": batch_size},
        "checkpoint": dict(CHECKPOINT_EVERY_EPOCH),
    }
