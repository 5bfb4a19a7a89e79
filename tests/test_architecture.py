"""The package's layout rules (docs/architecture.md): one folder per stage, stages import only downward,
no import cycle, imports at the top, a short top level, and the old flat module paths still import."""

import ast
import importlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "dynconvert"
# io < dynamics < budget < dynfile < train | deploy < api < cli; errors and version sit under everything
RANK = {"io": 0, "dynamics": 1, "budget": 2, "dynfile": 3, "train": 4, "deploy": 4, "api": 5, "cli": 6, "__main__": 7}
BASE = {"errors", "version"}
SUBPACKAGES = ["io", "dynamics", "budget", "dynfile", "train", "deploy", "cli"]
FUNCTION_IMPORTS_ALLOWED = {"cli", "__main__"}  # commands keep their imports next to them
MAX_TOP_LEVEL = 12


def _modules() -> dict[str, Path]:
    """Dotted name inside the package (``dynamics.fit``; ``dynamics`` for its __init__) -> file."""
    out = {}
    for f in PACKAGE.rglob("*.py"):
        parts = list(f.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts.pop()
        out[".".join(parts)] = f
    return out


def _edges():
    """(importer, imported module, ImportFrom node, at module level?) for every relative import."""
    modules = _modules()
    for name, f in modules.items():
        tree = ast.parse(f.read_text())
        package = name.split(".") if f.name == "__init__.py" else name.split(".")[:-1]
        for node in ast.walk(tree):
            if not isinstance(node, ast.ImportFrom):
                continue
            assert node.level or not (node.module or "").startswith("dynconvert"), \
                f"{name}: use a relative import, not 'from {node.module} import' (line {node.lineno})"
            if not node.level:
                continue
            base = package[:len(package) - (node.level - 1)]
            target = base + (node.module.split(".") if node.module else [])
            for alias in node.names:  # `from . import fit`: the module fit, not the package
                sub = ".".join(target + [alias.name])
                yield name, sub if sub in modules else ".".join(target), node, node in tree.body


def _stage(module: str) -> str:
    return module.split(".")[0]


def test_stages_import_only_downward():
    wrong = []
    for src, dst, node, _ in _edges():
        s, d = _stage(src), _stage(dst)
        if s == "__init__" or s == d or d in BASE:
            continue
        if s in BASE or RANK[d] >= RANK[s]:
            wrong.append(f"{src} imports {dst} (line {node.lineno}): {s} may not import {d}")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle():
    graph = {}
    for src, dst, _, _ in _edges():
        if src.startswith(dst + "."):  # a submodule reading its own package's __init__ (cli's commands read the
            continue  # app it defines): Python has loaded that package first, so this cannot close a cycle
        graph.setdefault(src, set()).add(dst)
    graph.pop("__init__", None)  # the package imports its API lazily; modules never import the package itself
    done = set()  # modules whose whole import tree is known to be acyclic

    def visit(node, path):
        for dep in graph.get(node, ()):
            assert dep not in path, "import cycle: " + " -> ".join(path[path.index(dep):] + [dep])
            if dep not in done:
                visit(dep, path + [dep])
        done.add(node)

    for module in list(graph):
        visit(module, [module])


def test_imports_are_at_the_top():
    nested = [f"{src} imports {dst} inside a function (line {node.lineno})"
              for src, dst, node, top in _edges() if not top and _stage(src) not in FUNCTION_IMPORTS_ALLOWED]
    assert not nested, nested


def test_top_level_is_short_and_every_stage_says_what_it_may_import():
    entries = sorted(p.name for p in PACKAGE.iterdir() if p.name != "__pycache__")
    assert len(entries) <= MAX_TOP_LEVEL, f"{len(entries)} entries at the top of dynconvert/: {entries}"
    assert sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__") == sorted(SUBPACKAGES)
    for name in SUBPACKAGES:
        doc = ast.get_docstring(ast.parse((PACKAGE / name / "__init__.py").read_text()), clean=False)
        assert doc and len(doc.strip().splitlines()) == 2 and doc.startswith(f"{name}:"), (name, doc)
        assert "import" in doc.splitlines()[1], (name, doc)


def test_old_flat_paths_still_import():
    """Code written against the flat layout (``dynconvert.workers.using_threads``, ``from dynconvert.dynamics
    import DynLinear``) gets the very same objects from the new places."""
    import dynconvert

    for old, new in dynconvert._MOVED.items():
        module = importlib.import_module(f"dynconvert.{old}")
        assert module is importlib.import_module(f"dynconvert.{new}"), old
        assert module.__spec__.name == f"dynconvert.{new}", old  # the alias leaves the module's own spec alone
        assert getattr(dynconvert, old) is module
    for package, module in [("dynamics", "modules"), ("budget", "pipeline"), ("dynfile", "format")]:
        pkg, mod = (importlib.import_module(f"dynconvert.{n}") for n in (package, f"{package}.{module}"))
        for name in pkg.__all__:
            assert getattr(pkg, name) is getattr(mod, name), (package, name)
    from dynconvert.workers import using_threads

    assert using_threads is importlib.import_module("dynconvert.dynamics.workers").using_threads
    with pytest.raises(AttributeError):
        dynconvert.dynamics.no_such_name  # noqa: B018


MAX_LINES = 350
# Over MAX_LINES today, waiting for a split (issue 21); a module joins this list only with a reason.
REASON = f"Longer than {MAX_LINES} lines:"
"""A module may pass the limit only when its docstring says why, in a line starting with this."""


def test_no_module_grows_past_the_limit():
    root = PACKAGE.parent
    files = [*PACKAGE.rglob("*.py"), *(root / "benchmarks").glob("*.py")]
    over = {}
    for f in files:
        text = f.read_text()
        doc = ast.get_docstring(ast.parse(text)) or ""
        if len(text.splitlines()) > MAX_LINES and not any(line.startswith(REASON) for line in doc.splitlines()):
            over[str(f.relative_to(root))] = len(text.splitlines())
    assert not over, (f"modules over {MAX_LINES} lines (split them by what they do, or say why not in a "
                      f"'{REASON}' line of the module docstring): {over}")


def test_the_reader_does_not_load_the_fitting_stack():
    """``dynfile/rebuild.py`` puts layers in place with ``modules.set_submodule``; loading a file must not
    import the fits, the conversion plan or the worker pool (``conversion.set_submodule`` still imports)."""
    import subprocess
    import sys

    code = ("import sys, dynconvert.dynfile.rebuild; "
            "print(' '.join(m for m in sys.modules if m.startswith('dynconvert.')))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=PACKAGE.parent).stdout.split()
    heavy = {"dynconvert.dynamics." + m for m in ("conversion", "fit", "fit_full", "fit_sql2", "workers")}
    assert not heavy & set(loaded), sorted(heavy & set(loaded))
    from dynconvert.dynamics import conversion, modules

    assert conversion.set_submodule is modules.set_submodule
