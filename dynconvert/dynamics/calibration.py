"""Calibration: what a layer's inputs look like, and how far a replacement moves its outputs.

Both routes that fit layers to their outputs go through here: a ratio conversion with ``--calib``
(conversion.py, ``fit.refine_on_outputs``) and a byte budget (``--size``, budget/outputs.py).

- ``collect_moments``: one pass (or one per network, paired) over the calibration batches that
  accumulates each layer's input second moment C = E[x x'] (MHA projections too:
  ``attention.input_taps``); ``input_vectors`` gives the vectors a layer's weight multiplies.
- ``whitener``: L with L L' = C, so that the output error of a weight error E is
  tr(E C E') = ||E L||^2.
- ``output_error``: that error, absolute or relative.

The descent of a calibrated fit is ``fit.fit_outputs``, one level up (it shares the fits' loop).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import DynError
from .attention import input_taps

TRACE_KEPT = 1 - 1e-6
"""The ratio route's whitener keeps the eigen-directions that hold this much of C's trace."""


# ---------------------------------------------------------------- input vectors and moments


def input_vectors(layer: nn.Module, x: torch.Tensor, limit: int | None = None,
                  gen: torch.Generator | None = None) -> torch.Tensor:
    """The vectors the layer's weight matrix multiplies, (samples, n): every one (``limit=None``), or
    up to ``limit`` sampled with ``gen``.

    A conv's vectors are its patches; a grouped conv's groups are extra samples (the rows of every
    group see the same input states). Sampled conv positions are the same for the same generator
    state, and only their patches are built, so early high-resolution layers cost no more than late
    ones; ``limit=None`` unfolds the whole input, in ``F.unfold``'s order.
    """
    linear = layer is None or isinstance(layer, nn.Linear)  # None: an MHA projection (attention.input_taps)
    if limit is None:
        if linear:
            return x.reshape(-1, x.shape[-1])
        cols = F.unfold(x, layer.kernel_size, layer.dilation, layer.padding, layer.stride)
        n = cols.shape[1] // layer.groups
        return cols.reshape(x.shape[0], layer.groups, n, -1).permute(0, 1, 3, 2).reshape(-1, n)
    pointwise = isinstance(layer, nn.Conv2d) and tuple(layer.kernel_size) == (1, 1) and tuple(layer.stride) == (1, 1) \
        and layer.groups == 1
    if linear or pointwise:
        v = x.reshape(-1, x.shape[-1]) if linear else x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
        return v[torch.randperm(v.shape[0], generator=gen)[:limit]] if v.shape[0] > limit else v
    kh, kw = layer.kernel_size
    # patches at sampled output positions only: unfolding a whole early feature map costs gigabytes
    (sh, sw), (dh, dw) = layer.stride, layer.dilation
    pad = layer.padding if isinstance(layer.padding, tuple) else (0, 0)  # "same"/"valid" strings: none here
    if x.shape[2] + 2 * pad[0] < dh * (kh - 1) + 1 or x.shape[3] + 2 * pad[1] < dw * (kw - 1) + 1:
        # smaller than the kernel: a Conv2d subclass that pads in its own forward ("same" padding,
        # as EfficientNet's) on a small input; pad the same way so there are patches to sample
        pad = (dh * (kh - 1) // 2 + 1, dw * (kw - 1) // 2 + 1)
    xp = F.pad(x, (pad[1], pad[1], pad[0], pad[0]))
    b, ch, hp, wp = xp.shape
    oh, ow = (hp - dh * (kh - 1) - 1) // sh + 1, (wp - dw * (kw - 1) - 1) // sw + 1
    take = max(1, min(oh * ow, limit // max(b * layer.groups, 1)))
    pos = torch.randperm(oh * ow, generator=gen)[:take]
    rows, cols = (pos // ow) * sh, (pos % ow) * sw
    patches = torch.stack([xp[:, :, rows + i * dh, cols + j * dw] for i in range(kh) for j in range(kw)], 2)  # b, ch, k, P
    n = ch // layer.groups * kh * kw
    return patches.reshape(b, layer.groups, n, take).permute(0, 1, 3, 2).reshape(-1, n)


def layer_inputs(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Every vector the layer's weight matrix multiplies: ``input_vectors`` without a limit."""
    return input_vectors(layer, x)


class _Stop(Exception):
    """Raised by a hook to end a forward pass early, once the layers of interest have run."""


@dataclass
class Moments:
    """Second moments of one layer's inputs: ``own`` = E[x~ x~'], ``cross`` = E[x x~'] (original x)."""

    own: torch.Tensor
    cross: torch.Tensor
    count: int


