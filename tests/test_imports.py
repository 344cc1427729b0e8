"""The package's shape: its imports point one way (no circle), and its modules stay a readable size.

The graph is read from the source with `ast`, not from `sys.modules`: an import inside a function
(the lazy imports that keep commands fast) counts as much as one at the top, since it closes a
circle just the same the moment it runs; so do imports under `if TYPE_CHECKING:`, which say how
the modules depend on each other even where they do not run.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "hpsearch"
MAX_LINES = 450  # past this a module is split by concept (STYLE.md), like Optuna's packages
KNOWN_LARGE: set[str] = set()  # modules allowed over MAX_LINES: none since data.py was split from sources.py


def module_names() -> dict[str, Path]:
    """Return {dotted module name: file} of every module in the package (a package is its __init__)."""
    names = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def imports_of(name: str, path: Path, modules: set[str]) -> set[str]:
    """Return the package modules that ``name`` imports anywhere in its source."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's own package, up level - 1 more
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                # `from hpsearch import figures` imports the module hpsearch.figures; `from
                # hpsearch.tasks import make_task` imports hpsearch.tasks.
                submodule = f"{base}.{alias.name}"
                found.add(submodule if submodule in modules else base)
    return {target for target in found if target in modules and target != name}


def import_graph() -> dict[str, set[str]]:
    """Return {module: the package modules it imports}."""
    files = module_names()
    return {name: imports_of(name, path, set(files)) for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """Return one import circle as [a, b, ..., a], or None when the graph has none."""
    done: set[str] = set()
    stack: list[str] = []
    on_stack: set[str] = set()

    def visit(node: str) -> list[str] | None:
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target in on_stack:
                return [*stack[stack.index(target):], target]
            if target not in done and (cycle := visit(target)):
                return cycle
        stack.pop()
        on_stack.discard(node)
        done.add(node)
        return None

    for start in sorted(graph):
        if start not in done and (cycle := visit(start)):
            return cycle
    return None


def test_the_reader_sees_every_kind_of_import() -> None:
    # The reader itself: each form of import of a package module becomes an edge, and others do not.
    graph = import_graph()
    assert "hpsearch.errors" in graph["hpsearch.spec.file"]  # at the top of the module
    assert "hpsearch.train" in graph["hpsearch.checks"]  # inside a function
    assert "hpsearch.data" in graph["hpsearch.train"]  # under `if TYPE_CHECKING:`
    assert "hpsearch.figures" in graph["hpsearch.insights"]  # `from hpsearch import figures`
    assert "hpsearch.cli" in graph["hpsearch.__main__"]
    assert graph["hpsearch.errors"] == set()  # the bottom of the package imports nothing of it


@pytest.mark.parametrize(("graph", "expected"), [
    ({"a": {"b"}, "b": {"c"}, "c": set()}, None),
    ({"a": {"b", "c"}, "b": {"c"}, "c": set()}, None),  # two paths to one module: no circle
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
    ({"a": {"b"}, "b": {"c"}, "c": {"b"}}, ["b", "c", "b"]),
])
def test_find_cycle(graph: dict[str, set[str]], expected: list[str] | None) -> None:
    assert find_cycle(graph) == expected


def test_the_package_imports_point_one_way() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


def test_only_tracking_imports_mlflow() -> None:
    importers = set()
    for name, path in module_names().items():
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            if any(n == "mlflow" or n.startswith("mlflow.") for n in names):
                importers.add(name)
    assert importers, "the reader found no import of mlflow at all"
    assert {n for n in importers if n != "hpsearch.tracking" and not n.startswith("hpsearch.tracking.")} == set()


def test_modules_stay_under_the_size_limit() -> None:
    sizes = {name: len(path.read_text().splitlines()) for name, path in module_names().items()}
    over = {name for name, size in sizes.items() if size > MAX_LINES}
    assert over <= KNOWN_LARGE, {name: sizes[name] for name in over - KNOWN_LARGE}


def test_a_worker_starts_without_the_plotting_and_scikit_learn_imports() -> None:
    # Every worker process of a study pays its imports before its first trial (about half a second
    # for matplotlib's figure machinery, 1-2 s for scikit-learn): the figures are drawn at a study's
    # end, and the digits are read from scikit-learn's file (tests/test_data.py).
    code = ("import sys; import hpsearch.cli, hpsearch.workers, hpsearch.worker_setup, hpsearch.study, "
            "hpsearch.progress, hpsearch.objective, hpsearch.pack_loop; "
            "print(sorted(m for m in ('matplotlib.figure', 'matplotlib.pyplot', 'sklearn') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(PACKAGE.parent)}).stdout
    assert out.strip() == "[]"
