"""A job's peak memory, estimated from its spec and its data's shape before anything is queued (no torch).

The engine keeps the whole dataset on the training device as float32 tensors and trains in batches, so
what a run holds follows from the shapes (models.shapes): the data and each epoch's shuffled copy of its
training part, the parameters with their gradients and optimizer state, and every batch's outputs of the
epoch (kept for the epoch's metrics) stay; the activations autograd keeps for one batch, the optimizer's
step, the epoch's metrics and the evaluation of the validation part in chunks come and go. Before training,
reading the data holds the source arrays and their float32 copies at once.

The API refuses a job whose estimate is over ``max_job_memory``; a worker checks it against its own device
(worker.engine.check_memory). ``tests/test_memory_estimate.py`` holds it within a factor of 2 of the peak
measured in a fresh process.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from models.catalog import SKLEARN_DATASETS, DataShape
from models.shapes import EVAL_CHUNK, LayerShape, describe_data, infer_shapes, split_sizes
from models.spec import JobSpec, Limits, Problem

FLOAT = 4  # float32: data, parameters, activations
INDEX = 8  # int64: class labels, the shuffle order, max-pool indices
# A worker process with torch, scikit-learn and the engine loaded, after its first job (whose first optimizer
# step imports torch._dynamo): 0.98 GB resident, measured with torch 2.13 (CUDA build) on Linux.
PROCESS_OVERHEAD = 1 << 30
# Each further process of a data-parallel job: its own memory (0.42 GB anonymous, measured likewise); the
# libraries' pages are shared with the first.
RANK_OVERHEAD = 512 << 20
# What the CUDA context takes of a GPU's memory before the first tensor, with cuBLAS' workspace.
CUDA_CONTEXT = 768 << 20

# Reading the data, in bytes per value of the table (samples × (features + targets)): the most held while
# the source is read, and what stays held while the float32 copies are made (8 bytes more: the whole X, then
# its training and validation parts). scikit-learn's generators draw a float64 array and shuffle it into a
# copy (make_classification holds a third); the CSV reader (models.tabular) parses blocks and joins them,
# and the target column it hands back is a view that keeps the whole table; an NPZ member is read as stored
# (float64 assumed). Measured with 10^5 to 2·10^5 rows.
_READ_PEAK = {"make_classification": 24, "csv": 16, "npz": 8}
_HELD = {"csv": 16}
_GENERATOR_PEAK, _ARRAY_HELD = 16, 8

# What autograd keeps of a layer for the backward pass: its output (these), nothing (views), else its input.
_KEEPS_OUTPUT = {"ReLU", "Sigmoid", "Tanh", "Softmax", "LogSoftmax"}
_VIEWS = {"Flatten", "Identity"}
# Bytes kept per output value besides: CPU dropout keeps its float32 mask, max-pooling its int64 indices.
_EXTRA_PER_OUTPUT = {"Dropout": FLOAT, "MaxPool1d": INDEX, "MaxPool2d": INDEX}
# oneDNN convolutions write their output in a blocked layout, then reorder it: two copies for a moment.
_REORDERED = {"Conv1d", "Conv2d"}
# The parts that come and go; the others stay from the first batch to the end.
PHASES = ("activations", "optimizer step", "metrics", "evaluation")
# glibc's malloc serves blocks under its largest mmap threshold (32 MiB) from its heap and keeps them when
# freed; blocks freed and allocated again every batch fragment it, and a process grew by 1.4 to 2.1 times
# what they weigh (measured with 8 to 17 MB tensors; 40 MB ones are mapped and given back).
HEAP_CEILING = 32 << 20
HEAP_SLACK = 0.75


@dataclass(frozen=True)
class MemoryEstimate:
    """A job's memory by part, in bytes. ``parts`` are on the training device, one rank's share."""

    parts: dict[str, int]
    loading: int  # on the host while the data is read and split, before training starts
    world_size: int = 1
    overhead: int = PROCESS_OVERHEAD  # the (first) process itself
    slack: int = 0  # on the CPU, what the C allocator's heap keeps of the blocks freed each batch
    biggest_layer: int | None = None  # the first layer with the widest output
    batch_size: int = 0  # the batch one rank trains on

    @property
    def resident(self) -> int:
        return sum(size for name, size in self.parts.items() if name not in PHASES)

    @property
    def device(self) -> int:
        """One rank's peak on a GPU: what stays, and the largest of what comes and goes (the caching
        allocator gives its cached blocks back before it fails)."""
        return self.resident + max(self.parts[name] for name in PHASES)

    @property
    def processes(self) -> int:
        """The job's processes themselves: the first with its libraries, the others their own memory."""
        return self.overhead + (self.world_size - 1) * RANK_OVERHEAD

    @property
    def host(self) -> int:
        """The host's share of a job on GPUs: its processes, each rank with its data as read."""
        return self.processes + self.world_size * self.loading

    @property
    def total(self) -> int:
        """The job's peak on the CPU, where host and device are one memory: what ``max_job_memory`` bounds.

        The phases add up: the C allocator keeps what one phase freed, in pieces the next can't always reuse
        (measured: the evaluation after a convolutional batch comes on top of it); so does its slack.
        """
        return self.processes + self.world_size * max(self.loading, sum(self.parts.values()) + self.slack)

    def as_dict(self) -> dict[str, int]:
        """The estimate as plain numbers, for JSON."""
        return {"total": self.total, "device": self.device, "host": self.host, "loading": self.loading,
                "slack": self.slack, "processes": self.processes, "world_size": self.world_size, **self.parts}

    def largest_parts(self, count: int = 3) -> str:
        """``activations 2.5 GiB, data 512 MiB, ...``: where the memory goes, largest first."""
        named = sorted({**self.parts, "reading the data": self.loading}.items(), key=lambda item: -item[1])
        return ", ".join(f"{name} {format_bytes(size)}" for name, size in named[:count] if size)


