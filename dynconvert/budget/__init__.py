"""budget: conversion to a byte budget: units, candidates, allocation, output-aware fits, synthesis, quantization.
May import: io, dynamics."""

import importlib

# The public names of the former ``dynconvert/budget.py`` (now ``budget/pipeline.py``), loaded on first use so
# that importing one module of this stage does not import them all.
_PUBLIC = ('STATE_DIM', 'DYN_CANDIDATES', 'SENSITIVITY_IMAGES', 'HEADER_BYTES_PER_LAYER', 'HEADER_BYTES_PER_TENSOR', 'Part', 'Unit', 'state_bytes', 'find_units', 'model_bytes', 'Fitted', 'fit_candidate', 'measure_candidates', 'BudgetResult', 'convert_to_budget')

__all__ = list(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(".pipeline", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
