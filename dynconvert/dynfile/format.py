"""The .dyn format: one safetensors file holding the converted model.

Tensors: the converted model's whole ``state_dict()``: for each converted layer
``<name>.states_out`` (H, m, d), ``<name>.states_in`` (H, n, d), ``<name>.coupling`` (H,),
``<name>.offset`` (), plus every tensor that was not converted (biases, norms, other layers).

Metadata: a single key ``dynconvert`` whose value is a JSON object (see ``docs/format.md``):
``format``, ``format_version``, ``dynconvert_version``, ``source`` (how to rebuild the module),
``source_sha256``, ``source_bytes``, ``input_size``, ``options``, ``layers`` (per converted layer:
kind, constructor config, spec, fit statistics), ``skipped`` and ``tensors_sha256`` (checksum of
all tensors; ``load`` and ``dynconvert verify`` check it).

Version 2 adds quantized tensors: a tensor listed in the metadata's ``quantized`` object
(``{NAME: {"bits": 4|8, "keep": [dims with their own scale], "shape": [...]}}``) is stored as
``NAME:q`` (int8 for 8 bits; for 4 bits uint8, two values per byte, ``quant.pack_int4``) and
``NAME:scale`` (float32, one scale per slice along ``keep``, shaped to broadcast).

Version 3 adds group-wise weights (``quant`` group grids): ``{"bits": 2|3|4|8, "group": G,
"shape": [...]}`` stored as ``NAME:q`` (bits 8: int8 in the tensor's shape; 2, 3, 4: uint8 [ceil(numel
* bits / 8)], packed least significant bit first, ``quant.pack_bits``) and ``NAME:scale`` (float16,
(m, n // G) for the tensor viewed as (m, n)). Version 4 adds group-wise bits 5 and 6 (packed the
same way). A colon never
occurs in a PyTorch state-dict key, so these names cannot collide with real tensors. ``read_dyn``
gives every caller the float32 tensors under their original names; the checksum covers the
tensors as stored.

Version rule: readers accept every ``format_version`` up to their own and refuse newer ones.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from ..version import __version__
from ..budget import quant
from .grouped import decode_grouped, encode_grouped, stored_integers
from ..dynamics.modules import DynSpec
from ..errors import DynError
from ..io.allocator import release_freed
from ..io.data import check_input_size
from ..io.safetensors_io import read_safetensors, write_safetensors

FORMAT_NAME = "dynconvert"
FORMAT_VERSION = 4
META_KEY = "dynconvert"
REQUIRED_KEYS = ("format", "format_version", "source", "layers", "tensors_sha256")
STATE_SUFFIXES = ("states_out", "states_in", "coupling", "offset")
FLOAT16_BITS = 16
"""``quantized`` entries with bits 16 are float tensors stored as fp16 (no scale)."""
QUANT_SEP = ":"  # never in a PyTorch state-dict key: "NAME:q" and "NAME:scale" cannot collide
MAX_NDIM = 16


def promised_bytes(budget: dict | None, keep) -> int | None:
    """The bytes a file (the .dyn and its ONNX export) is held to: the budget the user gave
    (``--size``/``--target-bytes``); None without one, and for ``--keep``, whose budget the
    search chose itself and is no promise."""
    return budget["target_bytes"] if budget and keep is None else None


def tensors_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else b"")  # no copy
    return h.hexdigest()


def write_dyn(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict, quantized: dict | None = None,
              max_bytes: int | None = None) -> None:
    """Write atomically. ``meta`` gets the format fields and the checksum added.

    ``quantized``: tensor name -> {"bits": 4|8, "keep": [dims]} for tensors stored as integers
    (``NAME:q``) plus float32 scales (``NAME:scale``); they must already lie on their integer grid
    (``quant.fake_quant`` with the same bits/keep), and read back bit-identical. Any
    ``quantized`` key in ``meta`` is replaced: it describes this file's storage, not an input's.
    ``max_bytes``: the file is measured once written and refused (OverBudget, nothing replaced) when larger.
    """
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    for name, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise DynError(f"refusing to write {path}: tensor {name} contains NaN or Inf")
        if QUANT_SEP in name:
            raise DynError(f"refusing to write {path}: tensor name {name!r} contains {QUANT_SEP!r}, reserved for quantized storage")
    meta = {k: v for k, v in meta.items() if k != "quantized"}
    stored, described = encode_quantized(path, tensors, quantized or {})
    if described:
        meta["quantized"] = described
    meta = dict(meta, format=FORMAT_NAME, format_version=FORMAT_VERSION, dynconvert_version=__version__)
    meta["tensors_sha256"] = tensors_checksum(stored)
    write_safetensors(path, stored, {META_KEY: json.dumps(meta, sort_keys=True, separators=(",", ":"))}, max_bytes)


def _keep_dims(keep, ndim: int) -> list[int] | None:
    """``keep`` as sorted distinct dims in [0, ndim), or None when it is not a valid list of dims."""
    if not isinstance(keep, (list, tuple)) or not all(type(k) is int for k in keep):
        return None
    if any(not -ndim <= k < ndim for k in keep) or (keep and ndim == 0):
        return None
    dims = sorted({k % ndim for k in keep}) if ndim else []
    return dims if len(dims) == len(keep) else None


def _exact_scales(t: torch.Tensor, bits: int, keep: list[int]) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(integers, scales, worst deviation in grid steps) for a tensor that should lie on its grid.

    The scales are re-derived from ``t`` (max |t| / qmax per slice); where float rounding makes a
    slice miss its values by an ulp, the neighbouring float32 scales are tried, so that a
    fake-quantized tensor comes back bit-identical."""
    t32 = t.float()
    q, scale = quant.quantize(t32, bits, tuple(keep))
    reduce = [i for i in range(t.ndim) if i not in keep]

    def misses(q, scale):
        d = quant.dequantize(q, scale).to(t.dtype) != t
        return d.any(dim=reduce, keepdim=True) if reduce else d

    bad = misses(q, scale)
    if bad.any():
        for direction in (float("inf"), 0.0):
            cand = scale
            for _ in range(2):
                cand = torch.nextafter(cand, torch.full_like(cand, direction))
                q2, _ = quant.quantize(t32, bits, tuple(keep), scale=cand)
                fixed = bad & ~misses(q2, cand)
                scale = torch.where(fixed, cand, scale)
                q = torch.where(fixed.expand_as(q), q2, q)
                bad = bad & ~fixed
    dev = ((quant.dequantize(q, scale) - t32).abs() / scale).max().item() if t.numel() else 0.0
    return q, scale, dev


