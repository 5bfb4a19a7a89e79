"""Safetensors files read defensively and written atomically.

Files from elsewhere are not trusted: the header is parsed and checked by hand (its length, every
dtype, shape and byte range against the real file size) before the safetensors library touches the
data, so a hostile header cannot make us allocate what the file does not hold.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ..errors import DynError, first_line
from .fileio import atomic_path

MAX_HEADER_BYTES = 100 * 1024 * 1024
DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}


def read_header(path: Path) -> tuple[dict, dict[str, str]]:
    """The validated tensor table and the metadata of a safetensors file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise DynError(f"{path} is too short to be a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n == 0 or n > min(size - 8, MAX_HEADER_BYTES):
            raise DynError(f"{path}: not a safetensors file, or truncated (header length {n} does not fit a {size}-byte file)")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError):  # bad JSON or UTF-8, a huge integer, absurd nesting
        raise DynError(f"{path}: the safetensors header is not valid JSON (corrupt file)") from None
    if not isinstance(header, dict):
        raise DynError(f"{path}: the safetensors header is not a JSON object (corrupt file)")
    metadata = header.pop("__metadata__", {}) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise DynError(f"{path}: the safetensors metadata is not a string-to-string map (corrupt file)")
    data_len = size - 8 - n
    spans = []
    for name, info in header.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise DynError(f"{path}: tensor entry {name!r} is malformed (corrupt file)")
        dtype, shape, offs = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
            raise DynError(f"{path}: tensor {name!r} has unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2**40 for s in shape):
            raise DynError(f"{path}: tensor {name!r} has an invalid shape {shape!r}")
        if (not isinstance(offs, list) or len(offs) != 2 or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)
                or not 0 <= offs[0] <= offs[1] <= data_len):
            raise DynError(f"{path}: tensor {name!r} points outside the file (truncated or corrupt)")
        if math.prod(shape) * DTYPE_SIZES[dtype] != offs[1] - offs[0]:
            raise DynError(f"{path}: tensor {name!r} has {offs[1] - offs[0]} bytes but shape {shape} needs {math.prod(shape) * DTYPE_SIZES[dtype]}")
        spans.append(tuple(offs))
    spans.sort()
    covered = 0
    for start, end in spans:
        if start != covered:
            raise DynError(f"{path}: tensor data overlaps or leaves gaps (corrupt file)")
        covered = end
    if covered != data_len:
        raise DynError(f"{path}: the file has {data_len - covered} bytes beyond its tensors (corrupt or not safetensors)")
    return header, metadata


def read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the metadata of a checked safetensors file."""
    path = Path(path)
    if not path.is_file():
        raise DynError(f"{path}: no such file" if not path.exists() else f"{path} is not a file")
    read_header(path)
    try:
        data = path.read_bytes()
        tensors = st_load(data)
        metadata = json.loads(data[8 : 8 + struct.unpack("<Q", data[:8])[0]]).get("__metadata__") or {}
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise DynError(f"{path}: cannot read safetensors data ({first_line(e, 160)})") from None
    return tensors, metadata


class OverBudget(DynError):
    """A file measured over its byte budget once written; it was removed, the output left as it was."""

    def __init__(self, path, size: int, limit: int):
        super().__init__(f"refusing to write {path}: it came out {size:,} bytes, {size - limit:,} over the budget of "
                         f"{limit:,} bytes (nothing was written); convert again asking for that much less")
        self.size, self.limit = size, limit


def write_safetensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str],
                      max_bytes: int | None = None) -> None:
    """Write atomically. Keep ``metadata`` to one key: the library orders several keys at random.

    ``max_bytes``: the written file is measured before it replaces ``path``; over this, OverBudget.
    Only a tensor viewing a larger or shared storage is copied first (safetensors refuses those):
    copying every tensor held the file's bytes twice while it was built (ViT-L/16 at 1/4: 0.3 GB)."""
    seen: set[int] = set()
    own = {}
    for k, v in tensors.items():
        v = v.detach().cpu().contiguous()
        ptr = v.untyped_storage().data_ptr()
        shared = ptr in seen or v.untyped_storage().nbytes() != v.numel() * v.element_size()
        seen.add(ptr)
        own[k] = v.clone() if shared and v.numel() else v
    blob = st_save(own, metadata=metadata)
    with atomic_path(path) as tmp:
        tmp.write_bytes(blob)
        size = tmp.stat().st_size
        if max_bytes is not None and size > max_bytes:
            raise OverBudget(path, size, max_bytes)
