"""The import directions of DESIGN.md hold: the engine is a library, the spec needs neither torch nor SQL."""

from __future__ import annotations

import subprocess
import sys

import pytest


def imported_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(sorted(sys.modules)))"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return {name.split(".")[0] for name in run.stdout.split()}


@pytest.mark.parametrize("statement, forbidden", [
    ("import worker.engine, worker.engine.run, worker.engine.distributed", {"flask", "celery", "sqlalchemy", "api"}),
    ("import models.spec, models.shapes", {"torch", "sqlalchemy", "flask", "celery"}),
    ("import worker.celery_app", {"torch"}),
    ("import torchyard, torchyard.client", {"torch", "flask", "sqlalchemy", "celery"}),
])
def test_modules_import_only_what_their_layer_allows(statement, forbidden):
    assert not imported_after(statement) & forbidden
