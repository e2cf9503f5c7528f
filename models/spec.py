"""The job spec: a PyTorch training run as JSON, validated by pydantic.

Names are PyTorch's own: a layer's ``type`` is a ``torch.nn`` class name and its other keys are that
class's keyword arguments; input sizes (in_features, in_channels, num_features, normalized_shape)
are inferred from the data. Everything is an allow-list and nothing is ever evaluated.
This module imports neither torch nor SQLAlchemy: the API validates specs without either.
"""

from __future__ import annotations

import difflib
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PlainValidator, field_validator, model_validator

from models.catalog import SKLEARN_DATASETS
from models.numbers import FLOAT32_MAX, number_problem
from models.text import MAX_NAME_LENGTH, MAX_TAG_LENGTH, label_problem, quoted, tag_problem, text_problem

# Every whole number of a spec fits an INTEGER column: no size or count comes near it, and the arithmetic
# on them (parameter counts, shapes) stays small enough to print.
MAX_WHOLE = 2**31 - 1
PositiveInt = Annotated[int, Field(ge=1, le=MAX_WHOLE)]
NonNegInt = Annotated[int, Field(ge=0, le=MAX_WHOLE)]
Dim = Annotated[int, Field(ge=-MAX_WHOLE, le=MAX_WHOLE)]


def _trainable(value: float) -> float:
    problem = number_problem(value)
    if problem:
        raise ValueError(problem)
    return value


# Every number of a spec ends up in a float32 tensor or kernel argument: models.numbers' one rule.
Float = Annotated[float, AfterValidator(_trainable),
                  Field(json_schema_extra={"minimum": -FLOAT32_MAX, "maximum": FLOAT32_MAX})]
PositiveFloat = Annotated[float, Field(gt=0, json_schema_extra={"maximum": FLOAT32_MAX}),
                          AfterValidator(_trainable)]
NonNegFloat = Annotated[float, Field(ge=0, json_schema_extra={"maximum": FLOAT32_MAX}),
                        AfterValidator(_trainable)]
Probability = Annotated[float, Field(ge=0, le=1)]
IntPair = Annotated[list[PositiveInt], Field(min_length=1, max_length=2)]
Size = Union[PositiveInt, IntPair]
PadSize = Union[NonNegInt, Annotated[list[NonNegInt], Field(min_length=1, max_length=2)]]
MAX_TAGS = 20  # tags of one job: labels to find it by, not a place for data


def _held_to(rule: Callable[[str], str | None]) -> AfterValidator:
    """A validator that refuses a string with what ``rule`` (one of models.text's) finds wrong with it."""

    def check(value: str) -> str:
        problem = rule(value)
        if problem:
            raise ValueError(problem)
        return value

    return AfterValidator(check)


def Text(max_length: int = MAX_NAME_LENGTH, min_length: int = 0):  # noqa: N802 a type, named as one
    """A string of the spec (all of it is stored): models.text's one rule, bounded, no control characters."""
    return Annotated[str, Field(min_length=min_length or None, json_schema_extra={"maxLength": max_length}),
                     _held_to(lambda value: text_problem(value, max_length))]


# A label the job is found by (GET /jobs?experiment=, ?tag=): models.text's rules for labels and tags.
Label = Annotated[str, Field(min_length=1, json_schema_extra={"maxLength": MAX_NAME_LENGTH}), _held_to(label_problem)]
Tag = Annotated[str, Field(min_length=1, json_schema_extra={"maxLength": MAX_TAG_LENGTH}), _held_to(tag_problem)]


class Strict(BaseModel):
    """Base for every spec part: unknown keys are errors, never silently ignored."""

    # strict: "16" is not 16; a spec says what it means. Numbers are finite: NaN trains nothing.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


# --- layers -------------------------------------------------------------------------------------


class Linear(Strict):
    type: Literal["Linear"]
    out_features: PositiveInt
    bias: bool = True


