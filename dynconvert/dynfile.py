"""The .dyn format: one safetensors file holding the converted model.

Tensors: the converted model's whole ``state_dict()``: for each converted layer
``<name>.states_out`` (H, m, d), ``<name>.states_in`` (H, n, d), ``<name>.coupling`` (H,),
``<name>.offset`` (), plus every tensor that was not converted (biases, norms, other layers).

Metadata: a single key ``dynconvert`` whose value is a JSON object (see ``FORMAT.md``):
``format``, ``format_version``, ``dynconvert_version``, ``source`` (how to rebuild the module),
``source_sha256``, ``source_bytes``, ``input_size``, ``options``, ``layers`` (per converted layer:
kind, constructor config, spec, fit statistics), ``skipped`` and ``tensors_sha256`` (checksum of
all tensors; ``load`` and ``dynconvert verify`` check it).

Version rule: readers accept every ``format_version`` up to their own and refuse newer ones.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from . import __version__
from .dynamics import DynSpec
from .errors import DynError
from .safetensors_io import read_safetensors, write_safetensors

FORMAT_NAME = "dynconvert"
FORMAT_VERSION = 1
META_KEY = "dynconvert"
REQUIRED_KEYS = ("format", "format_version", "source", "layers", "tensors_sha256")
STATE_SUFFIXES = ("states_out", "states_in", "coupling", "offset")


def tensors_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def write_dyn(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict, quantized: dict | None = None) -> None:
    """Write atomically. ``meta`` gets the format fields and the checksum added.

    ``quantized``: tensor name -> {"bits", "keep"} for tensors stored as integers (not yet stored
    as such: TODO format version 2)."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    for name, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise DynError(f"refusing to write {path}: tensor {name} contains NaN or Inf")
    meta = dict(meta, format=FORMAT_NAME, format_version=FORMAT_VERSION, dynconvert_version=__version__)
    meta["tensors_sha256"] = tensors_checksum(tensors)
    write_safetensors(path, tensors, {META_KEY: json.dumps(meta, sort_keys=True, separators=(",", ":"))})


def read_dyn(path: str | Path, verify: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and metadata of a .dyn, validated; DynError names what is wrong."""
    path = Path(path)
    tensors, raw = read_safetensors(path)
    meta = parse_meta(path, raw)
    check_layers(path, tensors, meta)
    if verify and tensors_checksum(tensors) != meta["tensors_sha256"]:
        raise DynError(f"{path}: checksum mismatch; the tensors were changed or corrupted after writing")
    return tensors, meta


def parse_meta(path: Path, raw: dict[str, str]) -> dict:
    if META_KEY not in raw:
        raise DynError(f"{path} is a safetensors file but not a .dyn (no dynconvert metadata)")
    try:
        meta = json.loads(raw[META_KEY])
    except (ValueError, RecursionError):  # bad JSON, a huge integer, absurd nesting
        raise DynError(f"{path}: its dynconvert metadata is not valid JSON (corrupt file)") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise DynError(f"{path}: its metadata does not describe a dynconvert file")
    version = meta.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise DynError(f"{path}: invalid format_version {version!r}")
    if version > FORMAT_VERSION:
        raise DynError(
            f"{path} uses .dyn format version {version}, newer than this dynconvert ({__version__}) reads "
            f"(up to {FORMAT_VERSION}); upgrade dynconvert"
        )
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise DynError(f"{path}: metadata lacks {', '.join(missing)} (corrupt or incomplete file)")
    if not isinstance(meta["layers"], dict) or not isinstance(meta["source"], dict):
        raise DynError(f"{path}: metadata 'layers' and 'source' must be objects (corrupt file)")
    if meta["source"].get("kind") not in ("torchvision", "factory", "module"):
        raise DynError(f"{path}: metadata 'source' has no known kind (corrupt file)")
    return meta


def check_layers(path: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Every converted layer's state tensors exist with the shapes its spec declares."""
    for name, info in meta["layers"].items():
        try:
            spec = DynSpec.from_dict(info["spec"])
            m, n = (int(v) for v in info["matrix_shape"])
        except (KeyError, TypeError, ValueError, OverflowError) as e:  # OverflowError: int(Infinity)
            raise DynError(f"{path}: layer {name!r} has invalid metadata ({e})") from None
        want = {
            "states_out": (spec.groups, m, spec.dim),
            "states_in": (spec.groups, n, spec.dim),
            "coupling": (spec.groups,),
            "offset": (),
        }
        for suffix, shape in want.items():
            t = tensors.get(f"{name}.{suffix}")
            if t is None:
                raise DynError(f"{path}: layer {name!r} lacks its tensor {suffix} (corrupt file)")
            if tuple(t.shape) != shape:
                raise DynError(f"{path}: {name}.{suffix} has shape {tuple(t.shape)} but its spec declares {shape}")
            if not t.is_floating_point():
                raise DynError(f"{path}: {name}.{suffix} is not a floating-point tensor")
