"""dynamics: the dynamics-based layers, their metrics and kinds, the per-layer fits and the conversion plan.
May import: io (and errors/version)."""

from ..io.lazy import lazy_names

# The public names of the former ``dynconvert/dynamics.py`` (now ``dynamics/modules.py``), loaded on first use.
__getattr__, __all__ = lazy_names(__name__, "modules", (
    'METRICS', 'KERNELS', 'DynSpec', 'choose_spec', 'distances', 'relations', 'materialize',
    'sql2_factors', 'sql2_lowrank', 'DynamicsLayer', 'DynLinear', 'DynConv2d', 'dense_matrix'
))
