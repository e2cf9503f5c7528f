"""Loss, optimizer and scheduler from the spec: torch classes by name, arguments as validated."""

from __future__ import annotations

import torch
from torch import nn

from models.spec import JobSpec

# Schedulers that step once a batch instead of once an epoch.
BATCH_SCHEDULERS = {"OneCycleLR"}

# Optimizer kernels (torch 2.13): optimizers with a fused kernel, and the devices it is used on. Adam,
# AdamW, SGD and Adagrad take fused=True on CPU and CUDA (Adagrad's docs: "CPU and CUDA only"); Adam and
# AdamW's MPS kernel is documented as a prototype, so MPS keeps the for-loop. RMSprop and Adadelta have
# no fused kernel. foreach kernels are real kernels on CUDA only (on the CPU they loop over the same ops:
# no faster), so the rest use foreach there and the for-loop elsewhere.
FUSED_DEVICES = {"Adam": {"cpu", "cuda"}, "AdamW": {"cpu", "cuda"}, "SGD": {"cpu", "cuda"},
                 "Adagrad": {"cpu", "cuda"}}
FOREACH_DEVICES = {"cuda"}


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


def optimizer_kernels(optimizer_type: str, device: torch.device) -> dict[str, bool]:
    """The implementation flags for an optimizer on a device: fused, else foreach, else torch's for-loop.

    Each computes the same update; the engine's losses equal a hand loop's built with the same flags.
    """
    if device.type in FUSED_DEVICES.get(optimizer_type, ()):
        return {"fused": True}
    if device.type in FOREACH_DEVICES:
        return {"foreach": True}
    return {"foreach": False}


def implementation(optimizer: torch.optim.Optimizer) -> str:
    """What the model card records of an optimizer's kernels: "fused", "foreach" or "for-loop"."""
    if optimizer.defaults.get("fused"):
        return "fused"
    return "foreach" if optimizer.defaults.get("foreach") else "for-loop"


def make_optimizer(spec: JobSpec, model: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    """The spec's optimizer over all of the model's parameters (on ``device``), with its fastest exact kernels."""
    kwargs = {**_kwargs(spec.optimizer), **optimizer_kernels(spec.optimizer.type, device)}
    return getattr(torch.optim, spec.optimizer.type)(model.parameters(), **kwargs)


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
