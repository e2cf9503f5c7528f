"""Shape inference for a spec's network, in plain Python (no torch).

Given the shape of one sample, each layer's output shape and parameter count follow from PyTorch's
formulas. The API uses this to refuse a network that can't fit its data before anything is queued,
and the engine uses it to fill in in_features, in_channels, num_features and normalized_shape.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from models.catalog import SKLEARN_DATASETS, DataShape
from models.spec import JobSpec, Limits, Problem, SklearnData

Shape = tuple[int, ...]


@dataclass
class LayerShape:
    """One layer as built: its input and output shape (without the batch) and its parameter count."""

    type: str
    input_shape: Shape
    output_shape: Shape
    parameters: int


@dataclass
class ShapeReport:
    layers: list[LayerShape] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    @property
    def total_parameters(self) -> int:
        return sum(layer.parameters for layer in self.layers)


@dataclass
class DataReport:
    """What the network sees of the data: one sample's shape and the width the last layer needs."""

    input_shape: Shape = ()
    n_outputs: int = 1
    n_samples: int | None = None
    problems: list[Problem] = field(default_factory=list)


_SIZE_PARAMS = ("n_samples", "n_features", "n_targets", "n_classes", "centers", "n_class", "n_informative")
MAX_SIZE_PARAM = 10_000_000


def data_shape(data: SklearnData, task: str) -> DataReport:
    """The shapes a scikit-learn dataset gives with these arguments (checked for sane sizes)."""
    problems = []
    for key in _SIZE_PARAMS:
        value = data.params.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_SIZE_PARAM:
            if key == "centers" and isinstance(value, list):
                continue
            problems.append(Problem(f"data.params.{key}", f"must be a whole number from 1 to {MAX_SIZE_PARAM}"))
    if problems:
        return DataReport(problems=problems)
    shape = SKLEARN_DATASETS[data.name].shape(data.params)
    return describe_data(shape, task, data.image_shape)


def describe_data(shape: DataShape, task: str, image_shape: list[int] | None) -> DataReport:
    """Check a dataset's shape against the task and image_shape; say what the network sees."""
    report = DataReport(n_samples=shape.n_samples)
    if image_shape:
        if math.prod(image_shape) != shape.n_features:
            report.problems.append(Problem("data.image_shape", f"{list(image_shape)} holds "
                                           f"{math.prod(image_shape)} values but each sample has "
                                           f"{shape.n_features} features"))
        report.input_shape = tuple(image_shape)
    else:
        report.input_shape = (shape.n_features,)
    if task == "regression":
        report.n_outputs = shape.n_targets
    elif shape.n_classes is None:
        report.problems.append(Problem("task", f"{task!r} needs class labels, but this dataset has "
                                               "continuous targets; use task 'regression'"))
    elif task == "binary":
        if shape.n_classes != 2:
            report.problems.append(Problem("task", f"'binary' needs 2 classes, the data has {shape.n_classes}; "
                                                   "use task 'multiclass'"))
        report.n_outputs = 1
    else:
        report.n_outputs = shape.n_classes
    return report


def _pair(value, rank: int) -> tuple[int, ...]:
    if isinstance(value, list):
        return tuple(value) if len(value) == rank else tuple(value[:1] * rank)
    return (value,) * rank


def _window_out(size: int, kernel: int, stride: int, padding: int, dilation: int, ceil_mode: bool) -> int:
    span = size + 2 * padding - dilation * (kernel - 1) - 1
    out = (math.ceil if ceil_mode else math.floor)(span / stride) + 1
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1  # PyTorch: the last window must start inside the input or the left padding
    return out


class _ShapeError(Exception):
    def __init__(self, field_name: str, message: str):
        self.field_name = field_name
        super().__init__(message)


def _spatial(layer, shape: Shape, rank: int, pool: bool) -> tuple[Shape, int]:
    """Output shape of a conv or pool layer with ``rank`` spatial dims, and the channel count seen."""
    name = layer.type
    if len(shape) != rank + 1:
        want = "channels x length" if rank == 1 else "channels x height x width"
        raise _ShapeError("type", f"{name} needs input of {want}, got shape {list(shape)}")
    channels, sizes = shape[0], shape[1:]
    kernel = _pair(layer.kernel_size, rank)
    stride = _pair(layer.stride if layer.stride is not None else layer.kernel_size, rank)
    dilation = _pair(getattr(layer, "dilation", 1), rank)
    if layer.padding == "same":
        if any(s != 1 for s in stride):
            raise _ShapeError("padding", "'same' padding needs stride 1")
        return (layer.out_channels, *sizes), channels
    padding = _pair(0 if layer.padding == "valid" else layer.padding, rank)
    if pool and any(p > k / 2 for p, k in zip(padding, kernel, strict=True)):
        raise _ShapeError("padding", "must be at most half of kernel_size")
    out = tuple(_window_out(n, k, s, p, d, getattr(layer, "ceil_mode", False))
                for n, k, s, p, d in zip(sizes, kernel, stride, padding, dilation, strict=True))
    if any(n < 1 for n in out):
        raise _ShapeError("kernel_size", f"input {list(shape)} is too small for kernel_size "
                                         f"{list(kernel)} (output would be {list(out)})")
    return ((channels if pool else layer.out_channels), *out), channels