class _Window(Strict):
    """A layer that slides a window over 1 or 2 dimensions: each size is one number or one per dimension."""

    @field_validator("kernel_size", "stride", "padding", "dilation", check_fields=False)
    @classmethod
    def _one_size_per_dimension(cls, value):
        dimensions = 1 if cls.__name__.endswith("1d") else 2
        if isinstance(value, list) and len(value) != dimensions:
            raise ValueError(f"{cls.__name__} takes one number or a list of {dimensions} (one per dimension), "
                             f"not a list of {len(value)}")
        return value


class _Conv(_Window):
    out_channels: PositiveInt
    kernel_size: Size
    stride: Size = 1
    padding: Union[PadSize, Literal["same", "valid"]] = 0
    dilation: Size = 1
    groups: PositiveInt = 1
    bias: bool = True
    padding_mode: Literal["zeros", "reflect", "replicate", "circular"] = "zeros"


class Conv1d(_Conv):
    type: Literal["Conv1d"]


class Conv2d(_Conv):
    type: Literal["Conv2d"]


class _MaxPool(_Window):
    kernel_size: Size
    stride: Size | None = None
    padding: PadSize = 0
    dilation: Size = 1
    ceil_mode: bool = False


class MaxPool1d(_MaxPool):
    type: Literal["MaxPool1d"]


class MaxPool2d(_MaxPool):
    type: Literal["MaxPool2d"]


class _AvgPool(_Window):
    kernel_size: Size
    stride: Size | None = None
    padding: PadSize = 0
    ceil_mode: bool = False
    count_include_pad: bool = True


class AvgPool1d(_AvgPool):
    type: Literal["AvgPool1d"]


class AvgPool2d(_AvgPool):
    type: Literal["AvgPool2d"]


class Flatten(Strict):
    type: Literal["Flatten"]
    start_dim: Dim = 1
    end_dim: Dim = -1


class Dropout(Strict):
    type: Literal["Dropout"]
    p: Annotated[float, Field(ge=0, lt=1)] = 0.5


class _BatchNorm(Strict):
    eps: PositiveFloat = 1e-5
    momentum: Probability | None = 0.1
    affine: bool = True
    track_running_stats: bool = True


class BatchNorm1d(_BatchNorm):
    type: Literal["BatchNorm1d"]


class BatchNorm2d(_BatchNorm):
    type: Literal["BatchNorm2d"]


class LayerNorm(Strict):
    """Normalizes over the last dimension of its input (normalized_shape is inferred)."""

    type: Literal["LayerNorm"]
    eps: PositiveFloat = 1e-5
    elementwise_affine: bool = True
    bias: bool = True


class ReLU(Strict):
    type: Literal["ReLU"]


class LeakyReLU(Strict):
    type: Literal["LeakyReLU"]
    negative_slope: NonNegFloat = 0.01


class Sigmoid(Strict):
    type: Literal["Sigmoid"]


class Tanh(Strict):
    type: Literal["Tanh"]


class Softmax(Strict):
    type: Literal["Softmax"]
    dim: Dim = -1


class LogSoftmax(Strict):
    type: Literal["LogSoftmax"]
    dim: Dim = -1


class SELU(Strict):
    type: Literal["SELU"]


class Softplus(Strict):
    type: Literal["Softplus"]
    beta: PositiveFloat = 1.0
    threshold: PositiveFloat = 20.0


class GELU(Strict):
    type: Literal["GELU"]
    approximate: Literal["none", "tanh"] = "none"


class ELU(Strict):
    type: Literal["ELU"]
    alpha: PositiveFloat = 1.0


class Identity(Strict):
    type: Literal["Identity"]


Layer = Annotated[
    Union[
        Linear, Conv1d, Conv2d, MaxPool1d, MaxPool2d, AvgPool1d, AvgPool2d, Flatten, Dropout,
        BatchNorm1d, BatchNorm2d, LayerNorm, ReLU, LeakyReLU, Sigmoid, Tanh, Softmax, LogSoftmax,
        SELU, Softplus, GELU, ELU, Identity,
    ],
    Field(discriminator="type"),
]

# --- losses -------------------------------------------------------------------------------------


