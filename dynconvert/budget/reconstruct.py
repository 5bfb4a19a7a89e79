"""Block-wise reconstruction: after the sequential per-layer fit, each block of the compressed
network is tuned to reproduce the *original* block's output (BRECQ, Li et al. 2021).

**Blocks** (blocks.py): the residual/MBConv blocks, transformer encoder layers and lone stem or
head layers holding compressed layers, visited in execution order; a block called other than
exactly once per forward pass is left alone.

**What is tuned**, inside one block at a time, on its inputs in the network compressed so far:

- every integer weight (``quantized`` entries with a ``scale``) learns its rounding (AdaRound,
  Nagel et al. 2020): ``W = s * clamp(b + h(v), qmin, qmax)``, ``h`` a stretched sigmoid from the
  fitted integer towards the original weight (``_AdaRound``) pulled to 0 or 1 by an annealed
  regularizer, rounded at the end: the weight ends on its grid (per channel or group-wise);
- dynamics states (int8, one scale per state vector) and their couplings and offsets, with the
  states rounded on the forward pass (straight-through gradients).

**QDrop** (Wei et al. 2022): each element of the block's input is taken from the original
network with probability ``qdrop``, otherwise from the compressed one, so that the block does not
learn to undo one particular upstream error (a flatter optimum that generalizes).

**Int8-only blocks are left as fitted.** A block whose compressed weights are all on 8-bit grids
(no lower grid, no states) is not tuned: at 8 bits a rounding step moves a weight by under 1% of
its channel's largest, and on EfficientNet-Lite2 at ``--size 1/4`` (47 int8 layers) 16 of the 18
blocks tuned got worse on the held-apart images and were put back, the mean block error unchanged
at 0.00024, for 269 s of a 572 s conversion (ViT-B/16 at 1/4: 5 of its 12 encoder layers, each
about 90 s of tuning).

**Held apart.** The block's output error is measured before and after on images the tuning never
saw; a block whose held-apart error got worse is put back as it was (early stopping at the
granularity of blocks).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.utils.parametrize as P

from .augment import augment, held_apart
from .blocks import block_io, find_blocks, rel_error, run_block, trace
from ..errors import DynError
from . import quant
from .quant import fake_quant

GAMMA, ZETA = -0.1, 1.1
"""AdaRound's stretch of the sigmoid, so that h reaches exactly 0 and 1."""


@dataclass
class ReconOptions:
    iters: int = 100
    """Optimizer steps per block (0: no reconstruction)."""
    batch: int = 16
    lr: float = 1e-2
    """Adam step for the rounding variables; states and couplings take ``state_lr``."""
    state_lr: float = 1e-3
    reg_weight: float = 0.01
    warmup: float = 0.2
    """Share of the steps without the rounding regularizer."""
    qdrop: float = 0.5
    seed: int = 0


def grid(weight: torch.Tensor, entry: dict) -> tuple[torch.Tensor, int, int]:
    """(scale broadcast to the weight's shape, qmin, qmax) of a weight stored as integers (per
    channel or group-wise: quant.grid_of)."""
    return quant.grid_of(weight, entry, entry["scale"])


class _AdaRound(nn.Module):
    """The weight with learned rounding (a parametrization), from the fitted (GPTQ) integers one
    step at most towards the original ``w0`` (AdaRound's floor/ceil when the fit is nearest);
    from w0 itself GPTQ's choices were lost (Lite2: a block's error 0.0116 -> 0.0496)."""

    def __init__(self, w0: torch.Tensor, fitted: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int):
        super().__init__()
        self.scale, self.qmin, self.qmax = scale, qmin, qmax
        q = torch.round(fitted.detach().float() / scale).clamp(qmin, qmax)
        x = w0.detach().float() / scale
        up = x > q  # the original lies above the fitted level
        self.base = torch.where(up, q, q - 1)
        # h at the start: as near the original as keeps the fitted integer (h < 0.5 rounds to base)
        rest = x - self.base
        start = torch.where(up, rest.clamp(0.01, 0.49), rest.clamp(0.51, 0.99))
        self.v = nn.Parameter(torch.log((start - GAMMA) / (ZETA - start)))
        self.hard = False

    def h(self) -> torch.Tensor:
        return (torch.sigmoid(self.v) * (ZETA - GAMMA) + GAMMA).clamp(0, 1)

    def forward(self, _):
        h = (self.v >= 0).float() if self.hard else self.h()
        return self.scale * torch.clamp(self.base + h, self.qmin, self.qmax)

    def regularizer(self, beta: float) -> torch.Tensor:
        return (1 - (2 * self.h() - 1).abs().pow(beta)).sum()


class _STE(nn.Module):
    """Parametrization: rounded to its int grid on the way forward, identity on the way back."""

    def __init__(self, bits: int, keep: tuple[int, ...]):
        super().__init__()
        self.bits, self.keep = bits, keep

    def forward(self, t):
        return t + (fake_quant(t.detach(), self.bits, self.keep) - t.detach())


