"""Lazy re-exports: a stage package that answers the names of the single module it replaced.

``dynamics``, ``budget`` and ``dynfile`` were one module each (``dynconvert/dynamics.py``, ...); their
``__init__`` still gives those names, loading the module on first use so that importing one module
of the stage does not import them all. Here, at the bottom stage, because all three use it.
"""

from __future__ import annotations

import importlib


def lazy_names(package: str, module: str, names) -> tuple:
    """(``__getattr__``, ``__all__``) for ``package``'s ``__init__``: each of ``names`` is read from
    ``package.module`` on first use; any other name is an AttributeError."""
    public = tuple(names)

    def __getattr__(name: str):
        if name in public:
            return getattr(importlib.import_module(f".{module}", package), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__, list(public)
