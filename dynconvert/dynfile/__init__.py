"""dynfile: the .dyn file: writer/reader (format), the rebuild of an nn.Module from it, interrupted-run resume.
May import: io, dynamics, budget."""

import importlib

# The public names of the former ``dynconvert/dynfile.py`` (now ``dynfile/format.py``), loaded on first use so
# that importing one module of this stage does not import them all.
_PUBLIC = ('FORMAT_NAME', 'FORMAT_VERSION', 'META_KEY', 'REQUIRED_KEYS', 'STATE_SUFFIXES', 'FLOAT16_BITS', 'QUANT_SEP', 'MAX_NDIM', 'tensors_checksum', 'write_dyn', 'encode_quantized', 'read_dyn', 'decode_quantized', 'parse_meta', 'check_layers')

__all__ = list(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(".format", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