@torch.no_grad()
def collect_moments(
    units,
    batches,
    current: nn.Module,
    original: nn.Module | None = None,
    *,
    stop_after: str | None = None,
    limit: int | None = 2048,
    shrink: bool = True,
    wide: bool = True,
) -> dict[str, Moments]:
    """Moments of every layer named in ``units`` (names in ``current``; MHA projections too, see
    ``attention.input_taps``) over ``batches`` (input tensors, or (input, label) pairs), the
    networks in the mode they are in. Layers no forward reached are absent.

    With ``original`` (the uncompressed network, same layer names), ``cross`` pairs the original
    inputs with the current ones at the same sampled positions; without it ``cross = own``.
    ``stop_after``: a layer once whose input is taken the forward passes stop (nothing later is needed).
    ``limit``: vectors per layer and batch (``input_vectors``); ``shrink``: C pulled towards a
    multiple of I (``shrink_``). A budget samples 2048 and shrinks (few vectors per dimension, and a
    fit exact on them is wrong elsewhere); a ratio conversion's ``--calib`` (``input_moments``)
    takes every vector, in float64, unshrunk, as its files have always been made. ``wide`` False:
    sampled products summed in float32 (one batch of a few images: nothing to sum over, and a
    4096-wide float64 sum is 128 MB; budget/affordable.py).
    """
    if not units:  # nothing to calibrate: no pass
        return {}
    acc: dict[tuple[str, ...], list] = {}
    seen: dict[str, torch.Tensor] = {}

    def tap(keep: bool, counter: list):
        def record(names, layer, x):
            gen = None if limit is None else torch.Generator().manual_seed(1000 * counter[0] + len(names[0]))
            v = input_vectors(layer, x, limit, gen)
            if keep:
                seen.update((n, v) for n in names)
            else:
                # the layers in ``names`` multiply this same tensor (q, k, v of a self-attention):
                # one accumulator, so one set of moments and one whitening for all of them
                refs = [seen.pop(n, None) for n in names]
                if limit is None:  # every vector: float64 products
                    v, refs = v.double(), [r if r is None else r.double() for r in refs]
                    own = v.T @ v
                else:
                    own = v.T @ v  # float32 products (half the time), summed over batches in float64
                    own = own.double() if wide else own
                a = acc.setdefault(tuple(names), [0, 0, 0])
                if isinstance(a[0], torch.Tensor):  # summed in place: a 4096-wide sum is 128 MB
                    a[0] += own
                else:
                    a[0] = own
                if original is not None:  # without one, cross is own: not summed twice
                    a[1] = a[1] + (own if refs[0] is None else (refs[0].T @ v).to(own.dtype))
                a[2] += v.shape[0]
            if stop_after in names:
                raise _Stop
        return record

    counter = [0]
    nets = [(original, True), (current, False)] if original is not None else [(current, False)]
    for batch in batches:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        counter[0] += 1
        for net, keep in nets:
            with input_taps(net, list(units), tap(keep, counter)):
                try:
                    net(x)
                except _Stop:
                    pass
    out = {}
    for names in list(acc):  # each float64 sum freed as soon as its moments are made, in place
        own, cross, count = acc.pop(names)  # cross: 0 without an original (own stands for it)
        own = own.div_(count)
        if not shrink:
            own_s = own.float()
            moments = Moments(own_s, (cross / count).float() if original is not None else own_s, count)
        else:
            level = float(own.diagonal().mean())
            own_s = shrink_(own, count, level).float()
            moments = Moments(own_s, shrink_(cross / count, count, level).float() if original is not None else own_s,
                              count)
        out.update((n, moments) for n in names)
    return out


def input_moments(model: nn.Module, layers: dict[str, nn.Module], batches) -> dict[str, torch.Tensor]:
    """E[v v'] of each named layer's input vectors over the calibration batches, taken on the
    original model in one pass: what a ratio conversion's ``--calib`` fits to (``collect_moments``
    with every vector, unshrunk)."""
    if not layers:  # nothing to calibrate (every layer skipped): no pass, and no claim that the data was empty
        return {}
    was_training = model.training
    model.eval()
    try:
        moments = collect_moments(layers, batches, model, limit=None, shrink=False)
    finally:
        model.train(was_training)
    if not moments:
        raise DynError("the calibration data gave no batches; pass a dataset with at least one image")
    return {name: m.own for name, m in moments.items()}


def shrink_(c: torch.Tensor, count: int, level: float) -> torch.Tensor:
    """C pulled towards ``level`` x I by n / (n + samples), in place: a classifier sees one vector
    per image, and a fit to a few hundred samples of a 1280-dimensional input would otherwise be
    exact on them and wrong on everything else. The cross moment is shrunk alike, so that W* stays
    W where the compressed upstream changed nothing."""
    n = c.shape[0]
    alpha = n / (n + count)
    c.mul_(1 - alpha).diagonal().add_(alpha * level)
    return c


