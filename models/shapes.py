"""Shape inference for a spec's network, in plain Python (no torch).

Given the shape of one sample, each layer's output shape and parameter count follow from PyTorch's
formulas. The API uses this to refuse a network that can't fit its data before anything is queued,
and the engine uses it to fill in in_features, in_channels, num_features and normalized_shape.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from models.catalog import SKLEARN_DATASETS, DataShape, argument_problems
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


def sklearn_problems(data: SklearnData, limits: Limits) -> list[Problem]:
    """Arguments of a scikit-learn dataset that it would refuse, by scikit-learn's own rules (models.catalog)."""
    problems = _size_problems(data.params)
    if problems:
        return problems
    return [Problem(f"data.params.{key}" if key else "data.params", message)
            for key, message in argument_problems(data.name, data.params, limits.max_generator_setup)]


def data_shape(data: SklearnData, task: str) -> DataReport:
    """The shapes a scikit-learn dataset gives with these arguments (checked for sane sizes)."""
    problems = _size_problems(data.params)
    if problems:
        return DataReport(problems=problems)
    shape = SKLEARN_DATASETS[data.name].shape(data.params)
    return describe_data(shape, task, data.image_shape)


def _size_problems(params: dict) -> list[Problem]:
    """Sizes and counts that are whole numbers of a sane size (the catalog's shapes compute with them)."""
    problems = []
    for key in _SIZE_PARAMS:
        value = params.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_SIZE_PARAM:
            if key == "centers" and isinstance(value, list):
                continue
            problems.append(Problem(f"data.params.{key}", f"must be a whole number from 1 to {MAX_SIZE_PARAM}"))
    return problems


