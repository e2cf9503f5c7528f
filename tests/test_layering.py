"""The import directions of DESIGN.md hold: the engine is a library, the spec needs neither torch nor SQL."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

# Settings an app can be made with but never connects to: a page that needs no database touches none.
APP_CONFIG = {"database_url": "sqlite://", "artifacts_url": "memory://layering", "broker_url": "redis://127.0.0.1:1/0"}


def imported_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(sorted(sys.modules)))"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return {name.split(".")[0] for name in run.stdout.split()}


@pytest.mark.parametrize("statement, forbidden", [
    ("import worker.engine, worker.engine.distributed, worker.engine.rank", {"flask", "celery", "sqlalchemy", "api"}),
    ("import models.spec, models.shapes, models.validation, models.sweep_spec, models.asha",
     {"torch", "sqlalchemy", "flask", "celery"}),
    ("import worker.celery_app", {"torch"}),
    ("import torchyard, torchyard.client, torchyard.show", {"torch", "flask", "sqlalchemy", "celery"}),
    # The API publishes through models.broker; an app made and asked for a page still needs no worker.
    (f"import api; api.create_app({APP_CONFIG}).test_client().get('/api/v1/openapi.json')", {"torch", "worker"}),
    ("import models.lifecycle, models.services", {"torch", "worker", "api", "flask", "migrations"}),
])
def test_modules_import_only_what_their_layer_allows(statement, forbidden):
    assert not imported_after(statement) & forbidden


# --- import cycles --------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("api", "models", "worker", "torchyard", "migrations")


def project_modules(root: Path, packages) -> dict[str, Path]:
    """Every module of ``packages`` under ``root`` by dotted name (a package by its ``__init__``)."""
    modules = {}
    for package in packages:
        for path in (root / package).rglob("*.py"):
            parts = path.relative_to(root).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imported_modules(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules ``module`` imports, anywhere in it (inside functions too), relative ones resolved.

    ``import a.b.c`` runs a/__init__ and a/b/__init__ too, but only a.b.c counts: were parents counted, any
    package whose __init__ re-exports a submodule would be a cycle by construction. An __init__ importing its
    own submodules does count, so a submodule importing a name back from its package's __init__ (rather than
    from the module that defines it) shows up as the cycle it is while the package is being imported.
    """
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # ``from a import b`` imports the module a.b if there is one, else the name b of module a.
            found |= {f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names}
    return (found & known.keys()) - {module}


def import_graph(root: Path = ROOT, packages=PACKAGES) -> dict[str, set[str]]:
    """Which project modules each project module imports."""
    modules = project_modules(root, packages)
    return {module: imported_modules(module, path, modules) for module, path in modules.items()}


def shortest_cycle_through(graph: dict[str, set[str]], start: str) -> list[str] | None:
    """A shortest chain of imports from ``start`` back to itself (breadth first), or None."""
    paths, frontier = {start: [start]}, [start]
    while frontier:
        following = []
        for node in frontier:
            for target in sorted(graph[node]):
                if target == start:
                    return paths[node] + [start]
                if target not in paths:
                    paths[target] = paths[node] + [target]
                    following.append(target)
        frontier = following
    return None


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle in the graph, each once (whichever of its modules it is found from)."""
    found = {}
    for module in sorted(graph):
        cycle = shortest_cycle_through(graph, module)
        if cycle is not None:
            found.setdefault(frozenset(cycle), cycle)
    return list(found.values())


def test_no_import_cycles():
    cycles = import_cycles(import_graph())
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(cycle) for cycle in cycles)


def test_code_outside_the_engine_imports_only_its_public_face():
    behind = [f"{module} imports {target}" for module, targets in sorted(import_graph().items())
              if not module.startswith("worker.engine") for target in sorted(targets)
              if target.startswith("worker.engine.")]
    assert not behind, "use `from worker.engine import ...`:\n" + "\n".join(behind)


def test_the_cycle_check_sees_imports_inside_functions_and_relative_ones(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg/__init__.py").write_text("from pkg.c import C\n")
    (tmp_path / "pkg/a.py").write_text("from . import b\n")
    (tmp_path / "pkg/b.py").write_text("def late():\n    from .a import x\n")
    (tmp_path / "pkg/c.py").write_text("import os\n\nC = 1\n")
    (tmp_path / "pkg/d.py").write_text("from pkg import C\n")  # from the package, not a cycle: pkg imports c

    assert import_cycles(import_graph(tmp_path, ["pkg"])) == [["pkg.a", "pkg.b", "pkg.a"]]
