"""Every benchmark module imports (a move or rename that breaks one fails here, not in a long run), and
the benchmarks import each other without a circle."""

import ast
import importlib
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
MODULES = sorted(p.stem for p in BENCHMARKS.glob("*.py") if p.stem != "__init__")


@pytest.mark.parametrize("name", MODULES)
def test_benchmark_module_imports(name):
    module = importlib.import_module(f"benchmarks.{name}")
    assert module.__doc__, f"benchmarks/{name}.py has no docstring saying what it measures or provides"


def test_benchmarks_import_each_other_without_a_circle():
    graph = {}
    for name in MODULES:
        tree = ast.parse((BENCHMARKS / f"{name}.py").read_text())
        deps = graph.setdefault(name, set())
        for node in ast.walk(tree):  # imports inside functions count too: they close circles at run time
            if isinstance(node, ast.ImportFrom) and node.module == "benchmarks":
                deps.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("benchmarks."):
                deps.add(node.module.split(".")[1])
    done = set()

    def visit(node, path):
        for dep in graph.get(node, ()):
            assert dep not in path, "import circle: " + " -> ".join(path[path.index(dep):] + [dep])
            if dep not in done:
                visit(dep, path + [dep])
        done.add(node)

    for name in MODULES:
        visit(name, [name])