def describe_data(shape: DataShape, task: str, image_shape: list[int] | None) -> DataReport:
    """Check a dataset's shape against the task and image_shape; say what the network sees."""
    report = DataReport(n_samples=shape.n_samples)
    if shape.n_samples < 1 or shape.n_features < 1:
        report.problems.append(Problem("data", f"the data has {shape.n_samples} rows of {shape.n_features} "
                                               "features; training needs at least one of each"))
        return report
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
    elif shape.n_classes < 2:
        report.problems.append(Problem("task", f"{task!r} needs at least 2 classes, the data has "
                                               f"{shape.n_classes}"))
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
        # PyTorch pads d * (k - 1) in all, the odd one on the right.
        _check_padding_mode(layer, sizes, [(d * (k - 1) // 2, d * (k - 1) - d * (k - 1) // 2)
                                           for k, d in zip(kernel, dilation, strict=True)])
        return (layer.out_channels, *sizes), channels
    padding = _pair(0 if layer.padding == "valid" else layer.padding, rank)
    if pool and any(p > k / 2 for p, k in zip(padding, kernel, strict=True)):
        raise _ShapeError("padding", "must be at most half of kernel_size")
    if not pool:
        _check_padding_mode(layer, sizes, [(p, p) for p in padding])
    out = tuple(_window_out(n, k, s, p, d, getattr(layer, "ceil_mode", False))
                for n, k, s, p, d in zip(sizes, kernel, stride, padding, dilation, strict=True))
    if any(n < 1 for n in out):
        raise _ShapeError("kernel_size", f"input {list(shape)} is too small for kernel_size "
                                         f"{list(kernel)} (output would be {list(out)})")
    return ((channels if pool else layer.out_channels), *out), channels


def _check_padding_mode(layer, sizes: Shape, pads: list[tuple[int, int]]) -> None:
    """Reflect padding mirrors the input, so each side pads less than the input's length; circular padding
    wraps it around once at most, so no more than that length (PyTorch's rules, at the worker's cost)."""
    mode = layer.padding_mode
    if mode not in ("reflect", "circular"):
        return
    for size, (left, right) in zip(sizes, pads, strict=True):
        widest = max(left, right)
        if mode == "reflect" and widest >= size:
            raise _ShapeError("padding", f"'reflect' padding must be less than the length it pads: {widest} "
                                         f"on an input of {list(sizes)}")
        if mode == "circular" and widest > size:
            raise _ShapeError("padding", f"'circular' padding must be at most the length it pads: {widest} "
                                         f"on an input of {list(sizes)}")


def _flatten(layer, shape: Shape) -> Shape:
    """Flatten's output for one sample; its dims count the batch dimension, which must stay."""
    batched = (1, *shape)
    rank = len(batched)
    for name in ("start_dim", "end_dim"):
        dim = getattr(layer, name)
        if not -rank <= dim < rank:
            raise _ShapeError(name, f"{dim} is out of range for an input of {rank} dimensions with the batch "
                                    f"(shape [batch, {', '.join(map(str, shape))}]): use {-rank} to {rank - 1}")
    start, end = layer.start_dim % rank, layer.end_dim % rank
    if start == 0:
        raise _ShapeError("start_dim", "must leave the batch dimension alone (start_dim >= 1)")
    if start > end:
        raise _ShapeError("end_dim", f"comes before start_dim (dimension {end} before {start})")
    flat = (*batched[:start], math.prod(batched[start:end + 1]), *batched[end + 1:])
    return flat[1:]


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
        return _flatten(layer, shape), 0
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
    else:
        report.problems += class_weight_problems(spec, n_outputs)
    limits = limits or Limits()
    if report.total_parameters > limits.max_parameters:
        report.problems.append(Problem("model", f"{report.total_parameters:,} parameters exceed the limit of "
                                                f"{limits.max_parameters:,} (max_parameters)"))
    return report


def class_weight_problems(spec: JobSpec, n_classes: int) -> list[Problem]:
    """The loss's class weights against the classes (the network's outputs): one weight per class."""
    weight = getattr(spec.loss, "weight", None)
    if weight is None or len(weight) == n_classes:
        return []
    return [Problem("loss.weight", f"{len(weight)} class weights for {n_classes} classes; give one per class")]


# --- rows: enough for the split, the processes, the classes and the batches ---------------------

# The trainer evaluates in chunks of max(batch size, this) samples (Trainer.evaluate takes it from here).
EVAL_CHUNK = 4096


def split_sizes(n_samples: int, validation_split: float) -> tuple[int, int]:
    """(training rows, validation rows) of the seeded split: the validation part is the rounded share."""
    n_val = int(round(n_samples * validation_split))
    return n_samples - n_val, n_val


def fit_problems(spec: JobSpec, shape: DataShape, limits: Limits | None = None) -> list[Problem]:
    """Everything that keeps ``spec``'s network from training on data of ``shape``: the data against the task,
    the layers against the data, and the rows against the split, the processes, the classes and the batches."""
    data = describe_data(shape, spec.task, spec.data.image_shape)
    if data.problems:
        return data.problems
    problems = row_problems(spec, shape)
    network = infer_shapes(spec, data.input_shape, data.n_outputs, limits)
    if problems or network.problems:
        return problems + network.problems
    n_train, n_val = split_sizes(shape.n_samples, spec.data.validation_split)
    return batch_problems(spec, network, n_train, n_val) + schedule_problems(spec, n_train)


def row_problems(spec: JobSpec, shape: DataShape) -> list[Problem]:
    """Rows too few for the validation split, for one training row per process, or to hold every class."""
    n = shape.n_samples
    n_train, n_val = split_sizes(n, spec.data.validation_split)
    split = spec.data.validation_split
    if split > 0 and n_val < 1:
        return [Problem("data.validation_split", f"{split} of {n} rows rounds to no validation rows; raise it, "
                                                 "use more rows, or set 0 for no validation")]
    if split > 0 and n_train < 1:
        return [Problem("data.validation_split", f"{split} of {n} rows leaves no training rows")]
    problems = []
    world = spec.resources.world_size
    if n_train < world:
        field_name = "resources.gpus" if spec.resources.gpus else "resources.processes"
        problems.append(Problem(field_name, f"{world} processes need a training row each; the data has "
                                            f"{n_train}"))
    elif 0 in training_batches(spec, n_train):
        problems.append(Problem("training.batch_size", f"{spec.training.batch_size} is less than the {world} "
                                                       "processes that share each batch; each needs a sample"))
    if spec.data.source == "sklearn" and spec.task == "multiclass" and shape.n_classes and n < shape.n_classes:
        # The engine counts the classes it finds in the labels (a file's are counted so too): each must be there.
        problems.append(Problem("data.params.n_samples", f"{n} rows can't hold all {shape.n_classes} classes; "
                                                         "each class needs a row"))
    return problems


def batch_problems(spec: JobSpec, network: ShapeReport, n_train: int, n_val: int) -> list[Problem]:
    """A batch of one sample where a BatchNorm normalizes one value per channel: PyTorch refuses to train
    on it (and to evaluate on it, without running statistics)."""
    lone = [(index, layer) for index, layer in enumerate(network.layers)
            if layer.type.startswith("BatchNorm") and math.prod(layer.input_shape[1:]) == 1]
    if not lone:
        return []
    index, layer = lone[0]
    where = f"{layer.type} (model.layers[{index}]) needs more than one value per channel"
    problems = []
    if 1 in training_batches(spec, n_train):
        batch = "a process's share of a batch" if spec.resources.world_size > 1 else "a batch"
        problems.append(Problem("training.batch_size", f"with {n_train} training rows and batch_size "
                                                       f"{spec.training.batch_size} {batch} holds 1 sample, and "
                                                       f"{where}; pick another batch_size"))
    stateless = [i for i, _ in lone if not spec.model.layers[i].track_running_stats]
    if stateless and n_val and 1 in _chunks(n_val, max(min(spec.training.batch_size, n_train), EVAL_CHUNK)):
        problems.append(Problem("data.validation_split", f"the validation part has an evaluation chunk of 1 "
                                                         f"sample ({n_val} rows), and {where} without "
                                                         "track_running_stats; change the split"))
    return problems


def schedule_problems(spec: JobSpec, n_train: int) -> list[Problem]:
    """A OneCycleLR whose phase boundaries PyTorch divides by zero on: a warm-up of exactly one step, or (three
    phases) a last phase of none. Computed as ``torch.optim.lr_scheduler.OneCycleLR`` does, in floats."""
    scheduler = spec.scheduler
    if scheduler is None or scheduler.type != "OneCycleLR":
        return []
    steps = spec.training.epochs * steps_per_epoch(spec, n_train)
    pct = scheduler.pct_start
    if float(pct * steps) - 1 == 0 or scheduler.three_phase and float(2 * pct * steps) - 2 == steps - 1:
        return [Problem("scheduler.pct_start", f"{pct} of {steps} steps ({spec.training.epochs} epochs of "
                                               f"{steps_per_epoch(spec, n_train)} steps) puts a phase of OneCycleLR "
                                               "on a single step, which PyTorch divides by zero on; change pct_start")]
    return []


def steps_per_epoch(spec: JobSpec, n_train: int) -> int:
    """Optimizer steps in an epoch, as the trainer counts them (a last batch too small to share is dropped)."""
    world = spec.resources.world_size
    batch = min(spec.training.batch_size, n_train)
    used = n_train - (n_train % batch if n_train % batch < world else 0)
    return optimizer_steps(math.ceil(used / batch), spec.training.accumulate_batches)


def optimizer_steps(batches: int, accumulate: int) -> int:
    """Optimizer steps in an epoch of ``batches``: one per ``accumulate`` batches, and one for the rest."""
    return math.ceil(batches / accumulate)


def training_batches(spec: JobSpec, n_train: int) -> set[int]:
    """The sizes of the batches one process trains on, as the trainer forms them: batches of batch_size (at
    most the training rows), the last one smaller, dropped if too small to share; each split across processes."""
    world = spec.resources.world_size
    batch = min(spec.training.batch_size, n_train)
    sizes = _chunks(n_train, batch)
    last = n_train % batch
    if last and last < world:
        sizes.discard(last)
    return {size // world + (rank < size % world) for size in sizes for rank in range(world)}


def _chunks(n: int, size: int) -> set[int]:
    """The sizes of ``n`` items cut into chunks of ``size``."""
    return {min(size, n)} | ({n % size} if n % size else set())
