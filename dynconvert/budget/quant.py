"""Symmetric integer quantization of tensors: the precision a stored tensor can have.

A quantized tensor keeps one scale per slice along the dimensions in ``keep`` (for a dense
weight ``keep=(0,)``: one scale per output channel; for states ``(H, m, d)`` ``keep=(0, 1)``: one
per sub-model state vector) and integers in ``[-(2^(b-1) - 1), 2^(b-1) - 1]``. In memory a
quantized tensor is held dequantized (``fake_quant``: float values on the integer grid), so every
measurement sees exactly what a saved file will hold; the .dyn writer stores the integers.
"""

from __future__ import annotations

import torch

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
        t.copy_(t.half().to(t.dtype) if bits == 16 else fake_quant(t, bits, keep))
        out[name] = {"bits": bits, "keep": list(keep)}
    return out
