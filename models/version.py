"""The installed torchyard's version, as model cards and the API's index report it."""

from __future__ import annotations

import functools
from importlib.metadata import PackageNotFoundError, version


@functools.cache
def torchyard_version() -> str:
    """The version of the installed torchyard package ("unknown" when run from a tree that isn't installed)."""
    try:
        return version("torchyard")
    except PackageNotFoundError:
        return "unknown"