def layer_output(layer, shape: Shape) -> tuple[Shape, int]:
    """A layer's output shape and parameter count for one sample of ``shape``."""
    kind = layer.type
    if kind == "Linear":
        return (*shape[:-1], layer.out_features), shape[-1] * layer.out_features + layer.bias * layer.out_features
    if kind in ("Conv1d", "Conv2d"):
        rank = 1 if kind == "Conv1d" else 2
        out, channels = _spatial(layer, shape, rank, pool=False)
        if channels % layer.groups or layer.out_channels % layer.groups:
            raise _ShapeError("groups", f"{layer.groups} must divide in_channels ({channels}) and "
                                        f"out_channels ({layer.out_channels})")
        kernel = math.prod(_pair(layer.kernel_size, rank))
        weights = layer.out_channels * (channels // layer.groups) * kernel
        return out, weights + layer.bias * layer.out_channels
    if kind in ("MaxPool1d", "AvgPool1d", "MaxPool2d", "AvgPool2d"):
        return _spatial(layer, shape, 1 if kind.endswith("1d") else 2, pool=True)[0], 0
    if kind == "Flatten":
        batched = (1, *shape)
        start, end = layer.start_dim % len(batched), layer.end_dim % len(batched)
        if start == 0 or start > end:
            raise _ShapeError("start_dim", "must leave the batch dimension alone (start_dim >= 1)")
        flat = (*batched[:start], math.prod(batched[start:end + 1]), *batched[end + 1:])
        return flat[1:], 0
    if kind in ("BatchNorm1d", "BatchNorm2d"):
        ranks = (1, 2) if kind == "BatchNorm1d" else (3,)
        if len(shape) not in ranks:
            raise _ShapeError("type", f"{kind} needs input of rank {' or '.join(map(str, ranks))} per sample, "
                                      f"got shape {list(shape)}")
        return shape, 2 * shape[0] * layer.affine
    if kind == "LayerNorm":
        return shape, shape[-1] * layer.elementwise_affine * (1 + layer.bias)
    if kind in ("Softmax", "LogSoftmax") and not -len(shape) - 1 <= layer.dim <= len(shape):
        raise _ShapeError("dim", f"out of range for input of shape {list(shape)}")
    if kind in ("Softmax", "LogSoftmax") and layer.dim % (len(shape) + 1) == 0:
        raise _ShapeError("dim", "must not be the batch dimension (0)")
    return shape, 0


def infer_shapes(spec: JobSpec, input_shape: Shape, n_outputs: int, limits: Limits | None = None) -> ShapeReport:
    """Walk the layers from one sample's shape; report shapes, parameters, and what doesn't fit."""
    report = ShapeReport()
    shape = tuple(input_shape)
    for index, layer in enumerate(spec.model.layers):
        try:
            out, parameters = layer_output(layer, shape)
        except _ShapeError as exc:
            message = str(exc)
            if exc.field_name == "type":  # the input has the wrong rank: say where it came from
                message += "; set data.image_shape" if index == 0 else "; check the layers before it"
            report.problems.append(Problem(f"model.layers[{index}].{exc.field_name}", message))
            return report
        report.layers.append(LayerShape(layer.type, shape, out, parameters))
        shape = out
    last = f"model.layers[{len(spec.model.layers) - 1}]"
    if len(shape) != 1:
        report.problems.append(Problem(last, f"the network must end with one value per output, but it gives "
                                             f"shape {list(shape)}; add a Flatten and a Linear"))
    elif shape[0] != n_outputs:
        why = {"regression": "one per target", "binary": "one logit for two classes",
               "multiclass": "one per class"}[spec.task]
        report.problems.append(Problem(last, f"the network ends with {shape[0]} outputs but task {spec.task!r} "
                                             f"on this data needs {n_outputs} ({why})"))
    limits = limits or Limits()
    if report.total_parameters > limits.max_parameters:
        report.problems.append(Problem("model", f"{report.total_parameters:,} parameters exceed the limit of "
                                                f"{limits.max_parameters:,} (max_parameters)"))
    return report