class MSELoss(Strict):
    type: Literal["MSELoss"]


class L1Loss(Strict):
    type: Literal["L1Loss"]


class HuberLoss(Strict):
    type: Literal["HuberLoss"]
    delta: PositiveFloat = 1.0


class SmoothL1Loss(Strict):
    type: Literal["SmoothL1Loss"]
    beta: NonNegFloat = 1.0


class BCELoss(Strict):
    """Expects probabilities: end the model with a Sigmoid."""

    type: Literal["BCELoss"]


# A class weight (and BCEWithLogitsLoss's pos_weight) weighs a class's samples in the loss: an imbalance of a
# million to one is past any real data, and bigger weights overflow float32's sums (1e38 made the first loss nan).
MAX_CLASS_WEIGHT = 1e6
ClassWeight = Annotated[float, Field(gt=0, le=MAX_CLASS_WEIGHT)]


class BCEWithLogitsLoss(Strict):
    type: Literal["BCEWithLogitsLoss"]
    pos_weight: ClassWeight | None = None


# One positive weight per class (PyTorch's ``weight``), for imbalanced classes; how many classes the data has is
# known where the data is (models.shapes.infer_shapes checks the length against the network's outputs).
MAX_CLASS_WEIGHTS = 10_000
ClassWeights = Annotated[list[ClassWeight], Field(min_length=2, max_length=MAX_CLASS_WEIGHTS)]


class CrossEntropyLoss(Strict):
    type: Literal["CrossEntropyLoss"]
    label_smoothing: Annotated[float, Field(ge=0, le=1)] = 0.0
    weight: ClassWeights | None = None


class NLLLoss(Strict):
    """Expects log-probabilities: end the model with a LogSoftmax."""

    type: Literal["NLLLoss"]
    weight: ClassWeights | None = None


Loss = Annotated[
    Union[MSELoss, L1Loss, HuberLoss, SmoothL1Loss, BCELoss, BCEWithLogitsLoss, CrossEntropyLoss, NLLLoss],
    Field(discriminator="type"),
]
REGRESSION_LOSSES = {"MSELoss", "L1Loss", "HuberLoss", "SmoothL1Loss"}
BINARY_LOSSES = {"BCELoss", "BCEWithLogitsLoss"}
MULTICLASS_LOSSES = {"CrossEntropyLoss", "NLLLoss"}

# --- optimizers ---------------------------------------------------------------------------------

Betas = Annotated[list[Annotated[float, Field(ge=0, lt=1)]], Field(min_length=2, max_length=2)]


class SGD(Strict):
    type: Literal["SGD"]
    lr: PositiveFloat = 0.01
    momentum: NonNegFloat = 0.0
    dampening: NonNegFloat = 0.0
    weight_decay: NonNegFloat = 0.0
    nesterov: bool = False

    @model_validator(mode="after")
    def _nesterov_needs_momentum(self) -> SGD:
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise ValueError("nesterov requires momentum > 0 and dampening = 0")
        return self


class Adam(Strict):
    type: Literal["Adam"]
    lr: PositiveFloat = 0.001
    betas: Betas = [0.9, 0.999]
    eps: PositiveFloat = 1e-8
    weight_decay: NonNegFloat = 0.0
    amsgrad: bool = False


class AdamW(Strict):
    type: Literal["AdamW"]
    lr: PositiveFloat = 0.001
    betas: Betas = [0.9, 0.999]
    eps: PositiveFloat = 1e-8
    weight_decay: NonNegFloat = 0.01
    amsgrad: bool = False


class RMSprop(Strict):
    type: Literal["RMSprop"]
    lr: PositiveFloat = 0.01
    alpha: Probability = 0.99
    eps: PositiveFloat = 1e-8
    weight_decay: NonNegFloat = 0.0
    momentum: NonNegFloat = 0.0
    centered: bool = False


class Adagrad(Strict):
    type: Literal["Adagrad"]
    lr: PositiveFloat = 0.01
    lr_decay: NonNegFloat = 0.0
    weight_decay: NonNegFloat = 0.0
    initial_accumulator_value: NonNegFloat = 0.0
    eps: PositiveFloat = 1e-10


