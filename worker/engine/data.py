"""Datasets: from scikit-learn or a CSV/NPZ file to train/validation tensors on the device.

Files are read by models.tabular, the reader the API checks uploads with, so a file it accepted trains
here with the same columns; nothing is unpickled (NPZ members are read as numeric .npy data, CSV as numbers
only), so an uploaded file can never run code.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sklearn.datasets  # imported up front: a worker loads it once, before its pool forks
import torch

from models.catalog import SKLEARN_DATASETS, DataShape
from models.numbers import FLOAT32_MAX
from models.shapes import DataReport, describe_data
from models.spec import JobSpec, Problem, SpecError
from models.tabular import TableError, class_count, read_labelled_csv, read_npz_arrays


@dataclass
class Arrays:
    """Features and targets as loaded, before splitting."""

    X: np.ndarray
    y: np.ndarray
    feature_names: list[str] | None = None
    classes: list[str] | None = None  # text labels, sorted: y holds their codes 0..K-1


@dataclass
class TensorData:
    """Train and validation tensors on the device, with what the network needs to know of them."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor | None
    y_val: torch.Tensor | None
    report: DataReport
    mean: torch.Tensor | None = None  # standardization fitted on the training part
    std: torch.Tensor | None = None
    classes: list | None = None  # what each class index stands for (classification): labels as in the data
    feature_names: list[str] | None = None

    @property
    def n_train(self) -> int:
        return len(self.x_train)

    @property
    def n_val(self) -> int:
        return 0 if self.x_val is None else len(self.x_val)


def load_sklearn(name: str, params: dict) -> Arrays:
    """Call an allow-listed scikit-learn generator or loader (names were checked by the spec)."""
    function = getattr(sklearn.datasets, name)
    if name.startswith("load_"):
        bunch = function(**params)
        return Arrays(np.asarray(bunch.data), np.asarray(bunch.target), list(getattr(bunch, "feature_names", [])))
    X, y = (np.asarray(array) for array in function(**params)[:2])
    # A generator squeezes its targets: one sample of make_regression gives a scalar. One row a sample.
    return Arrays(X, y.reshape(len(X)) if y.size == len(X) else y.reshape(len(X), -1))


def seeded_params(spec: JobSpec) -> dict:
    """A generator's arguments with ``random_state`` taken from the job's seed when the spec leaves it out
    (or null): scikit-learn would draw from NumPy's global state, and each attempt of a resumed job would
    train on other data."""
    data = spec.data
    if "random_state" not in SKLEARN_DATASETS[data.name].params or data.params.get("random_state") is not None:
        return data.params
    return {**data.params, "random_state": spec.seed % 2**32}  # scikit-learn takes seeds below 2^32


def read_csv(path: Path, target: str | None) -> Arrays:
    """A CSV with a header row, read as the API checked it (models.tabular); ``target`` names the label
    column (default: the last one), which may hold class labels as text."""
    try:
        table = read_labelled_csv(path, target)
    except TableError as exc:
        raise SpecError([Problem("data.target" if exc.path == "target" else "data", f"{path.name}: {exc}")]) from None
    return Arrays(table.X, table.y, table.features, table.classes)


def read_npz(path: Path) -> Arrays:
    """An NPZ file with exactly the arrays ``X`` and ``y``, read from the members checked (models.tabular);
    object arrays are refused (they would need pickle)."""
    try:
        X, y = read_npz_arrays(path)
    except TableError as exc:
        raise SpecError([Problem("data", f"{path.name}: {exc}")]) from None
    return Arrays(X, y)


def load_arrays(spec: JobSpec, data_path: Path | None = None) -> Arrays:
    """The spec's data as NumPy arrays; ``data_path`` is where an uploaded or local file lies."""
    data = spec.data
    if data.source == "sklearn":
        return load_sklearn(data.name, seeded_params(spec))
    path = Path(data_path or data.path)
    if not path.is_file():
        raise SpecError([Problem("data.path", f"no such file: {path}")])
    if path.suffix.lower() == ".npz":
        return read_npz(path)
    if path.suffix.lower() == ".csv":
        return read_csv(path, data.target)
    raise SpecError([Problem("data.path", f"{path.name}: expected a .csv or .npz file")])