def format_bytes(size: float) -> str:
    """``1.01 GiB``, ``512 MiB``, ``300 B``: binary units, as the limits are set, to 3 digits."""
    units = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")
    power = 0
    while size >= 1024 and power < len(units) - 1:
        size, power = size / 1024, power + 1
    return f"{size:.0f} {units[power]}" if size >= 100 else f"{size:.3g} {units[power]}"


def estimate_memory(spec: JobSpec, shape: DataShape, source: str | None = None) -> MemoryEstimate | None:
    """The estimate for ``spec`` trained on data of ``shape``, or None if its network doesn't fit the data
    (the checks of models.shapes say why). ``source`` is what the data is read from: ``csv``, ``npz`` or a
    scikit-learn function's name; by default the spec's."""
    data = describe_data(shape, spec.task, spec.data.image_shape)
    if data.problems:
        return None
    network = infer_shapes(spec, data.input_shape, data.n_outputs)
    if len(network.layers) != len(spec.model.layers):
        return None
    layers, world = network.layers, spec.resources.world_size
    n_train, n_val = split_sizes(shape.n_samples, spec.data.validation_split)
    labels = spec.loss_type in ("CrossEntropyLoss", "NLLLoss")
    targets = data.n_outputs if spec.task == "regression" else 1
    sample = FLOAT * _values(data.input_shape) + (INDEX if labels else FLOAT * targets)
    n_outputs = _values(layers[-1].output_shape)
    batch = min(spec.training.batch_size, max(n_train, 1))
    local_batch = math.ceil(batch / world)
    params = FLOAT * network.total_parameters
    per_sample, biggest = _training_activations(layers, spec.data.standardize)
    chunk = min(max(batch, EVAL_CHUNK), n_val)
    restores = spec.early_stopping is not None and spec.early_stopping.restore_best_weights
    parts = {
        "data": shape.n_samples * sample,
        "shuffled copy": n_train * (sample + INDEX) if spec.training.shuffle else 0,
        "parameters": params,
        "gradients": params,
        "optimizer state": _optimizer_states(spec) * params,
        "best weights": params if restores else 0,
        "epoch outputs": FLOAT * n_train * n_outputs,
        "activations": local_batch * per_sample,
        # The step's temporaries (Adam's denominator, weight decay's term), and the weights as safetensors
        # bytes at the end: about twice the parameters.
        "optimizer step": 2 * params,
        "metrics": _metrics(spec, n_train, n_outputs),
        "evaluation": chunk * _evaluation_working(layers, spec.data.standardize)
        + _metrics(spec, n_val, n_outputs) + FLOAT * n_val * n_outputs,
    }
    raw = shape.n_samples * (_values(data.input_shape) + targets)
    loading = raw * _loading_bytes(source or _source_of(spec))
    return MemoryEstimate(parts, loading, world, slack=_heap_slack(parts, layers, local_batch), biggest_layer=biggest,
                          batch_size=local_batch)


def memory_problems(spec: JobSpec, shape: DataShape, limits: Limits, source: str | None = None) -> list[Problem]:
    """The job's estimated peak over ``limits.max_job_memory``, as a problem at the field to change."""
    estimate = estimate_memory(spec, shape, source)
    if estimate is None or estimate.total <= limits.max_job_memory:
        return []
    return [Problem(field_for(spec, estimate), f"the job needs an estimated {format_bytes(estimate.total)} of "
                    f"memory ({estimate.largest_parts()}; batch size {estimate.batch_size}), over the limit of "
                    f"{format_bytes(limits.max_job_memory)} (max_job_memory)")]


def field_for(spec: JobSpec, estimate: MemoryEstimate) -> str:
    """What a user would change to need less: the layer with the widest output, the model, the data, or the
    number of processes."""
    parts = {**estimate.parts, "reading the data": estimate.loading}
    largest = max(parts, key=lambda name: parts[name])
    if estimate.processes - estimate.overhead > estimate.world_size * parts[largest]:
        return "resources.gpus" if spec.resources.gpus else "resources.processes"
    if largest in ("activations", "evaluation") and estimate.biggest_layer is not None:
        return f"model.layers[{estimate.biggest_layer}]"
    if largest in ("parameters", "gradients", "optimizer state", "best weights", "optimizer step"):
        return "model"
    return {"sklearn": "data.params.n_samples", "dataset": "data.dataset_id", "file": "data.path"}[spec.data.source]