class Adadelta(Strict):
    type: Literal["Adadelta"]
    lr: PositiveFloat = 1.0
    rho: Probability = 0.9
    eps: PositiveFloat = 1e-6
    weight_decay: NonNegFloat = 0.0


Optimizer = Annotated[Union[SGD, Adam, AdamW, RMSprop, Adagrad, Adadelta], Field(discriminator="type")]

# --- schedulers (stepped once an epoch, except OneCycleLR: once a batch) ------------------------


class StepLR(Strict):
    type: Literal["StepLR"]
    step_size: PositiveInt
    gamma: PositiveFloat = 0.1


class MultiStepLR(Strict):
    type: Literal["MultiStepLR"]
    milestones: Annotated[list[PositiveInt], Field(min_length=1, max_length=100)]
    gamma: PositiveFloat = 0.1


class ExponentialLR(Strict):
    type: Literal["ExponentialLR"]
    gamma: PositiveFloat


class CosineAnnealingLR(Strict):
    type: Literal["CosineAnnealingLR"]
    T_max: PositiveInt
    eta_min: NonNegFloat = 0.0


class ReduceLROnPlateau(Strict):
    type: Literal["ReduceLROnPlateau"]
    monitor: Text() = "val_loss"
    mode: Literal["min", "max"] = "min"
    factor: Annotated[float, Field(gt=0, lt=1)] = 0.1
    patience: NonNegInt = 10
    threshold: NonNegFloat = 1e-4
    threshold_mode: Literal["rel", "abs"] = "rel"
    cooldown: NonNegInt = 0
    min_lr: NonNegFloat = 0.0
    eps: NonNegFloat = 1e-8


class OneCycleLR(Strict):
    """total_steps is inferred: epochs times batches per epoch."""

    type: Literal["OneCycleLR"]
    max_lr: PositiveFloat
    pct_start: Annotated[float, Field(gt=0, lt=1)] = 0.3
    anneal_strategy: Literal["cos", "linear"] = "cos"
    div_factor: PositiveFloat = 25.0
    final_div_factor: PositiveFloat = 1e4
    three_phase: bool = False


Scheduler = Annotated[
    Union[StepLR, MultiStepLR, ExponentialLR, CosineAnnealingLR, ReduceLROnPlateau, OneCycleLR],
    Field(discriminator="type"),
]

# --- data ---------------------------------------------------------------------------------------

# The most numbers an argument's list may hold (per-feature shift and scale, per-center sample counts).
MAX_PARAM_ITEMS = 10_000
_PARAM_SCHEMA = Union[bool, Annotated[int, Field(ge=-(2**63), le=2**63 - 1)], float, Annotated[str, Field(
    max_length=MAX_NAME_LENGTH)], Annotated[list[Union[int, float]], Field(max_length=MAX_PARAM_ITEMS)], None]