def execution_order(model: nn.Module, names: list[str], example: torch.Tensor) -> list[str]:
    """``names`` in the order a forward pass first uses them (unreached layers last)."""
    order = used_in_order(model, names, example)
    return order + [n for n in names if n not in order]


def used_in_order(model: nn.Module, names: list[str], example: torch.Tensor) -> list[str]:
    """The ``names`` a forward pass on ``example`` uses, in the order it first uses them."""
    order: list[str] = []
    with torch.no_grad(), input_taps(model, names, lambda used, layer, x: order.extend(n for n in used if n not in order)):
        model(example)
    return order


# ---------------------------------------------------------------- whitening and the output error


def damped(c: torch.Tensor, rel: float = 1e-4) -> torch.Tensor:
    """C + ``rel`` x its mean diagonal x I."""
    d = rel * c.diagonal().mean().clamp_min(1e-12)
    return c + d * torch.eye(c.shape[0], dtype=c.dtype)


def keep_last(fn):
    """Keep ``fn``'s last result while it is called again on the very same, unmodified tensors: a
    layer's candidates all whiten with the same C and start from the same whitened SVD, and
    those decompositions of a 4608-wide moment (a ResNet 3x3 conv) take tens of seconds."""
    last: list = []

    @functools.wraps(fn)
    def wrapper(*args):
        key = tuple((id(a), a._version) if isinstance(a, torch.Tensor) else a for a in args)
        if last and last[0][0] == key and all(x is y for x, y in zip(last[0][1], args)):
            return last[0][2]
        result = fn(*args)
        last[:] = [(key, args, result)]  # holding the tensors keeps their ids from being reused
        return result
    return wrapper


@keep_last
def whitener(c: torch.Tensor, rel: float = 1e-4, keep: float | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(L, L^-1) with L L' = C + ``rel`` x mean diagonal x I (``damped``; 0: C itself), from the
    eigen-decomposition (L = E sqrt(Lambda)). ``keep``: instead (L, None), L only the leading
    eigen-directions holding ``keep`` of the trace (n x k).

    The budget's fits map a whitened SVD back through L^-1, so they damp (C must be invertible) and
    keep every direction; a ratio conversion's calibrated fit only multiplies by L, so it drops the
    directions the inputs never take instead (``input_whitener``: fewer columns, nothing damped).
    """
    evals, evecs = torch.linalg.eigh(damped(c.double(), rel) if rel else c.double())
    if keep is None:
        root = evals.clamp_min(1e-30).sqrt()
        return (evecs * root).float(), (evecs / root).T.float()
    evals, evecs = evals.clamp_min(0).flip(0), evecs.flip(1)  # largest first
    cum = evals.cumsum(0) / evals.sum().clamp_min(1e-30)
    k = int((cum < keep).sum()) + 1
    return (evecs[:, :k] * evals[:k].sqrt()).float(), None


def input_whitener(moment: torch.Tensor, keep: float = TRACE_KEPT) -> torch.Tensor:
    """The ratio route's L (L L' ~= C, truncated to ``keep`` of the trace, undamped): ``whitener``."""
    return whitener(moment, 0.0, keep)[0]


def output_error(target: torch.Tensor, approx: torch.Tensor, c: torch.Tensor | None = None, *,
                 whitener: torch.Tensor | None = None) -> float:
    """How far ``approx`` in place of ``target`` (m x n) moves the layer's outputs on inputs of
    second moment C, E = approx - target.

    With ``c``: tr(E C E'), the mean squared output error summed over channels: E C in float32
    (ViT-L/16's 97 layers x 9 candidates: about 10 TFLOP, twice as long in float64), summed in
    float64 (a budget adds it over a unit's parts and compares it across candidates). With ``whitener`` L
    (L L' ~= C): ||E L|| / ||target L||, relative (a ratio conversion's per-layer figure, measured
    with the L its fit used).
    """
    if whitener is not None:
        goal = target @ whitener
        return float((goal - approx @ whitener).norm() / goal.norm().clamp_min(1e-30))
    e = (approx - target).float()
    return float(((e @ c.float()) * e).double().sum().clamp_min(0))


def output_rel_error(target: torch.Tensor, approx: torch.Tensor, whitener: torch.Tensor) -> float:
    """Relative error of the outputs ``x @ W'`` over the calibration inputs (``output_error`` with a whitener)."""
    return output_error(target, approx, whitener=whitener)
