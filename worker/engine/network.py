"""From the spec's layer list to an ``nn.Module``, with input sizes filled in from the data."""

from __future__ import annotations

import torch
from torch import nn

from models.shapes import LayerShape, ShapeReport, infer_shapes
from models.spec import JobSpec, SpecError

# Spec fields that are torch keyword arguments under another name, or not arguments at all.
_NOT_KWARGS = {"type"}


class Network(nn.Module):
    """The spec's layers, behind an optional standardization fitted on the training data.

    Keeping the standardization inside the module means saved weights predict from raw inputs.
    """

    def __init__(self, body: nn.Sequential, mean: torch.Tensor | None = None, std: torch.Tensor | None = None):
        super().__init__()
        self.body = body
        self.standardize = mean is not None
        if self.standardize:
            self.register_buffer("input_mean", mean.clone())
            self.register_buffer("input_std", std.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.standardize:
            x = (x - self.input_mean) / self.input_std
        return self.body(x)


def make_layer(layer, shape: LayerShape) -> nn.Module:
    """One torch.nn module from a validated spec layer and its inferred input shape."""
    kwargs = {key: value for key, value in layer.model_dump().items() if key not in _NOT_KWARGS}
    for key, value in kwargs.items():
        if isinstance(value, list):
            kwargs[key] = tuple(value)
    inferred = {
        "Linear": lambda: {"in_features": shape.input_shape[-1]},
        "Conv1d": lambda: {"in_channels": shape.input_shape[0]},
        "Conv2d": lambda: {"in_channels": shape.input_shape[0]},
        "BatchNorm1d": lambda: {"num_features": shape.input_shape[0]},
        "BatchNorm2d": lambda: {"num_features": shape.input_shape[0]},
        "LayerNorm": lambda: {"normalized_shape": shape.input_shape[-1]},
    }.get(layer.type)
    if inferred:
        kwargs.update(inferred())
    return getattr(nn, layer.type)(**kwargs)


def plan_network(spec: JobSpec, input_shape: tuple[int, ...], n_outputs: int, limits=None) -> ShapeReport:
    """Shapes and parameter counts of every layer; raises SpecError if the network can't fit the data."""
    report = infer_shapes(spec, input_shape, n_outputs, limits)
    if report.problems:
        raise SpecError(report.problems)
    return report


def build_network(spec: JobSpec, plan: ShapeReport, mean=None, std=None) -> Network:
    """Create the network's modules in spec order (so a fixed seed gives fixed initial weights)."""
    layers = zip(spec.model.layers, plan.layers, strict=True)
    body = nn.Sequential(*(make_layer(layer, shape) for layer, shape in layers))
    return Network(body, mean, std)