def _param_value(value: Any) -> Any:
    """A scikit-learn argument as JSON holds it: null, a boolean, a finite number, a short string, or a list
    of at most MAX_PARAM_ITEMS numbers. One message for any other value (not one per type it isn't)."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return _param_number(value)
    if isinstance(value, str):
        problem = text_problem(value)
        if problem:
            raise ValueError(problem)
        return value
    if isinstance(value, list):
        if len(value) > MAX_PARAM_ITEMS:
            raise ValueError(f"a list of at most {MAX_PARAM_ITEMS} numbers, not {len(value)}")
        if any(isinstance(item, bool) or not isinstance(item, (int, float)) for item in value):
            raise ValueError("a list may hold only numbers")
        return [_param_number(item) for item in value]
    raise ValueError("must be null, a boolean, a number, a string or a list of numbers")


def _param_number(value: int | float) -> int | float:
    if isinstance(value, float) and number_problem(value):
        raise ValueError(number_problem(value))
    if isinstance(value, int) and not -(2**63) <= value <= 2**63 - 1:
        raise ValueError("must be a whole number from -2^63 to 2^63 - 1")
    return value


ParamValue = Annotated[Any, PlainValidator(_param_value, json_schema_input_type=_PARAM_SCHEMA)]


class _DataCommon(Strict):
    validation_split: Annotated[float, Field(ge=0, le=0.9)] = 0.2
    standardize: bool = False
    image_shape: Annotated[list[PositiveInt], Field(min_length=2, max_length=3)] | None = None


class SklearnData(_DataCommon):
    source: Literal["sklearn"]
    name: Text()
    params: dict[str, ParamValue] = {}

    @model_validator(mode="after")
    def _known_dataset_and_params(self) -> SklearnData:
        entry = SKLEARN_DATASETS.get(self.name)
        if entry is None:
            raise SpecProblem("name", unknown_name_message(self.name, "scikit-learn dataset", SKLEARN_DATASETS))
        for key in self.params:
            if key not in entry.params:
                raise SpecProblem(f"params.{key}", unknown_name_message(key, f"parameter of {self.name}",
                                                                        entry.params))
        return self


class DatasetData(_DataCommon):
    """A CSV or NPZ file uploaded to the service (POST /datasets)."""

    source: Literal["dataset"]
    dataset_id: Text(64, min_length=1)
    target: Text() | None = None


class FileData(_DataCommon):
    """A local CSV or NPZ file, for ``torchyard train`` on one's own machine; the API refuses it."""

    source: Literal["file"]
    path: Text(4096, min_length=1)
    target: Text() | None = None


Data = Annotated[Union[SklearnData, DatasetData, FileData], Field(discriminator="source")]

# --- the rest -----------------------------------------------------------------------------------


class ModelSpec(Strict):
    layers: Annotated[list[Layer], Field(min_length=1)]


# The most batches one optimizer step may accumulate: the gradient of up to this many batches is held and, on a
# preemption mid-group, checkpointed; more is a batch size in disguise (training.batch_size is the knob).
MAX_ACCUMULATE_BATCHES = 1024
# Mixed precision, Lightning's names: "32" (float32, the default), "bf16" (autocast to bfloat16, cpu and cuda),
# "16" (autocast to float16 with a gradient scaler: CUDA only).
_PRECISION_DEVICES = {"32": {"cpu", "cuda", "mps"}, "bf16": {"cpu", "cuda"}, "16": {"cuda"}}


def precision_problem(precision: str, device: str) -> str | None:
    """Why ``precision`` can't train on ``device`` (a device type: cpu, cuda, mps), or None if it can.

    The one rule: the spec's check (a fixed device) and the engine's (the device "auto" picked) both ask it.
    """
    if device in _PRECISION_DEVICES[precision]:
        return None
    if precision == "16":
        return (f"'16' (float16 with a gradient scaler) needs CUDA, and this run's device is {device!r}; "
                "use 'bf16' or set resources.device to 'cuda'")
    return f"{precision!r} is not supported on {device!r}; use '32'"


class Training(Strict):
    epochs: PositiveInt = 10
    batch_size: Annotated[int, Field(ge=1, le=1_000_000)] = 32
    shuffle: bool = True
    max_runtime_seconds: PositiveInt | None = None
    # Clip the gradient's global L2 norm to this before each optimizer step (torch.nn.utils.clip_grad_norm_).
    gradient_clip_norm: PositiveFloat | None = None
    # Step the optimizer once every this many batches (and at the end of each epoch), on their summed gradient.
    accumulate_batches: Annotated[int, Field(ge=1, le=MAX_ACCUMULATE_BATCHES)] = 1
    precision: Literal["32", "bf16", "16"] = "32"
    # torch.compile the forward pass and the loss (the backward is compiled with them); the model card
    # records the seconds spent compiling (compile_seconds).
    compile: bool = False


class EarlyStopping(Strict):
    """Keras' EarlyStopping: the same arguments and the same rules."""

    monitor: Text() = "val_loss"
    mode: Literal["min", "max", "auto"] = "auto"
    min_delta: NonNegFloat = 0.0
    patience: NonNegInt = 0
    baseline: Float | None = None
    restore_best_weights: bool = False
    start_from_epoch: NonNegInt = 0


