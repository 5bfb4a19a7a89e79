"""dynamics: the dynamics-based layers, their metrics and kinds, the per-layer fits and the conversion plan.
May import: io (and errors/version)."""

import importlib

# The public names of the former ``dynconvert/dynamics.py`` (now ``dynamics/modules.py``), loaded on first use so
# that importing one module of this stage does not import them all.
_PUBLIC = ('METRICS', 'KERNELS', 'DynSpec', 'choose_spec', 'distances', 'relations', 'materialize', 'sql2_factors', 'sql2_lowrank', 'DynamicsLayer', 'DynLinear', 'DynConv2d', 'dense_matrix')

__all__ = list(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(".modules", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
