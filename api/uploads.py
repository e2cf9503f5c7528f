"""What an uploaded CSV or NPZ file holds, as its dataset row records it, or an error naming the bad part.

The file is read by models.tabular, the reader the engine trains with, so an upload accepted here trains
with the same columns there. It is read in bounded blocks and only statistics are kept (rows, each
column's classes), so checking a file takes a few MB of memory whatever its size. Nothing a user uploads
is ever unpickled.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from models.tabular import (
    MAX_CLASSES,
    ColumnStats,
    LabelSet,
    TableError,
    TextLabels,
    csv_blocks,
    csv_header,
    csv_labelled_blocks,
    npy_blocks,
    npz_members,
    open_csv,
    open_npz,
    some_names,
)
from models.text import quoted

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


def _classes(stats: ColumnStats, column: int) -> int | None:
    classes = stats.classes(column)
    return classes if classes is not None and classes <= MAX_CLASSES else None


def read_csv(path: str, target: str | None, max_rows: int, max_columns: int) -> DatasetInfo:
    """A CSV file with a header row and numeric columns, but for the target column, which may hold class
    labels as text; ``target`` names the default target column (the last column when not given, as the
    engine reads it). ``columns["text"]`` names the column of text labels, if there is one."""
    try:
        with open_csv(path) as handle:
            names = csv_header(handle, max_columns)
            target = target or names[-1]
            if target not in names:
                raise UploadError("target", f"no column {quoted(target)}; columns: {some_names(names)}")
            try:
                stats = ColumnStats(len(names))
                for block in csv_blocks(handle, names, max_rows, label=names.index(target)):
                    stats.add(block)
                classes, text = {name: _classes(stats, i) for i, name in enumerate(names)}, []
            except TextLabels:
                stats, classes = _read_labelled(path, names, target, max_rows)
                text = [target]
    except TableError as exc:
        raise UploadError(exc.path, str(exc)) from None
    return DatasetInfo(
        "csv",
        n_rows=stats.rows,
        n_features=len(names) - 1,
        target=target,
        n_classes=classes[target],
        columns={"names": names, "n_classes": classes, "text": text},
    )


def _read_labelled(path: str, names: list[str], target: str, max_rows: int) -> tuple[ColumnStats, dict]:
    """The file read again, its target as text labels: the feature columns' stats, and each column's classes
    (the target's: its count of distinct labels, at most MAX_CLASSES)."""
    features = [name for name in names if name != target]
    stats, labels = ColumnStats(len(features)), LabelSet(target)
    with open_csv(path) as handle:
        csv_header(handle)
        for block, text in csv_labelled_blocks(handle, names, names.index(target), max_rows):
            stats.add(block)
            labels.add(text)
    classes = {name: _classes(stats, i) for i, name in enumerate(features)}
    return stats, {name: len(labels.labels) if name == target else classes[name] for name in names}


def read_npz(path: str, max_rows: int, max_bytes: int) -> DatasetInfo:
    """An NPZ file holding exactly the numeric arrays ``X`` (samples × features, or × C×H×W) and ``y``."""
    try:
        with open_npz(path) as archive:
            members = npz_members(archive, max_rows, max_bytes)
            for _ in npy_blocks(archive, members["X"]):
                pass  # each block is checked as it is read: X's values are finite
            x_shape, y_shape = members["X"].header.shape, members["y"].header.shape
            n_targets = 1 if len(y_shape) == 1 else y_shape[1]
            stats = ColumnStats(1)
            for block in npy_blocks(archive, members["y"]):
                stats.add(block.reshape(-1, 1))
    except TableError as exc:
        raise UploadError(exc.path, str(exc)) from None
    return DatasetInfo(
        "npz",
        n_rows=x_shape[0],
        n_features=math.prod(x_shape[1:]),
        n_targets=n_targets,
        n_classes=_classes(stats, 0) if n_targets == 1 else None,
    )