class Checkpoint(Strict):
    every_n_epochs: PositiveInt = 1
    keep_last: Annotated[int, Field(ge=1, le=100)] = 2


class Resources(Strict):
    """Where to train. ``gpus`` > 1 (cuda) or ``processes`` > 1 (cpu) trains data-parallel on one machine."""

    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    gpus: Annotated[int, Field(ge=1, le=64)] | None = None
    processes: Annotated[int, Field(ge=1, le=64)] | None = None

    @model_validator(mode="after")
    def _devices_fit(self) -> Resources:
        if self.gpus is not None and self.device in ("cpu", "mps"):
            raise SpecProblem("gpus", f"GPUs need device 'cuda' (or 'auto'), not {self.device!r}")
        if self.processes is not None and self.device != "cpu":
            raise SpecProblem("processes", "processes is for device 'cpu'; use gpus for cuda")
        return self

    @property
    def world_size(self) -> int:
        """How many processes train the job together."""
        return self.gpus or self.processes or 1


class JobSpec(Strict):
    """A whole training run."""

    name: Text(min_length=1) = "job"
    seed: Annotated[int, Field(ge=0, le=2**63 - 1)] = 0
    # Order among the user's own queued jobs (fair share decides between users); with preemption on, a
    # high job may take a running lower one's slot (models.dispatch).
    priority: Literal["low", "normal", "high"] = "normal"
    # Labels to find the job by (GET /jobs?tag=…&experiment=…); the engine ignores them.
    tags: Annotated[list[Tag], Field(max_length=MAX_TAGS)] = Field(default_factory=list)
    experiment: Label | None = None
    task: Literal["regression", "binary", "multiclass"]
    data: Data
    model: ModelSpec
    loss: Loss | None = None
    optimizer: Optimizer = Field(default_factory=lambda: Adam(type="Adam"))
    scheduler: Scheduler | None = None
    training: Training = Field(default_factory=Training)
    early_stopping: EarlyStopping | None = None
    checkpoint: Checkpoint = Field(default_factory=Checkpoint)
    resources: Resources = Field(default_factory=Resources)

    @model_validator(mode="after")
    def _precision_fits_device(self) -> JobSpec:
        # A fixed device is checked here; "auto" is checked by the engine once it picked one.
        device = "cuda" if self.resources.gpus else self.resources.device
        problem = None if device == "auto" else precision_problem(self.training.precision, device)
        if problem:
            raise SpecProblem("training.precision", problem)
        return self

    @field_validator("tags")
    @classmethod
    def _distinct_tags(cls, tags: list[str]) -> list[str]:
        first: dict[str, int] = {}
        for index, tag in enumerate(tags):
            if tag in first:
                raise SpecProblem(f"[{index}]", f"{quoted(tag)} is tags[{first[tag]}] already; a tag is given once")
            first[tag] = index
        return tags

    @property
    def loss_type(self) -> str:
        """The loss to train with: the spec's, or the task's default."""
        if self.loss is not None:
            return self.loss.type
        return {"regression": "MSELoss", "binary": "BCEWithLogitsLoss", "multiclass": "CrossEntropyLoss"}[
            self.task
        ]

    @property
    def has_validation(self) -> bool:
        return self.data.validation_split > 0

    def metric_names(self) -> list[str]:
        """Every per-epoch metric this job records (what ``monitor`` may name)."""
        base = ["loss", "accuracy"] if self.task != "regression" else ["loss", "mae", "r2"]
        names = base + ([f"val_{name}" for name in base] if self.has_validation else [])
        return names + ["lr", "epoch_seconds", "samples_per_second"]


# Which way is better for each metric a job records, for mode "auto" (early stopping, a sweep's default mode).
HIGHER_IS_BETTER = {"accuracy", "r2", "samples_per_second"}


