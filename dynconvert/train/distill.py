"""Distillation on unlabeled inputs: the compressed network learns to give the original's outputs.

No labels: the loss is the teacher's softened output distribution against the student's
(KL, Hinton et al.), on the same calibration inputs the conversion used (random crops of the
user's images, or synthetic ones). Everything floating in the student trains: states, couplings,
dense weights, biases and BatchNorm affine parameters (BatchNorm statistics stay frozen: the
network runs in eval mode, so a few hundred images cannot skew them).

With ``augment=True`` every step draws a fresh batch of augmented images (random resized crops,
flips, colour jitter, pasted crops of other images: ``budget/augment.py``) from the inputs and the
teacher labels them on the fly, so a few hundred crops are not memorized; a slice of the inputs is
held apart, the loss on it is measured every ``check_every`` steps, and the weights that scored
best there are the ones kept (early stopping).

With ``features > 0`` every block's output (the blocks of the block-wise reconstruction,
``budget/blocks.find_blocks``) is matched to the teacher's as well, a relative squared error
averaged over the blocks and weighted by ``features`` beside the KL: many numbers per image
instead of one distribution, the same signal the reconstruction fits block by block, here end
to end, so that the errors the blocks pass on are corrected where they add up.

Quantized tensors stay quantized while they train: each is rounded to its grid on the forward
pass and passes gradients straight through (STE), with the scales the conversion chose; so
after distillation the file holds exactly what was trained, at the same bytes.
"""

from __future__ import annotations

import math
import time
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.nn.utils.parametrize as P

from ..budget.augment import augment as augmented, held_apart
from ..budget.blocks import find_blocks
from ..errors import DynError
from ..budget.quant import dequantize, grid_of, quantize


class _OnGroups(nn.Module):
    """Parametrization: a group-wise weight rounded to its fixed grid (straight-through gradient)."""

    def __init__(self, entry: dict, scales: torch.Tensor):
        super().__init__()
        self.entry, self.scales = entry, scales

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        scale, lo, hi = grid_of(t, self.entry, self.scales)
        return t + (torch.round(t / scale).clamp(lo, hi) * scale - t).detach()


class _OnGrid(nn.Module):
    """Parametrization: the tensor rounded to its integer grid (straight-through gradient)."""

    def __init__(self, bits: int, keep: tuple[int, ...], scale: torch.Tensor | None):
        super().__init__()
        self.bits, self.keep, self.fixed = bits, keep, scale

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        if self.bits == 16:  # stored as fp16
            return t + (t.half().to(t.dtype) - t).detach()
        on_grid = dequantize(*quantize(t, self.bits, self.keep, self.fixed)).to(t.dtype)
        return t + (on_grid - t).detach()


class _Taps:
    """The outputs of the named modules in the last forward pass (for block-output matching)."""

    def __init__(self, model: nn.Module, names: list[str]):
        self.out: dict[str, torch.Tensor] = {}
        self.hooks = [model.get_submodule(n).register_forward_hook(self._keep(n)) for n in names]

    def _keep(self, name: str):
        def hook(module, args, out):
            if isinstance(out, torch.Tensor):
                self.out[name] = out
        return hook

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()


def _matched_blocks(model: nn.Module, teacher: nn.Module, quantized: dict) -> list[str]:
    """The blocks of the compressed layers (every Conv2d/Linear of a plain student) that the
    teacher has under the same name."""
    layers = [_split(n)[0] for n in quantized] or [n for n, m in model.named_modules()
                                                    if isinstance(m, (nn.Conv2d, nn.Linear))]
    in_teacher = dict(teacher.named_modules())
    return [n for n in find_blocks(model, layers) if n in in_teacher]


def _feature_loss(student: _Taps, teacher: _Taps) -> torch.Tensor:
    """Relative squared error of each block's output against the teacher's, averaged over blocks."""
    pairs = [(s, teacher.out[n]) for n, s in student.out.items() if n in teacher.out and s.shape == teacher.out[n].shape]
    return sum(((s - t) ** 2).mean() / ((t ** 2).mean() + 1e-12) for s, t in pairs) / max(1, len(pairs))


def _split(name: str) -> tuple[str, str]:
    module, _, attr = name.rpartition(".")
    return module, attr


