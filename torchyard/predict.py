"""``torchyard predict``: a trained model's predictions for the rows of a CSV file.

The model is a job of the service (its bundle is downloaded to a temporary folder and read from there),
a model folder (``torchyard train --out``, ``torchyard download``) or a bundle's .tar.gz. The CSV holds one
sample a line, numbers as NumPy reads them; a first line that isn't all numbers is a header, and then the
target column (named in the model card's spec), if present, is left out, and the columns the model was
trained on are picked by name when they are all there. Without a header, a line is the features in order.
"""

from __future__ import annotations

import csv
import re
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from models.text import quoted
from torchyard.loading import TrainedModel, load_model

# The shape of the service's job ids (models.tables.new_id): anything else is taken for a path.
JOB_ID = re.compile(r"job_[0-9A-Za-z_-]+")


class PredictError(ValueError):
    """An input file or model that can't be predicted with, and why."""


def load_for_prediction(source: str, client: Callable) -> TrainedModel:
    """The model that ``source`` names: a folder or bundle on disk, else a job id whose bundle ``client()``
    (a torchyard.client.Client) downloads."""
    path = Path(source)
    if path.exists():
        return load_model(path)
    if not JOB_ID.fullmatch(source):  # a path, surely: not sent to the service as a job id
        raise PredictError(f"no model folder or bundle file at {source} (and it isn't a job id, job_…)")
    with tempfile.TemporaryDirectory(prefix="torchyard-predict-") as folder:
        client().download_bundle(source, folder)
        return load_model(folder)  # read into memory: the folder can go


def read_rows(path: Path, model: TrainedModel) -> np.ndarray:
    """The features of each line of the CSV file at ``path``, as float64 rows (see the module's doc)."""
    try:
        with open(path, encoding="utf-8-sig") as handle:
            text = handle.read()
    except UnicodeDecodeError as exc:
        raise PredictError(f"{path} isn't UTF-8 text (byte {exc.start} can't be read); save it as UTF-8 CSV") from None
    except OSError as exc:
        raise PredictError(f"can't read {path}: {exc.strerror or exc}") from None
    lines = [(number, line) for number, line in enumerate(text.splitlines(), start=1) if line.strip()]
    if not lines:
        raise PredictError(f"{path} holds no rows")
    first = [cell.strip() for cell in next(csv.reader([lines[0][1]]))]
    names, columns, numeric = None, None, [_is_number(cell) for cell in first]
    if any(numeric) and not all(numeric):
        raise PredictError(f"{path}: line {lines[0][0]} mixes numbers and text; a header names every column, and "
                           "without one each line holds only the features (leave out the label)")
    if not any(numeric):  # a header
        names, columns, lines = first, _feature_columns(first, model), lines[1:]
        for number, row in zip((n for n, _ in lines), csv.reader(line for _, line in lines), strict=True):
            if len(row) != len(first):
                raise PredictError(f"{path}: line {number} has {len(row)} values but the header names {len(first)}")
        if not lines:
            raise PredictError(f"{path} has a header but no rows")
    try:
        rows = np.loadtxt([line for _, line in lines], delimiter=",", quotechar='"', comments=None,
                          dtype=np.float64, ndmin=2, usecols=columns)
    except ValueError as exc:
        raise PredictError(f"{path}: {_first_bad_cell(lines, columns, names) or exc}") from None
    bad = np.argwhere(~np.isfinite(rows))
    if len(bad):
        row, column = bad[0]
        raise PredictError(f"{path}: line {lines[row][0]}, {_column(columns, names, column)}: "
                           f"{rows[row, column]} is not a finite number")
    return rows


def _first_bad_cell(lines: list[tuple[int, str]], columns: list[int] | None, names: list[str] | None) -> str | None:
    """Where the first cell that isn't a number is, as the upload reader says it (None if none is found)."""
    for number, line in lines:
        cells = next(csv.reader([line]), [])
        for index in columns if columns is not None else range(len(cells)):
            cell = cells[index].strip() if index < len(cells) else ""
            if not _is_number(cell):
                place = _column(None, names, index)
                return f"line {number}, {place}: {quoted(cell, 40)} is not a number"
    return None


def _column(columns: list[int] | None, names: list[str] | None, index: int) -> str:
    """A column in words: its header name, else its number counting from 1."""
    index = columns[index] if columns is not None else index
    return f"column {names[index]!r}" if names else f"column {index + 1}"


def _feature_columns(header: list[str], model: TrainedModel) -> list[int]:
    """Which columns of a header are the model's features: by the card's names when all are there, else
    every column but the target's (CSV and uploaded data name one; scikit-learn data have none), in order."""
    names = model.feature_names
    if names and set(names) <= set(header):
        return [header.index(name) for name in names]
    target = getattr(model.spec.data, "target", None)
    columns = [i for i, name in enumerate(header) if name != target]
    if len(columns) != model.n_features:
        if names:
            missing = ", ".join(repr(name) for name in names if name not in header)
            raise PredictError(f"the header lacks {missing}: the model takes {model.n_features} features, "
                               f"{', '.join(map(repr, names))}")
        raise PredictError(f"the header names {len(columns)} columns besides any label; the model takes "
                           f"{model.n_features} features and has no column names to pick them by (its data "
                           "named none): give the features only, in training order")
    return columns


def _is_number(cell: str) -> bool:
    if "_" in cell:
        return False  # Python's float reads 1_000; NumPy, as the training reader, doesn't
    try:
        float(cell)
    except ValueError:
        return False
    return True


def prediction_lines(model: TrainedModel, rows: np.ndarray, proba: bool) -> Iterator[list[str]]:
    """Each row's prediction as CSV cells: its label (or values), or with ``proba`` its class probabilities."""
    try:
        values = model.predict_proba(rows) if proba else model.predict(rows)
    except ValueError as exc:
        raise PredictError(str(exc)) from None
    for value in values:
        yield [_cell(v) for v in np.atleast_1d(value)]


def header(model: TrainedModel, proba: bool, width: int) -> list[str]:
    """An output CSV's header: ``prediction`` (one column a target), or a column per class for ``proba``."""
    if proba:
        return [str(label) for label in model.classes]
    return ["prediction"] if width == 1 else [f"prediction_{i}" for i in range(width)]


def predict_csv(model: TrainedModel, input_path: Path, output_path: Path | None, proba: bool) -> list[str]:
    """Predict every row of ``input_path``; write a CSV to ``output_path`` and return nothing to print, or
    return the lines to print (one a row, after a header of the class labels for ``proba``)."""
    rows = list(prediction_lines(model, read_rows(input_path, model), proba))
    if output_path is None:
        top = [",".join(header(model, proba, 0))] if proba else []  # the columns' classes, else unknown
        return top + [",".join(row) for row in rows]
    try:
        with open(output_path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(header(model, proba, len(rows[0]) if rows else 1))
            writer.writerows(rows)
    except OSError as exc:
        raise PredictError(f"can't write {output_path}: {exc.strerror or exc}") from None
    return []


def _cell(value) -> str:
    if isinstance(value, (float, np.floating)):
        return repr(float(value))  # every digit: a float read back is the float predicted
    return str(value)