def higher_is_better(monitor: str, mode: str) -> bool:
    """Resolve mode 'auto' the way Keras does: from the metric's name."""
    if mode != "auto":
        return mode == "max"
    return monitor.removeprefix("val_") in HIGHER_IS_BETTER


# --- problems, limits, and pydantic's errors as problems ----------------------------------------


@dataclass(frozen=True)
class Limits:
    """Size limits a deployment puts on one job."""

    max_parameters: int = 50_000_000
    max_layers: int = 100
    max_epochs: int = 10_000
    max_samples: int = 1_000_000
    max_runtime_seconds: int = 24 * 3600  # of training, across attempts (the trainer enforces it)
    max_generator_setup: int = 2_000_000  # values a scikit-learn generator draws before its first sample
    max_job_memory: int = 4 << 30  # bytes a job's estimated peak may reach (models.memory)


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a spec, at a field path such as ``model.layers[2].out_features``."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class SpecError(ValueError):
    """A spec that can't be run; ``problems`` lists every reason by field path."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("invalid spec:\n" + "\n".join(f"  {problem}" for problem in problems))


class SpecProblem(ValueError):
    """Raised inside a validator to report a problem at a sub-path of the model being validated."""

    def __init__(self, subpath: str, message: str):
        self.subpath = subpath
        super().__init__(message)


def unknown_name_message(name: Any, what: str, allowed) -> str:
    """``'Linaer' is not a layer; did you mean 'Linear'?`` (or the allowed names when nothing is close)."""
    allowed = sorted(allowed)
    close = difflib.get_close_matches(str(name), allowed, n=3, cutoff=0.6)
    if close:
        suggestion = "did you mean " + " or ".join(repr(c) for c in close) + "?"
    else:
        suggestion = "allowed: " + ", ".join(allowed) if allowed else "there are none"
    article = "an" if what[0] in "aeiou" else "a"
    return f"{quoted(name)} is not {article} {what}; {suggestion}"


def _type_names(annotated) -> dict[str, type[Strict]]:
    """``{"Linear": Linear, ...}`` for one of the discriminated unions above."""
    members = typing.get_args(typing.get_args(annotated)[0])
    return {typing.get_args(m.model_fields["type"].annotation)[0]: m for m in members}


LAYER_TYPES = _type_names(Layer)
LOSS_TYPES = _type_names(Loss)
OPTIMIZER_TYPES = _type_names(Optimizer)
SCHEDULER_TYPES = _type_names(Scheduler)
DATA_SOURCES = {"sklearn", "dataset", "file"}
INFERRED_FIELDS = {"in_features", "in_channels", "num_features", "normalized_shape"}
_TAGS = set(LAYER_TYPES) | set(LOSS_TYPES) | set(OPTIMIZER_TYPES) | set(SCHEDULER_TYPES) | DATA_SOURCES


def format_path(loc: tuple) -> str:
    """``('model', 'layers', 2, 'Linear', 'out_features')`` -> ``model.layers[2].out_features``."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part in _TAGS or _is_member_tag(part):
            continue  # pydantic's name for the union member, not a field the user wrote
        else:
            path += f".{part}" if path else str(part)
    return path


# How pydantic names the members of a union such as ``int | list[int] | Literal["same"]`` in an error's loc.
_MEMBER_TAG_PREFIXES = ("function-", "union[", "list[", "nullable[", "constrained-", "literal[")
_MEMBER_TAG_NAMES = {"int", "float", "str", "bool", "none"}


def _is_member_tag(part: str) -> bool:
    return part in _MEMBER_TAG_NAMES or part.startswith(_MEMBER_TAG_PREFIXES)