TRIM_NUMEL = 2**20
"""Weights encoded between two hand-backs of their freed temporaries (ViT-L/16: one a layer, ~60 ms each;
one every 8M weights let the file take 0.9 GB more to write)."""


def encode_quantized(path, tensors: dict[str, torch.Tensor], quantized: dict) -> tuple[dict, dict]:
    """(tensors as stored, the metadata's ``quantized`` object)."""
    stored = dict(tensors)
    described = {}
    since_trim = 0
    for name in sorted(quantized):
        spec = quantized[name]
        t = tensors.get(name)
        since_trim += 0 if t is None else t.numel()
        if since_trim >= TRIM_NUMEL:
            # the weights' float temporaries, freed between the small integers kept, would otherwise
            # stay in the process (io/allocator.py): ViT-L/16's file took 1.0-1.4 GB more to write
            release_freed()
            since_trim = 0
        if t is None:
            raise DynError(f"refusing to write {path}: quantized tensor {name!r} is not in the state dict")
        bits = spec.get("bits") if isinstance(spec, dict) else None
        if bits == FLOAT16_BITS:  # small float tensors (norms, biases) of a byte-budgeted model
            if not t.is_floating_point() or not torch.equal(t.half().to(t.dtype), t):
                raise DynError(f"refusing to write {path}: tensor {name} is declared fp16 but its values are not fp16 numbers")
            del stored[name]
            stored[f"{name}{QUANT_SEP}f16"] = t.half().contiguous()
            described[name] = {"bits": FLOAT16_BITS, "keep": [], "shape": list(t.shape)}
            continue
        if isinstance(spec, dict) and "group" in spec:
            stored[f"{name}{QUANT_SEP}q"], stored[f"{name}{QUANT_SEP}scale"], described[name] = encode_grouped(path, name, t, spec)
            del stored[name]
            continue
        if type(bits) is not int or bits not in quant.BITS:
            raise DynError(f"refusing to write {path}: quantized tensor {name!r} has bits {bits!r}; choose 4, 8 (or 16: fp16)")
        keep = _keep_dims(spec.get("keep", [0]), t.ndim) if t.ndim else []  # a scalar has one scale
        if keep is None:
            raise DynError(f"refusing to write {path}: quantized tensor {name!r} has invalid keep {spec.get('keep')!r} for {t.ndim} dims")
        if not t.is_floating_point():
            raise DynError(f"refusing to write {path}: quantized tensor {name!r} is not floating point")
        given = spec.get("scale")
        if isinstance(given, torch.Tensor):  # the scales the values were rounded with (GPTQ may leave a row short of qmax)
            scale = given.detach().float().cpu().reshape([t.shape[i] if i in keep else 1 for i in range(t.ndim)])
            q, _ = quant.quantize(t.float(), bits, tuple(keep), scale=scale)
            dev = ((quant.dequantize(q, scale) - t.float()).abs() / scale).max().item() if t.numel() else 0.0
        else:
            q, scale, dev = _exact_scales(t, bits, keep)
        if dev > 1e-3:
            raise DynError(
                f"refusing to write {path}: tensor {name} is declared int{bits} but is not on its integer grid "
                f"(off by {dev:.3g} grid steps); round it with quant.fake_quant(t, {bits}, {tuple(keep)}) first"
            )
        del stored[name]
        stored[f"{name}{QUANT_SEP}q"] = quant.pack_int4(q) if bits == 4 else q
        stored[f"{name}{QUANT_SEP}scale"] = scale.contiguous()
        described[name] = {"bits": bits, "keep": keep, "shape": list(t.shape)}
    return stored, described


