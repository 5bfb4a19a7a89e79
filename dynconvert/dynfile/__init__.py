"""dynfile: the .dyn file: writer/reader (format), the rebuild of an nn.Module from it, interrupted-run resume.
May import: io, dynamics, budget."""

from ..io.lazy import lazy_names

# The public names of the former ``dynconvert/dynfile.py`` (now ``dynfile/format.py``), loaded on first use.
__getattr__, __all__ = lazy_names(__name__, "format", (
    'FORMAT_NAME', 'FORMAT_VERSION', 'META_KEY', 'REQUIRED_KEYS', 'STATE_SUFFIXES', 'FLOAT16_BITS',
    'QUANT_SEP', 'MAX_NDIM', 'tensors_checksum', 'write_dyn', 'encode_quantized', 'read_dyn',
    'decode_quantized', 'parse_meta', 'check_layers'
))
