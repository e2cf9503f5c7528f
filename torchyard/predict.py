"""``torchyard predict``: a trained model's predictions for the rows of a CSV file.

The model is a job of the service (its bundle is downloaded to a temporary folder and read from there),
a model folder (``torchyard train --out``, ``torchyard download``) or a bundle's .tar.gz. The CSV holds one
sample a line, numbers as NumPy reads them; a first line that isn't all numbers is a header, and then the
target column (named in the model card's spec), if present, is left out, and the columns the model was
trained on are picked by name when they are all there. Without a header, a line is the features in order.
"""

from __future__ import annotations

import csv
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from torchyard.loading import TrainedModel, load_model


class PredictError(ValueError):
    """An input file or model that can't be predicted with, and why."""


def load_for_prediction(source: str, client: Callable) -> TrainedModel:
    """The model that ``source`` names: a folder or bundle on disk, else a job id whose bundle ``client()``
    (a torchyard.client.Client) downloads."""
    path = Path(source)
    if path.exists():
        return load_model(path)
    with tempfile.TemporaryDirectory(prefix="torchyard-predict-") as folder:
        client().download_bundle(source, folder)
        return load_model(folder)  # read into memory: the folder can go


def read_rows(path: Path, model: TrainedModel) -> np.ndarray:
    """The features of each line of the CSV file at ``path``, as float64 rows (see the module's doc)."""
    with open(path, encoding="utf-8-sig") as handle:
        lines = [line for line in handle.read().splitlines() if line.strip()]
    if not lines:
        raise PredictError(f"{path} holds no rows")
    first = [cell.strip() for cell in next(csv.reader([lines[0]]))]
    columns, numeric = None, [_is_number(cell) for cell in first]
    if any(numeric) and not all(numeric):
        raise PredictError(f"{path}: line 1 mixes numbers and text; a header names every column, and without "
                           "one each line holds only the features (leave out the label)")
    if not any(numeric):  # a header
        columns, lines = _feature_columns(first, model), lines[1:]
        for number, row in enumerate(csv.reader(lines), start=2):
            if len(row) != len(first):
                raise PredictError(f"{path}: line {number} has {len(row)} values but the header names {len(first)}")
        if not lines:
            raise PredictError(f"{path} has a header but no rows")
    try:
        return np.loadtxt(lines, delimiter=",", quotechar='"', comments=None, dtype=np.float64, ndmin=2,
                          usecols=columns)
    except ValueError as exc:
        raise PredictError(f"{path}: {exc} (rows count from the first line after any header)") from None


def _feature_columns(header: list[str], model: TrainedModel) -> list[int]:
    """Which columns of a header are the model's features: by the card's names when all are there, else
    every column but the target's, in order."""
    names = model.feature_names
    if names and set(names) <= set(header):
        return [header.index(name) for name in names]
    target = model.spec.data.target
    return [i for i, name in enumerate(header) if name != target]


def _is_number(cell: str) -> bool:
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
    return the lines to print (one a row)."""
    rows = list(prediction_lines(model, read_rows(input_path, model), proba))
    if output_path is None:
        return [",".join(row) for row in rows]
    with open(output_path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header(model, proba, len(rows[0]) if rows else 1))
        writer.writerows(rows)
    return []


def _cell(value) -> str:
    if isinstance(value, (float, np.floating)):
        return repr(float(value))  # every digit: a float read back is the float predicted
    return str(value)