def _tunables(block: nn.Module, prefix: str, original: dict, quantized: dict):
    """Register the parametrizations of one block; returns (rounders, [(module, attr)], state params)."""
    rounders, registered, floats = [], [], []
    for name, module in block.named_modules(prefix=prefix):
        key = f"{name}.weight"
        entry = quantized.get(key)
        if entry is not None and isinstance(entry.get("scale"), torch.Tensor) and key in original:
            scale, lo, hi = grid(module.weight, entry)
            r = _AdaRound(original[key], module.weight, scale, lo, hi)
            P.register_parametrization(module, "weight", r, unsafe=True)
            rounders.append(r)
            registered.append((module, "weight"))
            continue
        for attr in ("states_out", "states_in"):
            entry = quantized.get(f"{name}.{attr}")
            if entry is not None and "scale" not in entry and int(entry["bits"]) in (4, 8):
                P.register_parametrization(module, attr, _STE(int(entry["bits"]), tuple(entry.get("keep", (0,)))))
                registered.append((module, attr))
                floats.append(getattr(module.parametrizations, attr).original)
        if any(f"{name}.{a}" in quantized for a in ("states_out", "states_in")):
            floats += [p for a, p in module.named_parameters(recurse=False) if a in ("coupling", "offset")]
    return rounders, registered, floats


def below_int8(block: str, quantized: dict) -> bool:
    """Whether the block named ``block`` holds something to tune: a weight on a grid below 8 bits,
    or dynamics states (their own int8 grid is tuned with their couplings)."""
    inside = [(k, e) for k, e in quantized.items() if k.startswith(block + ".")]
    return any(k.endswith((".states_out", ".states_in")) or int(e.get("bits", 16)) < 8 for k, e in inside)


def reconstruct(model: nn.Module, original: nn.Module, images: torch.Tensor, quantized: dict, *,
                held: torch.Tensor | None = None, options: ReconOptions | None = None,
                on_progress=None, on_note=None) -> dict:
    """Tune ``model`` (compressed, in place) block by block towards ``original`` on ``images``
    (one tensor, N x ...); ``held``: images to measure on only. ``quantized``: the conversion's
    storage description (weights with their ``scale``; states). Returns a summary per block."""
    opts = options or ReconOptions()
    progress = on_progress or (lambda *a: None)
    note = on_note or (lambda *a: None)
    held = images[:0] if held is None else held
    weights = {k[: -len(".weight")] for k, e in quantized.items() if k.endswith(".weight") and "scale" in e}
    states = {k.rsplit(".", 1)[0] for k in quantized if k.endswith((".states_out", ".states_in"))}
    blocks = find_blocks(model, weights | states)
    names = [n for n in blocks if below_int8(n, quantized)]
    if opts.iters <= 0 or not names or len(images) == 0:
        return {"blocks": [], "seconds": 0.0, "images": len(images), "held_apart": len(held), "iters": opts.iters,
                "int8_only": len(blocks) - len(names) if opts.iters > 0 else 0}
    if len(names) < len(blocks):
        note(f"{len(blocks) - len(names)} of {len(blocks)} blocks hold 8-bit weights only: left as fitted")
    gen = torch.Generator().manual_seed(opts.seed)
    modules, originals = dict(model.named_modules()), dict(original.named_modules())
    original_weights = {k: v for k, v in original.state_dict().items() if k in quantized}
    pool = torch.cat([images, held])
    n_fit = len(images)
    traced = trace(original, names, images[:1])
    rows, start = [], time.perf_counter()
    y_orig = y_comp = None
    for i, name in enumerate(names):
        once, chained, kwargs = traced[i]
        block, reference = modules[name], originals[name]
        if not once:
            rows.append(dict(block=name, skipped="not called exactly once per forward pass with one tensor"))
            y_orig = y_comp = None
            continue
        if chained and y_orig is not None:
            x_orig, x_comp = y_orig, y_comp
            y_orig = run_block(reference, x_orig, kwargs)
        else:
            x_orig, y_orig = block_io(original, reference, pool)
            x_comp, _ = block_io(model, block, pool)
        before = run_block(block, x_comp, kwargs)
        saved = {k: v.clone() for k, v in block.state_dict().items()}
        err_before = (rel_error(before[:n_fit], y_orig[:n_fit]), rel_error(before[n_fit:], y_orig[n_fit:]))
        rounders, registered, floats = _tunables(block, name, original_weights, quantized)
        groups = [{"params": [r.v for r in rounders], "lr": opts.lr}] if rounders else []
        groups += [{"params": [p], "lr": opts.state_lr * float(p.detach().abs().mean().clamp_min(1e-8))} for p in floats]
        try:
            if groups:
                _tune(block, kwargs, x_orig[:n_fit], x_comp[:n_fit], y_orig[:n_fit], rounders, groups, opts, gen)
        finally:
            for r in rounders:
                r.hard = True
            for module, attr in registered:
                P.remove_parametrizations(module, attr, leave_parametrized=True)
            for p in block.parameters():
                p.requires_grad_(False)
        after = run_block(block, x_comp, kwargs)
        err_after = (rel_error(after[:n_fit], y_orig[:n_fit]), rel_error(after[n_fit:], y_orig[n_fit:]))
        judged = 1 if len(held) else 0
        kept = not err_after[judged] > err_before[judged]
        if not kept:  # worse where it is judged: put the block back as the sequential fit left it
            block.load_state_dict(saved)
            after = before
        y_comp = after
        rows.append(dict(block=name, tuned=len(rounders) + len(floats), fit_before=err_before[0], fit_after=err_after[0],
                         held_before=err_before[1], held_after=err_after[1], kept=kept))
        note(f"block {name}: output error {err_before[0]:.4f} -> {err_after[0]:.4f}"
             + (f", held apart {err_before[1]:.4f} -> {err_after[1]:.4f}" if len(held) else "")
             + ("" if kept else " (worse: left as fitted)"))
        progress("reconstructing blocks", i + 1, len(names))
    return {"blocks": rows, "seconds": time.perf_counter() - start, "images": n_fit, "held_apart": len(held),
            "iters": opts.iters, "int8_only": len(blocks) - len(names)}


