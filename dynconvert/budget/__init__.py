"""budget: conversion to a byte budget: units, candidates, allocation, output-aware fits, synthesis, quantization.
May import: io, dynamics."""

from ..io.lazy import lazy_names

# The public names of the former ``dynconvert/budget.py`` (now ``budget/pipeline.py``), loaded on first use.
__getattr__, __all__ = lazy_names(__name__, "pipeline", (
    'STATE_DIM', 'DYN_CANDIDATES', 'SENSITIVITY_IMAGES', 'HEADER_BYTES_PER_LAYER',
    'HEADER_BYTES_PER_TENSOR', 'Part', 'Unit', 'state_bytes', 'find_units', 'model_bytes', 'Fitted',
    'fit_candidate', 'measure_candidates', 'BudgetResult', 'convert_to_budget'
))
