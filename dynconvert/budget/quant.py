"""Symmetric integer quantization of tensors: the precision a stored tensor can have.

A quantized tensor keeps one scale per slice along the dimensions in ``keep`` (for a dense
weight ``keep=(0,)``: one scale per output channel; for states ``(H, m, d)`` ``keep=(0, 1)``: one
per sub-model state vector) and integers in ``[-(2^(b-1) - 1), 2^(b-1) - 1]``. In memory a
quantized tensor is held dequantized (``fake_quant``: float values on the integer grid), so every
measurement sees exactly what a saved file will hold; the .dyn writer stores the integers.

Group-wise grids (bits 2 to 6, and 8; below) are what byte budgets use for dense weights: one fp16
scale per G contiguous inputs of a row, the full signed integer range, exact bit packing.
"""

from __future__ import annotations

import math

import torch

from ..errors import DynError

BITS = (4, 8)


def qmax(bits: int) -> int:
    if bits not in BITS:
        raise ValueError(f"unsupported precision int{bits}; choose one of {', '.join(f'int{b}' for b in BITS)}")
    return 2 ** (bits - 1) - 1


def _reduce_dims(t: torch.Tensor, keep: tuple[int, ...]) -> list[int]:
    keep = {k % t.ndim for k in keep} if t.ndim else set()
    return [i for i in range(t.ndim) if i not in keep]


def scales_for(t: torch.Tensor, bits: int, keep: tuple[int, ...]) -> torch.Tensor:
    """Per-slice scales (max |t| / qmax), shaped to broadcast against ``t``; never zero."""
    dims = _reduce_dims(t, keep)
    amax = t.detach().abs().amax(dim=dims, keepdim=True) if dims else t.detach().abs()
    return (amax / qmax(bits)).clamp_min(1e-12).float()


def quantize(t: torch.Tensor, bits: int, keep: tuple[int, ...] = (0,), scale: torch.Tensor | None = None):
    """(integers as int8, scales) with ``integers * scales ~= t``."""
    scale = scales_for(t, bits, keep) if scale is None else scale
    q = qmax(bits)
    return torch.round(t.detach().float() / scale).clamp(-q, q).to(torch.int8), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale


def fake_quant(t: torch.Tensor, bits: int, keep: tuple[int, ...] = (0,)) -> torch.Tensor:
    """``t`` rounded to its integer grid, as floats (what a saved file will give back)."""
    return dequantize(*quantize(t, bits, keep)).to(t.dtype)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 values in [-7, 7] -> uint8, two per byte (low nibble first); odd lengths padded."""
    flat = (q.reshape(-1).to(torch.int16) + 8).to(torch.uint8)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_full((1,), 8)])
    return flat[0::2] | (flat[1::2] << 4)


def unpack_int4(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """The inverse of ``pack_int4``: ``numel`` int8 values."""
    lo = (packed & 0x0F).to(torch.int16) - 8
    hi = (packed >> 4).to(torch.int16) - 8
    return torch.stack([lo, hi], 1).reshape(-1)[:numel].to(torch.int8)


def stored_bytes(numel: int, bits: int | None, scales: int = 0) -> int:
    """Bytes a tensor takes in a .dyn: fp32 values, or packed integers plus fp32 scales."""
    if bits is None:
        return 4 * numel
    return (numel * bits + 7) // 8 + 4 * scales


# ---------------------------------------------------------------- group-wise grids (bits 2-6, 8)
#
# A weight (m, *rest) is viewed as (m, n), n = prod(rest); each row is cut into groups of G
# contiguous values with one fp16 scale each, and W_hat = q * s with q in [-2^(b-1), 2^(b-1) - 1]
# (the full signed range: 4 levels at int2 instead of 3). A scale may be negative: that puts the
# range's long side (-2^(b-1)) on the group's larger-magnitude sign, measured 10-40% lower output
# error at int2/int3 on EfficientNet-Lite2 for no bytes.

GROUP_BITS = (2, 3, 4, 5, 6, 8)
GROUP_TARGET = 64
"""The group size aimed at: the divisor of n closest to it within [32, 128]; else per-channel."""


def group_range(bits: int) -> tuple[int, int]:
    if bits not in GROUP_BITS:
        raise ValueError(f"unsupported group-wise precision int{bits}; choose one of {GROUP_BITS}")
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def pick_group(n: int, target: int = GROUP_TARGET, lo: int = 32, hi: int = 128) -> int:
    """The divisor of ``n`` in [lo, hi] closest to ``target`` (log scale); ``n`` (per-channel) if none."""
    ds = [g for g in range(lo, min(hi, n) + 1) if n % g == 0]
    return min(ds, key=lambda g: (abs(math.log(g / target)), -g)) if ds else n


def check_group(n: int, group: int) -> int:
    if group <= 0 or n % group:
        raise DynError(f"group size {group} does not divide the {n} inputs of a weight row; "
                       f"give a divisor of {n} (or {n} for one scale per output channel)")
    return group


SEARCH_ELEMENTS = 2**20
"""Elements (levels x rows x inputs) of one step of the scale search: a few MB, cache-sized."""


def fp16_values(t: torch.Tensor) -> torch.Tensor:
    """``t`` rounded to fp16, held as float32, never zero (a tiny scale keeps its sign)."""
    tiny = torch.where(t < 0, -6e-8, 6e-8)
    return torch.where(t.abs() < 6e-8, tiny, t).half().float()


def group_scales(w: torch.Tensor, bits: int, group: int, search: bool = True, grid: int = 20, lowest: float = 0.3) -> torch.Tensor:
    """(m, n // group) fp16 scales of ``w`` (m, n) minimizing each group's squared rounding
    error over clipping levels (1 down to ``lowest`` of the largest |w|) and both signs; the first
    level tried wins a tie. Every level at once on a few rows at a time (``SEARCH_ELEMENTS``): one
    level at a time over the whole matrix took 4-10x longer (ViT-L/16's 1024 x 4096: 2.2 s a grid)."""
    qmin, qmax = group_range(bits)
    wg = w.detach().float().reshape(w.shape[0], -1, group)
    amax = wg.abs().amax(-1).clamp_min(1e-12) / -qmin
    fracs = torch.linspace(1.0, lowest, grid).tolist() if search else [1.0]
    levels = torch.tensor([f * sign for f in fracs for sign in (1.0, -1.0)]).view(-1, 1, 1)
    best = torch.empty_like(amax)
    rows = max(1, SEARCH_ELEMENTS // (len(levels) * wg.shape[1] * group))
    for i in range(0, wg.shape[0], rows):
        part = wg[i:i + rows]
        s = fp16_values(amax[i:i + rows] * levels)  # (levels, rows, groups)
        err = (torch.round(part / s[..., None]).clamp(qmin, qmax) * s[..., None] - part).pow(2).sum(-1)
        best[i:i + rows] = s.gather(0, err.argmin(0, keepdim=True))[0]
    return best


def expand_scales(scales: torch.Tensor, shape) -> torch.Tensor:
    """(m, n // G) scales broadcast to a weight of ``shape`` (m, *rest), row-major groups."""
    m, n = shape[0], math.prod(shape[1:])
    g = n // scales.shape[1]
    return scales.repeat_interleave(g, 1).reshape(shape)


def grid_of(weight: torch.Tensor, entry: dict, scales: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """(scale_expanded, qmin, qmax) of a quantized weight: ``round(weight / scale_expanded)``
    clamped to [qmin, qmax] are its integers. ``entry`` is its metadata (``{"bits", "group"}``;
    without "group": the per-channel symmetric grid with ``scales`` shaped (m, 1, ...))."""
    bits = int(entry["bits"])
    if "group" not in entry:
        q = qmax(bits)
        return scales.reshape([weight.shape[0]] + [1] * (weight.ndim - 1)).expand(weight.shape), -q, q
    qmin, qmx = group_range(bits)
    return expand_scales(scales.reshape(weight.shape[0], -1), weight.shape), qmin, qmx


def quantize_grouped(w: torch.Tensor, bits: int, scales: torch.Tensor) -> torch.Tensor:
    """Integers (int8, shape of ``w``) of ``w`` on the grid of ``scales`` (m, n // G)."""
    qmin, qmx = group_range(bits)
    return torch.round(w.detach().float() / expand_scales(scales, w.shape)).clamp(qmin, qmx).to(torch.int8)


def dequantize_grouped(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """float32 values of integers ``q`` (m, *rest) on the grid of ``scales`` (m, n // G)."""
    return q.float() * expand_scales(scales, q.shape)


def fake_quant_grouped(w: torch.Tensor, bits: int, group: int, scales: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(``w`` rounded to its group-wise grid, as floats; the scales (m, n // G)); scales are
    searched (``group_scales``) unless given."""
    if scales is None:
        scales = group_scales(w.reshape(w.shape[0], -1), bits, group)
    return dequantize_grouped(quantize_grouped(w, bits, scales), scales).to(w.dtype), scales


def recover_scales(t: torch.Tensor, bits: int, group: int) -> torch.Tensor | None:
    """fp16 scales (m, n // G) on whose grid ``t`` lies exactly, or None: what a reader that only
    has the float values (a .dyn read back) needs to store them again at the same bytes. Tries
    each group's largest |value| / k for k = 2^(b-1) .. 1 (q * s is exact in float32)."""
    lo, hi = group_range(bits)
    wg = t.detach().float().reshape(t.shape[0], -1, group)
    peak = wg.gather(-1, wg.abs().argmax(-1, keepdim=True))[..., 0]
    found = torch.zeros_like(peak, dtype=torch.bool)
    out = torch.ones_like(peak)
    for k in range(-lo, 0, -1):
        for sign in (1.0, -1.0):
            s = fp16_values(peak / (k * sign))
            q = torch.round(wg / s[..., None])
            ok = ((q * s[..., None] == wg) & (q >= lo) & (q <= hi)).all(-1) & ~found
            out, found = torch.where(ok, s, out), found | ok
    return out if bool(found.all()) else None


def pack_bits(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Integers in [-2^(b-1), 2^(b-1)) -> uint8, ``bits`` each, least significant bit first
    (for b = 4 the bytes of ``pack_int4``); the last byte padded with zeros' codes."""
    numel = q.numel()
    u = (q.reshape(-1).to(torch.int32) + 2 ** (bits - 1))
    u = torch.cat([u, u.new_full(((-numel) % 8,), 2 ** (bits - 1))])  # 8 values fill whole bytes
    stream = ((u[:, None] >> torch.arange(bits, dtype=torch.int32)) & 1).reshape(-1, 8)
    packed = (stream << torch.arange(8, dtype=torch.int32)).sum(1).to(torch.uint8)
    return packed[: (numel * bits + 7) // 8]


def unpack_bits(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """The inverse of ``pack_bits``: ``numel`` int8 values."""
    bitstream = ((packed[:, None] >> torch.arange(8, dtype=torch.uint8)) & 1).reshape(-1)[: numel * bits]
    u = (bitstream.reshape(numel, bits).to(torch.int16) << torch.arange(bits, dtype=torch.int16)).sum(1)
    return (u - 2 ** (bits - 1)).to(torch.int8)


def grouped_bytes(m: int, n: int, bits: int, group: int) -> int:
    """Bytes of a group-wise weight in a .dyn: packed integers and fp16 scales."""
    return (m * n * bits + 7) // 8 + 2 * m * (n // group)


@torch.no_grad()
def round_to_storage(model: torch.nn.Module, described: dict) -> dict[str, dict]:
    """Put every tensor a .dyn declares quantized (``meta["quantized"]``) back on its grid in place
    (after training moved it: fresh per-slice scales; bits 16: fp16), and return the ``quantized``
    argument for ``write_dyn``, so a rewritten file keeps its bytes."""
    state = model.state_dict()
    out = {}
    for name, info in described.items():
        t = state.get(name)
        if t is None:
            continue
        bits, keep = int(info["bits"]), tuple(info.get("keep", ()))
        if "group" in info:  # a weight training left on its grid keeps it; else fresh searched scales
            group = int(info["group"])
            values, scales = fake_quant_grouped(t, bits, group, recover_scales(t, bits, group))
            t.copy_(values)
            out[name] = {"bits": bits, "group": group, "scale": scales}
            continue
        t.copy_(t.half().to(t.dtype) if bits == 16 else fake_quant(t, bits, keep))
        out[name] = {"bits": bits, "keep": list(keep)}
    return out