def problems_from_errors(errors: list[dict]) -> list[Problem]:
    """pydantic's validation errors as Problems. A value that fits no member of a union gets one problem:
    the deepest one when a member got further into it (``kernel_size[1]`` of ``[3, "a"]``), otherwise one
    message listing what each member wanted (``a valid integer or a valid list or 'same' or 'valid'``)."""
    found = [(problem_from_error(e), any(isinstance(p, str) and _is_member_tag(p) for p in e["loc"]))
             for e in errors]
    paths = [problem.path for problem, _ in found]
    problems: list[Problem] = []
    union_at: dict[str, int] = {}  # a value's path -> the index of its union's one problem
    for problem, member in found:
        if member and any(_inside(other, problem.path) for other in paths):
            continue  # another member of the union says more about the same value
        if member and problem.path in union_at:
            earlier = problems[union_at[problem.path]]
            wanted = problem.message.removeprefix("Input should be ")
            problems[union_at[problem.path]] = Problem(problem.path, f"{earlier.message} or {wanted}")
            continue
        if member:
            union_at[problem.path] = len(problems)
        problems.append(problem)
    return problems


def _inside(path: str, parent: str) -> bool:
    return len(path) > len(parent) and path.startswith(parent) and path[len(parent)] in ".["


def _what_for(path: str) -> tuple[str, dict] | None:
    """Which allow-list a discriminator at ``path`` belongs to."""
    if path.startswith("model.layers["):
        return "layer", LAYER_TYPES
    for field, what, names in (("loss", "loss", LOSS_TYPES), ("optimizer", "optimizer", OPTIMIZER_TYPES),
                               ("scheduler", "scheduler", SCHEDULER_TYPES)):
        if path == field:
            return what, names
    if path == "data":
        return "data source", DATA_SOURCES
    return None


def _field_names_beside(loc: tuple) -> set[str]:
    """The fields of the spec's model(s) where an error's ``loc`` ends (the unknown field itself last), followed
    from JobSpec through fields, list items and pydantic's tags of union members (``Linear``, ``sklearn``)."""
    models: set[type[BaseModel]] = {JobSpec}
    for part in loc[:-1]:
        if isinstance(part, int):
            continue  # a list's items: their models were gathered with the list's field
        tagged = {model for model in models if any(typing.get_origin(field.annotation) is Literal and part in
                                                   typing.get_args(field.annotation)
                                                   for field in model.model_fields.values())}
        if tagged:  # a union member's tag: the one member
            models = tagged
            continue
        fields = [model.model_fields[part] for model in models if part in model.model_fields]
        models = set().union(*(_models_in(field.annotation) for field in fields))
    return {name for model in models for name in model.model_fields}


def _models_in(annotation: Any) -> set[type[BaseModel]]:
    """The pydantic models an annotation may hold (through Optional, unions, lists and Annotated)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return {annotation}
    return set().union(*(_models_in(argument) for argument in typing.get_args(annotation)))


def problem_from_error(error: dict) -> Problem:
    """One of pydantic's validation errors as a Problem at the field path the user wrote."""
    path = format_path(error["loc"])
    kind = error["type"]
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        tag_field = error.get("ctx", {}).get("discriminator", "'type'").strip("'")
        what, names = _what_for(path) or ("value", {})
        field_path = f"{path}.{tag_field}" if path else tag_field
        if kind == "union_tag_not_found":
            return Problem(field_path, f"missing; one of: {', '.join(sorted(names))}")
        return Problem(field_path, unknown_name_message(error["ctx"]["tag"], what, names))
    if kind == "extra_forbidden":
        if path.rsplit(".", 1)[-1] in INFERRED_FIELDS:
            return Problem(path, "is inferred from the data; remove it")
        close = difflib.get_close_matches(str(error["loc"][-1]), sorted(_field_names_beside(error["loc"])), n=3,
                                          cutoff=0.6)
        return Problem(path, "unknown field" + (f"; did you mean {' or '.join(map(repr, close))}?" if close else ""))
    if kind == "value_error" and isinstance(error.get("ctx", {}).get("error"), SpecProblem):
        problem = error["ctx"]["error"]
        joint = "" if not path or problem.subpath.startswith("[") else "."
        return Problem(f"{path}{joint}{problem.subpath}", str(problem))
    if kind == "missing":  # said as this module's own messages say it (pydantic's: "Field required")
        return Problem(path, "missing")
    message = error["msg"].removeprefix("Value error, ")
    return Problem(path, message)
