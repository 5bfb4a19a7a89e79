"""Group-wise quantized weights in a .dyn (format version 3): packed integers at their bit width
and fp16 scales, one per group of inputs of a row (``budget.quant``; layout in docs/format.md)."""

from __future__ import annotations

import math

import torch

from ..budget import quant
from ..errors import DynError


def encode_grouped(path, name: str, t: torch.Tensor, spec: dict) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(stored integers, fp16 scales, metadata entry) of a group-wise quantized tensor."""
    bits, group = spec.get("bits"), spec.get("group")
    what = f"refusing to write {path}: quantized tensor {name!r}"
    if type(bits) is not int or bits not in quant.GROUP_BITS:
        raise DynError(f"{what} has bits {bits!r}; group-wise grids have {', '.join(map(str, quant.GROUP_BITS))}")
    if not t.is_floating_point() or t.ndim < 1:
        raise DynError(f"{what} is not a floating-point weight")
    n = math.prod(t.shape[1:])
    if type(group) is not int or group <= 0 or n % group:
        raise DynError(f"{what} has group {group!r}, which does not divide its {n} inputs per row")
    given = spec.get("scale")
    if isinstance(given, torch.Tensor):
        scales = given.detach().float().cpu().reshape(t.shape[0], n // group)
    else:
        scales = quant.recover_scales(t, bits, group)
        if scales is None:
            raise DynError(f"{what} is declared int{bits} in groups of {group} but is not on such a grid; "
                           "round it with quant.fake_quant_grouped first")
    if not torch.equal(scales.half().float(), scales) or not bool((scales != 0).all()):
        raise DynError(f"{what} has scales that are not nonzero fp16 numbers")
    q = quant.quantize_grouped(t, bits, scales)
    if not torch.equal(quant.dequantize_grouped(q, scales).to(t.dtype), t):
        raise DynError(f"{what} is declared int{bits} in groups of {group} but is not on the grid of its scales")
    ints = q if bits == 8 else quant.pack_bits(q, bits)
    return ints, scales.half(), {"bits": bits, "group": group, "shape": list(t.shape)}


def decode_grouped(what: str, info: dict, q: torch.Tensor | None, scale: torch.Tensor | None) -> torch.Tensor:
    """float32 values of a group-wise entry; each stored tensor checked against the declaration."""
    bits, group, shape = info.get("bits"), info.get("group"), info["shape"]
    if bits not in quant.GROUP_BITS or not shape:
        raise DynError(f"{what} declares group-wise bits {bits!r} for shape {shape} (corrupt file)")
    n = math.prod(shape[1:])
    if type(group) is not int or group <= 0 or n % group:
        raise DynError(f"{what} declares group {group!r}, which does not divide its {n} inputs per row (corrupt file)")
    if q is None or scale is None:
        raise DynError(f"{what} lacks its stored integers or scales (corrupt file)")
    ints = stored_integers(f"{what}: integers are", q, bits, shape)
    lo, hi = quant.group_range(bits)
    if ints.numel() and (int(ints.min()) < lo or int(ints.max()) > hi):
        raise DynError(f"{what} holds integers outside [{lo}, {hi}] (corrupt file)")
    want = [shape[0], n // group]
    if scale.dtype != torch.float16 or list(scale.shape) != want:
        raise DynError(f"{what}: scales are {scale.dtype} {list(scale.shape)} but float16 {want} is declared")
    if not (torch.isfinite(scale).all() and (scale != 0).all()):
        raise DynError(f"{what}: a scale is zero or not finite (corrupt file)")
    return quant.dequantize_grouped(ints, scale.float())


def stored_integers(said: str, q: torch.Tensor, bits: int, shape: list[int]) -> torch.Tensor:
    """The int8 values of a stored integer tensor: int8 of ``shape`` as it is, fewer bits packed
    into a flat uint8 tensor (quant.pack_bits; for 4 bits, pack_int4's bytes). A stored tensor of
    another dtype or size is a one-line error starting with ``said`` ("NAME: X is")."""
    numel = math.prod(shape)
    if bits == 8:
        if q.dtype != torch.int8 or list(q.shape) != shape:
            raise DynError(f"{said} {q.dtype} {list(q.shape)} but int8 {shape} is declared")
        return q
    size = (numel * bits + 7) // 8
    if q.dtype != torch.uint8 or q.ndim != 1 or q.numel() != size:
        raise DynError(f"{said} {q.dtype} {list(q.shape)} but int{bits} {shape} packs into uint8 [{size}]")
    ints = quant.unpack_int4(q, numel) if bits == 4 else quant.unpack_bits(q, bits, numel)
    return ints.reshape(shape)