def sklearn_shape(spec: JobSpec) -> DataShape | None:
    """The shape a spec's scikit-learn dataset gives (None for a file: its shape is in the file)."""
    if spec.data.source != "sklearn":
        return None
    return SKLEARN_DATASETS[spec.data.name].shape(spec.data.params)


def _heap_slack(parts: dict[str, int], layers: list[LayerShape], batch: int) -> int:
    """What the C allocator's heap keeps on top of the blocks each batch frees and allocates again (its
    activations; the gradients and the step's temporaries), counting only blocks small enough for the heap."""
    churned = 0
    if batch * FLOAT * max(_values(layer.output_shape) for layer in layers) < HEAP_CEILING:
        churned += parts["activations"]
    if FLOAT * max(layer.parameters for layer in layers) < HEAP_CEILING:
        churned += parts["gradients"] + parts["optimizer step"]
    return int(HEAP_SLACK * churned)


def _values(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def _source_of(spec: JobSpec) -> str:
    if spec.data.source == "sklearn":
        return spec.data.name
    if spec.data.source == "file" and spec.data.path.lower().endswith(".npz"):
        return "npz"
    return "csv"  # the costlier guess for an upload of unknown format


def _loading_bytes(source: str) -> int:
    """Bytes per value of the table at the peak of reading it and making its float32 copies."""
    if source.startswith("load_"):  # bundled datasets of a few thousand rows, read as float64
        source = "npz"
    held = _HELD.get(source, _ARRAY_HELD)
    return max(_READ_PEAK.get(source, _GENERATOR_PEAK), held + 2 * FLOAT)


def _optimizer_states(spec: JobSpec) -> int:
    """How many tensors the size of the parameters the optimizer keeps."""
    opt = spec.optimizer
    if opt.type in ("Adam", "AdamW"):
        return 2 + opt.amsgrad
    if opt.type == "SGD":
        return int(opt.momentum > 0)
    if opt.type == "RMSprop":
        return 1 + (opt.momentum > 0) + opt.centered
    return {"Adagrad": 1, "Adadelta": 2}[opt.type]


def _training_activations(layers: list[LayerShape], standardize: bool) -> tuple[int, int]:
    """Bytes per sample a training batch holds at its peak, and the index of the layer with the widest output.

    A layer's output is kept if autograd needs it (the layer keeps its output, or the next layer, past any
    views, keeps its input); on top, one layer's input and output are in flight, or their gradients.
    """
    kept = [0] * len(layers)
    for index, layer in enumerate(layers):
        out = _values(layer.output_shape)
        kept[index] = _EXTRA_PER_OUTPUT.get(layer.type, 0) * out
        if layer.type not in _VIEWS and (layer.type in _KEEPS_OUTPUT or _next_keeps_input(layers, index + 1)):
            kept[index] += FLOAT * out
    # Standardizing, (x - mean) / std is a new tensor, which the first layer may keep.
    inputs = FLOAT * _values(layers[0].input_shape) if standardize and _next_keeps_input(layers, 0) else 0
    loss = 2 * FLOAT * _values(layers[-1].output_shape)  # the loss's own terms (log-softmax, squared errors)
    biggest = max(range(len(layers)), key=lambda i: _values(layers[i].output_shape))  # the first of the widest
    return inputs + sum(kept) + _in_flight(layers) + loss, biggest


def _next_keeps_input(layers: list[LayerShape], index: int) -> bool:
    """Whether the layer that takes the tensor at ``index`` (past any views; the loss at the end) keeps it."""
    while index < len(layers) and layers[index].type in _VIEWS:
        index += 1
    return index == len(layers) or layers[index].type not in _KEEPS_OUTPUT | {"Dropout"}


def _in_flight(layers: list[LayerShape]) -> int:
    """Bytes per sample of the largest input and output held at once (a convolution's output twice)."""
    return max(FLOAT * (_values(layer.input_shape) + _values(layer.output_shape) * (1 + (layer.type in _REORDERED)))
               for layer in layers)


def _evaluation_working(layers: list[LayerShape], standardize: bool) -> int:
    """Bytes per sample that evaluating a chunk holds: without autograd, one layer's input and output."""
    return _in_flight(layers) + (FLOAT * _values(layers[0].input_shape) if standardize else 0)


def _metrics(spec: JobSpec, samples: int, n_outputs: int) -> int:
    """Bytes a split's metrics take at once: its outputs joined into one tensor, then the task's sums
    (float64 residuals for regression; predicted labels and comparisons for classification)."""
    return samples * (FLOAT * n_outputs + (3 * 8 * n_outputs if spec.task == "regression" else INDEX + 1))
