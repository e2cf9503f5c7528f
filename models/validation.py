"""A spec's JSON to a JobSpec that can run, or a SpecError listing every problem by field path.

Beyond the field types (models.spec): the rules across fields, the deployment's limits, and whether the
network fits the data (models.shapes). No torch, no SQLAlchemy: the API validates specs without either.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import ValidationError

from models.catalog import SKLEARN_DATASETS
from models.memory import memory_problems
from models.numbers import FLOAT32_MAX
from models.shapes import fit_problems, sklearn_problems
from models.spec import (
    BINARY_LOSSES,
    MULTICLASS_LOSSES,
    REGRESSION_LOSSES,
    JobSpec,
    Limits,
    Problem,
    SpecError,
    problems_from_errors,
    unknown_name_message,
)


def parse_spec(data: Any, limits: Limits | None = None) -> JobSpec:
    """Validate a spec (a parsed JSON value); raise SpecError listing every problem by field path."""
    if not isinstance(data, dict):
        raise SpecError([Problem("", "a spec is a JSON object")])
    try:
        spec = JobSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(problems_from_errors(exc.errors())) from None
    problems = check_semantics(spec, limits or Limits())
    if problems:
        raise SpecError(problems)
    return spec


LOCAL_FILE_REFUSED = Problem(
    "data.source",
    "'file' reads a path on the machine that trains; the service refuses it: upload the file with "
    "`torchyard upload FILE` (or POST /api/v1/datasets) and use source 'dataset' with its dataset_id; "
    "`torchyard submit` uploads it for you",
)


def parse_service_spec(data: Any, limits: Limits | None = None) -> JobSpec:
    """``parse_spec`` for a job of the service (the API at submit, a worker at claim): a spec that reads a
    local file is refused too, since a path on the worker's disk is never the user's to read."""
    local = isinstance(data, dict) and isinstance(data.get("data"), dict) and data["data"].get("source") == "file"
    refused = [LOCAL_FILE_REFUSED] if local else []
    try:
        spec = parse_spec(data, limits)
    except SpecError as exc:
        raise SpecError(refused + exc.problems) from None
    if refused:
        raise SpecError(refused)
    return spec


def check_semantics(spec: JobSpec, limits: Limits) -> list[Problem]:
    """Rules across fields that the field types alone can't express, and the limits."""
    problems = []
    if len(spec.model.layers) > limits.max_layers:
        problems.append(Problem("model.layers", f"{len(spec.model.layers)} layers exceed the limit of "
                                                f"{limits.max_layers} (max_layers)"))
    if spec.training.epochs > limits.max_epochs:
        problems.append(Problem("training.epochs", f"{spec.training.epochs} exceeds the limit of "
                                                   f"{limits.max_epochs} (max_epochs)"))
    allowed_losses = {"regression": REGRESSION_LOSSES, "binary": BINARY_LOSSES,
                      "multiclass": MULTICLASS_LOSSES}[spec.task]
    if spec.loss is not None and spec.loss.type not in allowed_losses:
        problems.append(Problem("loss.type", f"{spec.loss.type} does not fit task {spec.task!r}; use one of "
                                             f"{', '.join(sorted(allowed_losses))}"))
    metrics = spec.metric_names()
    if spec.early_stopping is not None and spec.early_stopping.monitor not in metrics:
        problems.append(Problem("early_stopping.monitor", unknown_name_message(
            spec.early_stopping.monitor, "metric this job records", metrics)))
    if spec.scheduler is not None and spec.scheduler.type == "ReduceLROnPlateau" \
            and spec.scheduler.monitor not in metrics:
        problems.append(Problem("scheduler.monitor", unknown_name_message(
            spec.scheduler.monitor, "metric this job records", metrics)))
    problems += component_problems(spec)
    if spec.data.source == "sklearn":
        problems += sklearn_data_problems(spec, limits)
    return problems