def _mean(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return round(sum(values) / len(values), 5) if values else None


def _tune(block, kwargs, x_orig, x_comp, target, rounders, groups, opts: ReconOptions, gen) -> None:
    for r in rounders:
        r.v.requires_grad_(True)
    for g in groups[1 if rounders else 0:]:
        g["params"][0].requires_grad_(True)
    opt = torch.optim.Adam(groups)
    scale = target.pow(2).mean().clamp_min(1e-30)
    count = sum(r.v.numel() for r in rounders)
    for it in range(opts.iters):
        idx = torch.randint(len(x_comp), (min(opts.batch, len(x_comp)),), generator=gen)
        x = x_comp[idx]
        if opts.qdrop > 0:
            x = torch.where(torch.rand(x.shape, generator=gen) < opts.qdrop, x_orig[idx], x)
        loss = (block(x, **kwargs) - target[idx]).pow(2).mean() / scale
        done = it / opts.iters
        if rounders and done >= opts.warmup:
            beta = 20 + (2 - 20) * (done - opts.warmup) / (1 - opts.warmup)
            loss = loss + opts.reg_weight * sum(r.regularizer(beta) for r in rounders) / count
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def reconstruct_after_fit(model: nn.Module, original: nn.Module, batches, quantized: dict, *, iters: int,
                          augmented: int = 0, seed: int = 0, on_progress=None, on_note=None) -> dict | None:
    """The budget pipeline's stage after the sequential fit: hold a slice of the calibration
    images apart, add ``augmented`` augmented images to the rest, reconstruct. None when off."""
    if iters <= 0:
        return None
    images = torch.cat([b[0] if isinstance(b, (tuple, list)) else b for b in batches])
    fit, held = held_apart(images)
    if augmented > 0:
        fit = torch.cat([fit, augment(fit, augmented, seed=seed)])
    if not len(held) and on_note:
        on_note(f"block reconstruction: only {len(images)} calibration images, none held apart "
                "(blocks are kept when their error on the fitting images falls)")
    out = reconstruct(model, original, fit, quantized, held=held, options=ReconOptions(iters=iters, seed=seed),
                      on_progress=on_progress, on_note=on_note)
    rows = [r for r in out["blocks"] if "kept" in r]
    # compact: it goes into the .dyn's metadata, whose bytes the budget counts
    return dict(iters=iters, blocks=len(rows), kept=sum(r["kept"] for r in rows), int8_only=out["int8_only"],
                images=out["images"],
                augmented=augmented, held_apart=out["held_apart"], seconds=round(out["seconds"], 1),
                **{f"mean_{k}_before": _mean(rows, f"{k}_before") for k in ("fit", "held")},
                **{f"mean_{k}_after": _mean([{"v": r[f"{k}_after" if r["kept"] else f"{k}_before"]} for r in rows], "v")
                   for k in ("fit", "held")})


RECONSTRUCT_ITERS = 100
"""Default steps per block of the block-wise reconstruction after a budgeted fit on images."""


def reconstruct_iters(reconstruct: int | None, images: bool) -> int:
    """Steps per block of the block-wise reconstruction: on by default only on real images."""
    if reconstruct is not None and reconstruct < 0:
        raise DynError(f"reconstruction steps {reconstruct} must be 0 (off) or more")
    return (RECONSTRUCT_ITERS if images else 0) if reconstruct is None else reconstruct