def read_dyn(path: str | Path, verify: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and metadata of a .dyn, validated; DynError names what is wrong.

    Quantized tensors (format version 2) come back dequantized, as float32 under their own names."""
    path = Path(path)
    stored, raw = read_safetensors(path)
    meta = parse_meta(path, raw)
    tensors = decode_quantized(path, stored, meta)
    check_layers(path, tensors, meta)
    if verify and tensors_checksum(stored) != meta["tensors_sha256"]:
        raise DynError(f"{path}: checksum mismatch; the tensors were changed or corrupted after writing")
    return tensors, meta


def decode_quantized(path: Path, stored: dict[str, torch.Tensor], meta: dict) -> dict[str, torch.Tensor]:
    """The stored tensors with every ``NAME:q`` / ``NAME:scale`` pair replaced by float32 ``NAME``;
    each declaration and stored tensor is checked first."""
    described = meta.get("quantized", {})
    if not isinstance(described, dict):
        raise DynError(f"{path}: metadata 'quantized' must be an object (corrupt file)")
    tensors = {k: v for k, v in stored.items() if QUANT_SEP not in k}
    expected = set()
    for name, info in described.items():
        what = f"{path}: quantized tensor {name!r}"
        if not isinstance(info, dict):
            raise DynError(f"{what} has invalid metadata (corrupt file)")
        if QUANT_SEP in name or name in tensors:
            raise DynError(f"{what} is also stored unquantized, or has an invalid name (corrupt file)")
        bits, shape = info.get("bits"), info.get("shape")
        if (not isinstance(shape, list) or len(shape) > MAX_NDIM
                or not all(type(s) is int and 0 <= s < 2**40 for s in shape)):
            raise DynError(f"{what} declares an invalid shape {shape!r}")
        if "group" in info:
            qname, sname = f"{name}{QUANT_SEP}q", f"{name}{QUANT_SEP}scale"
            expected |= {qname, sname}
            tensors[name] = decode_grouped(what, info, stored.get(qname), stored.get(sname))
            continue
        if type(bits) is not int or bits not in (*quant.BITS, FLOAT16_BITS):
            raise DynError(f"{what} declares bits {bits!r}; only 4, 8 and 16 (fp16) exist")
        if bits == FLOAT16_BITS:
            fname = f"{name}{QUANT_SEP}f16"
            expected.add(fname)
            half = stored.get(fname)
            if half is None or half.dtype != torch.float16 or list(half.shape) != shape or info.get("keep") != []:
                raise DynError(f"{what} is declared fp16 {shape} but {fname} is missing or does not match (corrupt file)")
            tensors[name] = half.float()
            continue
        keep = _keep_dims(info.get("keep"), len(shape))
        if keep is None or keep != info.get("keep"):
            raise DynError(f"{what} declares keep {info.get('keep')!r}, not distinct sorted dims of its {len(shape)}-dim shape")
        qname, sname = f"{name}{QUANT_SEP}q", f"{name}{QUANT_SEP}scale"
        expected |= {qname, sname}
        q, scale = stored.get(qname), stored.get(sname)
        if q is None or scale is None:
            raise DynError(f"{what} lacks its stored tensor {qname if q is None else sname} (corrupt file)")
        ints = stored_integers(f"{what}: {qname} is", q, bits, shape)
        limit = quant.qmax(bits)
        if ints.numel() and int(ints.to(torch.int16).abs().max()) > limit:  # int16: |-128| does not wrap
            raise DynError(f"{what} holds integers outside [-{limit}, {limit}] (corrupt file)")
        want = [s if i in keep else 1 for i, s in enumerate(shape)]
        if scale.dtype != torch.float32 or list(scale.shape) != want:
            raise DynError(f"{what}: {sname} is {scale.dtype} {list(scale.shape)} but float32 {want} is declared")
        if not (torch.isfinite(scale).all() and (scale > 0).all()):
            raise DynError(f"{what}: {sname} holds a scale that is not finite and positive (corrupt file)")
        values = quant.dequantize(ints.reshape(shape), scale)
        if not torch.isfinite(values).all():
            raise DynError(f"{what} dequantizes to values that are not finite (corrupt file)")
        tensors[name] = values
    stray = sorted(k for k in stored if QUANT_SEP in k and k not in expected)
    if stray:
        raise DynError(f"{path}: tensor {stray[0]!r} is not described by the metadata's 'quantized' (corrupt file)")
    return tensors


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
    if meta.get("input_size") is not None:  # checked here, where it enters: every reader then holds a usable size
        meta["input_size"] = list(check_input_size(meta["input_size"], f"{path}: metadata input_size", "corrupt file"))
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