def distill(
    student,
    teacher: nn.Module,
    batches: list[torch.Tensor],
    *,
    seconds: float | None = 600.0,
    steps: int | None = None,
    lr: float = 1e-4,
    temperature: float = 1.0,
    batch_size: int = 16,
    seed: int = 0,
    augment: bool = False,
    check_every: int = 50,
    features: float = 0.0,
    on_log: Callable[[str], None] | None = None,
) -> dict:
    """Train ``student`` (an nn.Module, or a ``Conversion`` whose quantized tensors then stay on
    their grid) to match ``teacher`` on ``batches``, in place, for ``seconds`` of wall time or
    ``steps`` steps, whichever ends first. ``augment``: fresh augmented batches and a held-apart
    slice (see the module doc). Returns {"steps", "seconds", "first_loss", "last_loss"}, with
    ``augment`` also "held_apart" (images), "held_first" and "held_best" (their loss).
    ``features``: the weight of block-output matching beside the KL (see the module doc; 0: off).
    """
    quantized = getattr(student, "quantized", None) or {}
    model: nn.Module = getattr(student, "model", student)
    if seconds is None and steps is None:
        raise DynError("distill needs a time budget (seconds) or a step count")
    inputs = torch.cat([b[0] if isinstance(b, (tuple, list)) else b for b in batches])
    if len(inputs) == 0:
        raise DynError("distillation needs at least one input image")
    teacher.eval().requires_grad_(False)
    held = inputs[:0]
    if augment:
        inputs, held = held_apart(inputs)
    # with augmentation or block matching the teacher labels each batch as it is drawn (and records
    # its block outputs); only plain distillation labels the inputs once, up front
    each_batch = augment or features > 0
    with torch.no_grad():
        targets = None if each_batch else torch.cat([teacher(inputs[i:i + 64]) for i in range(0, len(inputs), 64)])
        held_targets = torch.cat([teacher(held[i:i + 64]) for i in range(0, len(held), 64)]) if len(held) else None
    registered = []
    for name, spec in quantized.items():
        module_name, attr = _split(name)
        module = model.get_submodule(module_name)
        if "group" in spec:  # group-wise: its scales stay as fitted
            P.register_parametrization(module, attr, _OnGroups(spec, spec["scale"].detach().float()))
            registered.append((module, attr))
            continue
        keep = tuple(spec.get("keep", [0] if spec["bits"] != 16 else []))
        scale = spec.get("scale")
        if isinstance(scale, torch.Tensor):
            t = getattr(module, attr)
            scale = scale.detach().float().reshape([t.shape[i] if i in keep else 1 for i in range(t.ndim)])
        else:
            scale = None
        P.register_parametrization(module, attr, _OnGrid(int(spec["bits"]), keep, scale))
        registered.append((module, attr))
    params = [p for p in model.parameters() if p.is_floating_point()]
    for p in params:
        p.requires_grad_(True)
    taps = None
    if features > 0:
        blocks = _matched_blocks(model, teacher, quantized)
        taps = (_Taps(model, blocks), _Taps(teacher, blocks))
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    model.eval()
    start = time.perf_counter()
    total = steps if steps is not None else math.inf
    step, first, last = 0, None, None
    t = temperature

    def kl(out, target):
        return F.kl_div(F.log_softmax(out / t, 1), F.log_softmax(target / t, 1), log_target=True, reduction="batchmean") * t * t

    def held_loss() -> float:
        with torch.no_grad():
            return float(sum(kl(model(held[i:i + 64]), held_targets[i:i + 64]) * len(held[i:i + 64])
                             for i in range(0, len(held), 64)) / len(held))

    held_first = best_held = held_loss() if len(held) else None
    best = [p.detach().clone() for p in params] if len(held) else None
    try:
        while step < total and (seconds is None or time.perf_counter() - start < seconds):
            if augment:
                x = augmented(inputs, min(batch_size, len(inputs)), gen=gen)
            else:
                idx = torch.randint(len(inputs), (min(batch_size, len(inputs)),), generator=gen)
                x = inputs[idx]
            if each_batch:
                with torch.no_grad():
                    target = teacher(x)
            else:
                target = targets[idx]
            loss = kl(model(x), target)
            if taps:
                loss = loss + features * _feature_loss(*taps)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise DynError(f"distillation diverged (loss {value} at step {step}); try a smaller lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            first = value if first is None else first
            last = value
            if on_log and (step == 1 or step % 10 == 0):
                on_log(f"distill step {step}: loss {value:.4f} ({time.perf_counter() - start:.0f} s)")
            if best is not None and step % check_every == 0:
                now = held_loss()
                if on_log:
                    on_log(f"distill step {step}: held-apart loss {now:.4f} (best {min(now, best_held):.4f})")
                if now < best_held:
                    best_held, best = now, [p.detach().clone() for p in params]
        if best is not None and held_loss() > best_held:  # early stopping: the best on held-apart images
            with torch.no_grad():
                for p, b in zip(params, best):
                    p.copy_(b)
    finally:
        for tap in taps or ():
            tap.remove()
        for module, attr in registered:  # keep the rounded values: what the file will hold
            P.remove_parametrizations(module, attr, leave_parametrized=True)
        for p in model.parameters():
            p.requires_grad_(False)
    out = {"steps": step, "seconds": time.perf_counter() - start, "first_loss": first, "last_loss": last}
    if augment:
        out.update(held_apart=len(held), held_first=held_first, held_best=best_held)
    return out
