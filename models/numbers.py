"""The one rule for numbers a client sends that end up in a tensor: finite, and within float32's range.

The engine trains in float32. A value past float32's largest (about 3.4e38) is accepted by JSON and by
float64 arithmetic, then breaks at the worker: torch refuses a learning rate of 1e308 ("value cannot be
converted to type float without overflow"), and a CSV value of 1e300 turns into inf and every loss into
NaN. So spec numbers, scikit-learn arguments and uploaded values are held to this rule before anything is
stored, and data a generator made is held to it before training. Imports nothing of the project.
"""

from __future__ import annotations

import math

import numpy as np

FLOAT32_MAX = 3.4028234663852886e38  # np.finfo(np.float32).max
IN_RANGE = f"within float32's range (±{FLOAT32_MAX:.4g}), as the engine trains in float32"


def number_problem(value: float) -> str | None:
    """What is wrong with a number that will be trained with (not finite, beyond float32), or None."""
    if not math.isfinite(value):
        return f"must be a finite number, not {value}"
    if abs(value) > FLOAT32_MAX:
        return f"must be {IN_RANGE}, not {value:.4g}"
    return None


def out_of_range(values: np.ndarray) -> np.ndarray:
    """Where an array breaks the rule: NaN, infinity or a magnitude beyond float32 (a boolean mask)."""
    if values.dtype.kind != "f":
        return np.zeros(values.shape, dtype=bool)  # integers (at most 2^64) are within float32's range
    return ~(np.abs(values) <= FLOAT32_MAX)  # NaN compares false, so it is out of range too


def values_problem(values: np.ndarray) -> str | None:
    """What is wrong with an array of values to train with (``holds NaN; values must be …``), or None."""
    bad = out_of_range(values)
    if not bad.any():
        return None
    value = values[np.unravel_index(np.argmax(bad), bad.shape)]
    return f"holds {'NaN' if np.isnan(value) else f'{value:.4g}'}; values must be finite numbers {IN_RANGE}"
