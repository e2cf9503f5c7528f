"""Loss, optimizer and scheduler from the spec: torch classes by name, arguments as validated."""

from __future__ import annotations

import torch
from torch import nn

from models.spec import JobSpec

# Schedulers that step once a batch instead of once an epoch.
BATCH_SCHEDULERS = {"OneCycleLR"}


def _kwargs(part) -> dict:
    values = part.model_dump(exclude={"type"})
    return {key: tuple(value) if isinstance(value, list) else value for key, value in values.items()}


def make_loss(spec: JobSpec, device: torch.device) -> nn.Module:
    """The spec's loss, or the task's default."""
    if spec.loss is None:
        return getattr(nn, spec.loss_type)()
    kwargs = _kwargs(spec.loss)
    # Weights are tensors on the run's device (the spec holds them as numbers).
    if kwargs.get("pos_weight") is not None:
        kwargs["pos_weight"] = torch.tensor([kwargs["pos_weight"]], device=device)
    if kwargs.get("weight") is not None:
        kwargs["weight"] = torch.tensor(kwargs["weight"], dtype=torch.float32, device=device)
    return getattr(nn, spec.loss.type)(**kwargs)


def make_optimizer(spec: JobSpec, model: nn.Module) -> torch.optim.Optimizer:
    """The spec's optimizer over all of the model's parameters."""
    return getattr(torch.optim, spec.optimizer.type)(model.parameters(), **_kwargs(spec.optimizer))


def make_scheduler(spec: JobSpec, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    """The spec's learning-rate scheduler, or None."""
    if spec.scheduler is None:
        return None
    kwargs = _kwargs(spec.scheduler)
    if spec.scheduler.type == "ReduceLROnPlateau":
        kwargs.pop("monitor")
    if spec.scheduler.type == "OneCycleLR":
        kwargs["total_steps"] = spec.training.epochs * steps_per_epoch
    return getattr(torch.optim.lr_scheduler, spec.scheduler.type)(optimizer, **kwargs)