def sklearn_data_problems(spec: JobSpec, limits: Limits) -> list[Problem]:
    """A scikit-learn dataset's arguments by scikit-learn's rules, its size, then the network and the rows
    against the data it gives."""
    problems = sklearn_problems(spec.data, limits)
    if problems:
        return problems
    shape = SKLEARN_DATASETS[spec.data.name].shape(spec.data.params)
    if shape.n_samples > limits.max_samples:
        problems.append(Problem("data.params.n_samples", f"{shape.n_samples} samples exceed the limit of "
                                                         f"{limits.max_samples} (max_samples)"))
    problems += fit_problems(spec, shape, limits)
    return problems or memory_problems(spec, shape, limits)  # the memory of a job that can run


# Layers after which a model's outputs are still probabilities, as BCELoss needs them.
_PROBABILITIES = {"Sigmoid", "Softmax"}
_KEEP_VALUES = {"Identity", "Flatten"}
# Optimizers without a momentum or beta1 for OneCycleLR to cycle.
_NO_MOMENTUM = {"Adagrad", "Adadelta"}


def component_problems(spec: JobSpec) -> list[Problem]:
    """The loss against the model's last layer, the scheduler against the optimizer (PyTorch's refusals)."""
    problems = []
    last = next((layer.type for layer in reversed(spec.model.layers) if layer.type not in _KEEP_VALUES), None)
    if spec.loss_type == "BCELoss" and last not in _PROBABILITIES:
        problems.append(Problem("loss.type", "BCELoss takes probabilities: end the model with a Sigmoid, or use "
                                             "BCEWithLogitsLoss on its logits"))
    if spec.scheduler is not None and spec.scheduler.type == "OneCycleLR" and spec.optimizer.type in _NO_MOMENTUM:
        problems.append(Problem("scheduler.type", f"OneCycleLR cycles the optimizer's momentum, which "
                                                  f"{spec.optimizer.type} has not; use SGD, Adam, AdamW or RMSprop"))
    return problems + learning_rate_problems(spec)


def one_cycle_problems(scheduler) -> list[Problem]:
    """OneCycleLR starts at max_lr / div_factor and ends at that over final_div_factor: a div_factor below 1
    makes the start the peak, and it too must be a float32."""
    start = scheduler.max_lr / scheduler.div_factor
    for path, value in (("scheduler.div_factor", start), ("scheduler.final_div_factor",
                                                          start / scheduler.final_div_factor)):
        if not value <= FLOAT32_MAX:  # inf too
            return [Problem(path, f"OneCycleLR would run at a learning rate of {value:.4g}, beyond float32's "
                                  f"range ({FLOAT32_MAX:.4g})")]
    return []


def learning_rate_problems(spec: JobSpec) -> list[Problem]:
    """A scheduler whose gamma > 1 grows the learning rate past float32's range before the last epoch:
    torch then refuses the optimizer step. Found with logarithms, so 1e300 ** 10,000 is never computed."""
    scheduler, epochs = spec.scheduler, spec.training.epochs
    if scheduler is not None and scheduler.type == "OneCycleLR":
        return one_cycle_problems(scheduler)
    if scheduler is None or scheduler.type not in ("StepLR", "MultiStepLR", "ExponentialLR"):
        return []
    if scheduler.gamma <= 1:
        return []
    if scheduler.type == "ExponentialLR":
        steps = epochs - 1
    elif scheduler.type == "StepLR":
        steps = (epochs - 1) // scheduler.step_size
    else:
        steps = sum(milestone < epochs for milestone in scheduler.milestones)
    log_peak = math.log10(spec.optimizer.lr) + steps * math.log10(scheduler.gamma)
    if log_peak <= math.log10(FLOAT32_MAX):
        return []
    return [Problem("scheduler.gamma", f"with lr {spec.optimizer.lr:g} and gamma {scheduler.gamma:g} the learning "
                                       f"rate would reach 1e{log_peak:.0f} within {epochs} epochs, beyond float32's "
                                       f"range ({FLOAT32_MAX:.4g})")]
