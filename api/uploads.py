"""Reading an uploaded CSV or NPZ file: what it holds, or an error naming the bad column, row or array.

Only numbers are accepted, and NPZ arrays are read with ``allow_pickle=False`` after their headers say they
are numeric: nothing a user uploads is ever unpickled.
"""

from __future__ import annotations

import csv
import math
import zipfile
from dataclasses import dataclass, field

import numpy as np

# A target with labels past this is a continuous one, not class labels.
MAX_CLASSES = 1000
# An NPZ is compressed; its arrays may unpack to at most this many times the upload limit.
MAX_UNPACK_RATIO = 20


class UploadError(ValueError):
    """A file that can't be a dataset; ``path`` names the form field or part of the file at fault."""

    def __init__(self, path: str, message: str):
        self.path = path
        super().__init__(message)


@dataclass
class DatasetInfo:
    """What a dataset file holds, as recorded in its row."""

    format: str
    n_rows: int
    n_features: int
    n_targets: int = 1
    n_classes: int | None = None
    target: str | None = None
    columns: dict | None = field(default=None)


def count_classes(values: np.ndarray) -> int | None:
    """Classes of a target as the engine counts them (labels 0..k-1 give k, at least 2); None when the
    values are not non-negative integers (a continuous target)."""
    if values.size == 0 or not np.all(np.isfinite(values)) or not np.all(values == np.round(values)):
        return None
    if values.min() < 0:
        return None
    classes = max(int(values.max()) + 1, 2)
    return classes if classes <= MAX_CLASSES else None


def read_csv(path: str, target: str | None, max_rows: int) -> DatasetInfo:
    """A CSV file with a header row and numeric columns; ``target`` names the default target column
    (the last column when not given, as the engine reads it)."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            names, rows = _csv_rows(csv.reader(f), max_rows)
    except UnicodeDecodeError as exc:
        raise UploadError("file", f"not UTF-8 text at byte {exc.start}; a CSV file must be text") from None
    except csv.Error as exc:
        raise UploadError("file", f"not a readable CSV file: {exc}") from None
    target = target or names[-1]
    if target not in names:
        raise UploadError("target", f"no column {target!r}; columns: {', '.join(names)}")
    table = np.asarray(rows, dtype=np.float64)
    classes = {name: count_classes(table[:, i]) for i, name in enumerate(names)}
    return DatasetInfo(
        "csv",
        n_rows=len(rows),
        n_features=len(names) - 1,
        target=target,
        n_classes=classes[target],
        columns={"names": names, "n_classes": classes},
    )


def _csv_rows(reader, max_rows: int) -> tuple[list[str], list[list[float]]]:
    header = next(reader, None)
    if not header:
        raise UploadError("file", "the file is empty; a CSV file starts with a header row of column names")
    names = [name.strip() for name in header]
    if len(names) < 2 or any(not name for name in names) or len(set(names)) != len(names):
        raise UploadError("file", "the header row must name at least two columns, each once and not blank")
    rows = []
    for row in reader:
        if not row:
            continue  # a blank line
        line = reader.line_num
        if len(row) != len(names):
            raise UploadError(
                "file", f"line {line} has {len(row)} values but the header names {len(names)} columns"
            )
        try:
            values = [float(cell) for cell in row]
        except ValueError:
            values = [_number(cell, names[i], line) for i, cell in enumerate(row)]
        if not all(math.isfinite(v) for v in values):
            column = names[next(i for i, v in enumerate(values) if not math.isfinite(v))]
            raise UploadError("file", f"line {line}, column {column!r}: values must be finite numbers")
        rows.append(values)
        if len(rows) > max_rows:
            raise UploadError("file", f"more than {max_rows} rows (max_samples)")
    if not rows:
        raise UploadError("file", "the file has a header but no rows")
    return names, rows


def _number(cell: str, column: str, line: int) -> float:
    try:
        return float(cell)
    except ValueError:
        raise UploadError(
            "file",
            f"line {line}, column {column!r}: {cell!r} is not a number; only numeric columns are allowed",
        ) from None


def read_npz(path: str, max_rows: int, max_bytes: int) -> DatasetInfo:
    """An NPZ file holding numeric arrays ``X`` (samples × features, or × C×H×W) and ``y``."""
    shapes = _npz_headers(path, max_rows, max_bytes)
    if len(shapes["X"]) < 2:
        raise UploadError(
            "X", f"X has shape {list(shapes['X'])}; it needs one row per sample: (samples, features)"
        )
    if len(shapes["y"]) not in (1, 2) or shapes["y"][0] != shapes["X"][0]:
        raise UploadError(
            "y",
            f"y has shape {list(shapes['y'])}; it needs ({shapes['X'][0]},) or "
            f"({shapes['X'][0]}, targets) to match X",
        )
    try:
        with np.load(path, allow_pickle=False) as arrays:
            x, y = arrays["X"], arrays["y"]
    except (ValueError, OSError, zipfile.BadZipFile) as exc:
        raise UploadError("file", f"the arrays can't be read: {exc}") from None
    for name, array in (("X", x), ("y", y)):
        if not np.all(np.isfinite(array)):
            raise UploadError(name, f"{name} holds NaN or infinite values")
    n_targets = 1 if y.ndim == 1 else y.shape[1]
    return DatasetInfo(
        "npz",
        n_rows=x.shape[0],
        n_features=math.prod(x.shape[1:]),
        n_targets=n_targets,
        n_classes=count_classes(y.reshape(-1)) if n_targets == 1 else None,
    )


def _npz_headers(path: str, max_rows: int, max_bytes: int) -> dict[str, tuple[int, ...]]:
    """Shapes of X and y from their .npy headers, checked before any data is unpacked."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError):
        raise UploadError("file", "not an NPZ file (numpy.savez writes one)") from None
    shapes = {}
    with archive:
        members = set(archive.namelist())
        for name in ("X", "y"):
            if f"{name}.npy" not in members:
                held = ", ".join(sorted(m.removesuffix(".npy") for m in members)) or "nothing"
                raise UploadError("file", f"an NPZ dataset needs arrays 'X' and 'y'; this one holds {held}")
            with archive.open(f"{name}.npy") as member:
                shape, dtype = _npy_header(member, name)
            if dtype.hasobject or dtype.kind not in "biuf":
                raise UploadError(
                    name,
                    f"{name} has dtype {dtype}; only numeric arrays are allowed (object "
                    "arrays would need unpickling, which the service never does)",
                )
            if shape and shape[0] > max_rows:
                raise UploadError(name, f"{shape[0]} rows exceed the limit of {max_rows} (max_samples)")
            if math.prod(shape) * dtype.itemsize > max_bytes:
                raise UploadError(name, f"{name} unpacks to more than {max_bytes} bytes")
            shapes[name] = shape
    return shapes


def _npy_header(member, name: str) -> tuple[tuple[int, ...], np.dtype]:
    try:
        version = np.lib.format.read_magic(member)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(member)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(member)
        else:
            raise ValueError(f"unsupported .npy format version {version}")
    except ValueError as exc:
        raise UploadError(name, f"{name}.npy is not a readable numpy array: {exc}") from None
    return tuple(shape), dtype
