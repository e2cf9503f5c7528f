"""Fewer points for a long curve: the rows a chart needs, picked on the server so a browser never receives
10,000 epochs to draw 1,000 pixels."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")


def evenly(rows: Sequence[T], most: int) -> list[T]:
    """At most ``most`` (at least 2) of ``rows``, evenly spaced, always the first and the last, in order."""
    if len(rows) <= most:
        return list(rows)
    last = len(rows) - 1
    # Index i * last / (most - 1), rounded: strictly increasing (the step is over 1), from 0 to last.
    return [rows[(i * last + (most - 1) // 2) // (most - 1)] for i in range(most)]
