"""The package's layout rules (docs/architecture.md): no import cycle, imports at the top."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "dynconvert"
FUNCTION_IMPORTS_ALLOWED = {"cli", "__main__"}  # commands keep their imports next to them


def _relative_imports(tree: ast.Module, depth: int):
    """(node, top-level module of the package) for each relative import; ``depth``: 0 for a module
    at the top, 1 inside a subpackage (whose ``..x`` is the top's ``x``)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == depth + 1:
            for target in [node.module] if node.module else [a.name for a in node.names]:
                yield node, target.split(".")[0]


def _graph():
    graph, nested = {}, []
    for f in PACKAGE.rglob("*.py"):
        parts = f.relative_to(PACKAGE).parts
        name = f.stem if len(parts) == 1 else parts[0]  # a subpackage counts as one module
        tree = ast.parse(f.read_text())
        graph.setdefault(name, set())
        for node, target in _relative_imports(tree, len(parts) - 1):
            graph[name].add(target)
            if node not in tree.body and name not in FUNCTION_IMPORTS_ALLOWED:
                nested.append(f"{name} imports .{target} inside a function (line {node.lineno})")
    return graph, nested


def test_no_import_cycle():
    graph, _ = _graph()
    graph.pop("__init__")  # the package imports its API; modules never import the package itself

    done = set()  # modules whose whole import tree is known to be acyclic

    def visit(node, path):
        for dep in graph.get(node, ()):
            assert dep not in path, "import cycle: " + " -> ".join(path[path.index(dep):] + [dep])
            if dep not in done:
                visit(dep, path + [dep])
        done.add(node)

    for module in graph:
        visit(module, [module])


def test_imports_are_at_the_top():
    _, nested = _graph()
    assert not nested, nested