def shape_of(arrays: Arrays, task: str) -> DataShape:
    """The DataShape of loaded arrays (classes are counted for classification tasks)."""
    n_features = int(np.prod(arrays.X.shape[1:])) if arrays.X.ndim > 1 else 1
    n_targets = arrays.y.shape[1] if arrays.y.ndim > 1 else 1
    n_classes = None
    if arrays.classes is not None:
        if task == "regression":
            raise SpecError([Problem("data.target", f"the target holds text (class labels such as "
                                                    f"{arrays.classes[:3]}); task 'regression' needs numbers: "
                                                    "use 'binary' or 'multiclass'")])
        n_classes = len(arrays.classes)  # at most MAX_CLASSES: models.tabular counted them
    elif task != "regression":
        labels = np.unique(arrays.y)
        n_classes = class_count(labels.min(), labels.max(), bool(np.all(labels == np.round(labels))))
        if n_classes is None:
            raise SpecError([Problem("task", f"{task!r} needs integer class labels 0..k-1 in the target, "
                                             f"found values such as {labels[:5].tolist()}")])
    return DataShape(len(arrays.X), n_features, n_targets, n_classes)


def class_labels(arrays: Arrays, shape: DataShape) -> list | None:
    """What each class index stands for, as the model card records it: the text labels, or the numbers
    0..k-1 (None for regression)."""
    if shape.n_classes is None:
        return None
    return arrays.classes if arrays.classes is not None else list(range(shape.n_classes))


def split_indices(n: int, validation_split: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded shuffle split: (train indices, validation indices)."""
    order = np.random.default_rng(seed).permutation(n)
    n_val = int(round(n * validation_split))
    if validation_split > 0 and not 1 <= n_val < n:
        raise SpecError([Problem("data.validation_split", f"{validation_split} of {n} samples leaves an empty "
                                                          "training or validation part")])
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def prepare(spec: JobSpec, arrays: Arrays, device: torch.device) -> TensorData:
    """Split, shape and (optionally) standardize the data, then move it to the device once."""
    shape = shape_of(arrays, spec.task)
    if spec.data.source == "sklearn" and shape.n_classes is not None:
        # A small sample may lack a generator's last class (flip_y relabels at random); the network was
        # checked against the classes the generator makes, so those are the classes.
        made = SKLEARN_DATASETS[spec.data.name].shape(spec.data.params).n_classes or shape.n_classes
        shape = dataclasses.replace(shape, n_classes=max(made, shape.n_classes))
    report = describe_data(shape, spec.task, spec.data.image_shape)
    if report.problems:
        raise SpecError(report.problems)
    # Cast by numpy first: it turns an uploaded big-endian array native, which torch refuses to take.
    with np.errstate(over="ignore"):  # an overflow is reported just below, as a problem of the spec
        X = torch.as_tensor(np.asarray(arrays.X, dtype=np.float32)).reshape(len(arrays.X), *report.input_shape)
        y = _targets(arrays.y, spec)
    if not (torch.isfinite(X).all() and torch.isfinite(y).all()):
        # Uploads were held to this at the API; a generator's arguments (noise 1e38) can still make values
        # that overflow float32: say so, rather than train on infinities.
        raise SpecError([Problem("data", "the data holds values beyond float32's range "
                                         f"(±{FLOAT32_MAX:.4g}); the engine trains in float32")])
    train_idx, val_idx = split_indices(len(X), spec.data.validation_split, spec.seed)
    x_train, y_train = X[train_idx], y[train_idx]
    mean = std = None
    if spec.data.standardize:
        mean = x_train.mean(dim=0)
        std = x_train.std(dim=0, unbiased=False).clamp_min(1e-8)  # constant features stay finite
    has_val = len(val_idx) > 0
    return TensorData(
        x_train=x_train.to(device), y_train=y_train.to(device),
        x_val=X[val_idx].to(device) if has_val else None, y_val=y[val_idx].to(device) if has_val else None,
        report=report, mean=mean, std=std, classes=class_labels(arrays, shape),
        feature_names=arrays.feature_names or None,
    )


def _targets(y: np.ndarray, spec: JobSpec) -> torch.Tensor:
    """Targets in the dtype and shape the task's loss expects."""
    if spec.loss_type in ("CrossEntropyLoss", "NLLLoss"):
        return torch.as_tensor(np.asarray(y.reshape(-1), dtype=np.int64))
    target = torch.as_tensor(np.asarray(y, dtype=np.float32))
    return target.reshape(len(y), -1)
