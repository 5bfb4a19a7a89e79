"""Output-aware fitting: each layer reproduces its *outputs* on calibration inputs, not its weights.

For a layer ``W`` (m x n) whose input vectors are ``x`` in the original network and ``x~`` in the
network compressed so far, the output error of a replacement ``W^`` is

    E ||W x - W^ x~||^2 = const + tr((W^ - W*) C (W^ - W*)'),   C = E[x~ x~'],  W* = W E[x x~'] C^-1

so every fit below minimizes a weighted error ``||(W^ - W*) L||`` with ``L L' = C``: the target
``W*`` also corrects what the compressed upstream changed (GPTQ fits on compressed inputs; this
goes one step further and aims at the original outputs). With ``x~ = x`` it is ``W`` itself.

Three representations are fitted this way:

- ``gptq_quantize``: dense integer weights (one scale per row, or per group of inputs), rounded
  column by column, each error pushed onto the columns not yet rounded (Frantar et al., GPTQ).
- ``fit_states``: dynamics states (sql2 metric): the closed-form start is the truncated SVD of
  ``W* L`` mapped back (``L^-1``), turned into states exactly (``fit.sql2_svd_init``), then the
  stress forces of the output error move the states with their storage precision in the loop
  (rounded on the forward pass, straight-through on the backward pass).
- ``output_error``: the weighted error itself, the figure the budget allocation compares.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..dynamics.attention import input_taps
from ..dynamics.modules import DynSpec, sql2_factors, sql2_lowrank
from ..dynamics.fit import FitResult, _descend
from ..dynamics.fit_sql2 import solve_coupling_sql2, sql2_svd_init
from .quant import fake_quant, group_range, group_scales, qmax

STATE_KEEP = (0, 1)
"""Quantized states (H, rows, d) keep one scale per sub-model state vector: a shared scale per
coordinate would put the sql2 start's large levelling coordinates on a coarse grid (measured: output
error 0.32 instead of 0.11 on a real 352 x 1248 layer)."""


# ---------------------------------------------------------------- input moments


def input_vectors(layer: nn.Module, x: torch.Tensor, limit: int, gen: torch.Generator) -> torch.Tensor:
    """Up to ``limit`` of the vectors the layer's weight matrix multiplies, (samples, n).

    Conv positions are sampled (the same positions for the same generator state), so early
    high-resolution layers cost no more than late ones. A grouped conv's groups are extra samples.
    """
    linear = layer is None or isinstance(layer, nn.Linear)  # None: an MHA projection (attention.input_taps)
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
    limit: int = 2048,
) -> dict[str, Moments]:
    """Moments of every layer named in ``units`` (names in ``current``; MHA projections too, see
    ``attention.input_taps``) over ``batches``.

    With ``original`` (the uncompressed network, same layer names), ``cross`` pairs the original
    inputs with the current ones at the same sampled positions; without it ``cross = own``.
    ``stop_after``: a layer once whose input is taken the forward passes stop (nothing later is needed).
    """
    acc: dict[tuple[str, ...], list] = {}
    seen: dict[str, torch.Tensor] = {}

    def tap(keep: bool, counter: list):
        def record(names, layer, x):
            gen = torch.Generator().manual_seed(1000 * counter[0] + len(names[0]))
            v = input_vectors(layer, x, limit, gen)
            if keep:
                seen.update((n, v) for n in names)
            else:
                # the layers in ``names`` multiply this same tensor (q, k, v of a self-attention):
                # one accumulator, so one set of moments and one whitening for all of them
                refs = [seen.pop(n, None) for n in names]
                own = (v.T @ v).double()  # float32 products (half the time), summed over batches in float64
                a = acc.setdefault(tuple(names), [0, 0, 0])
                a[0] = a[0] + own
                a[1] = a[1] + (own if refs[0] is None else (refs[0].T @ v).double())
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
    for names, (own, cross, count) in acc.items():
        level = float((own / count).diagonal().mean())
        own_s = shrunk(own / count, count, level).float()
        moments = Moments(own_s, shrunk(cross / count, count, level).float() if original is not None else own_s, count)
        out.update((n, moments) for n in names)
    return out


def shrunk(c: torch.Tensor, count: int, level: float) -> torch.Tensor:
    """C pulled towards ``level`` x I by n / (n + samples): a classifier sees one vector per image,
    and a fit to a few hundred samples of a 1280-dimensional input would otherwise be exact on them
    and wrong on everything else. The cross moment is shrunk alike, so that W* stays W where the
    compressed upstream changed nothing."""
    n = c.shape[0]
    alpha = n / (n + count)
    return (1 - alpha) * c + alpha * level * torch.eye(n, dtype=c.dtype)


def execution_order(model: nn.Module, names: list[str], example: torch.Tensor) -> list[str]:
    """``names`` in the order a forward pass first uses them (unreached layers last)."""
    order: list[str] = []
    with torch.no_grad(), input_taps(model, names, lambda used, layer, x: order.extend(n for n in used if n not in order)):
        model(example)
    return order + [n for n in names if n not in order]


# ---------------------------------------------------------------- targets and errors


def damped(c: torch.Tensor, rel: float = 1e-4) -> torch.Tensor:
    d = rel * c.diagonal().mean().clamp_min(1e-12)
    return c + d * torch.eye(c.shape[0], dtype=c.dtype)


def corrected_target(w: torch.Tensor, mom: Moments) -> torch.Tensor:
    """W* = W E[x x~'] E[x~ x~']^-1: the weight that best maps compressed inputs to original outputs."""
    if mom.cross is mom.own:
        return w
    c = damped(mom.own.double(), 1e-3)
    return torch.linalg.solve(c, (w.double() @ mom.cross.double()).T).T.float()


def output_error(target: torch.Tensor, approx: torch.Tensor, c: torch.Tensor) -> float:
    """tr((approx - target) C (approx - target)'): mean squared output error summed over channels."""
    e = (approx - target).double()
    return float(((e @ c.double()) * e).sum().clamp_min(0))


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
def whitener(c: torch.Tensor, rel: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, L^-1) with L L' = C + damping, from the eigen-decomposition (L = E sqrt(Lambda))."""
    evals, evecs = torch.linalg.eigh(damped(c.double(), rel))
    root = evals.clamp_min(1e-30).sqrt()
    return (evecs * root).float(), (evecs / root).T.float()


# ---------------------------------------------------------------- dense integers (GPTQ)


def row_scales(w: torch.Tensor, bits: int, grid: int = 20) -> torch.Tensor:
    """Per-row scales; for int4, each row's clipping level is searched (clipping a few outliers
    halves the step for everyone else). Shape (m, 1)."""
    q = qmax(bits)
    amax = w.abs().amax(1, keepdim=True).clamp_min(1e-12)
    if bits >= 8:
        return amax / q
    best, best_err = amax / q, torch.full_like(amax, math.inf)
    for frac in torch.linspace(1.0, 0.5, grid):
        s = amax * frac / q
        err = (torch.round(w / s).clamp(-q, q) * s - w).pow(2).sum(1, keepdim=True)
        better = err < best_err
        best, best_err = torch.where(better, s, best), torch.where(better, err, best_err)
    return best


def gptq_quantize(w: torch.Tensor, c: torch.Tensor, bits: int, block: int = 128,
                  group: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Round ``w`` (m x n) to ``bits``, minimizing tr(E C E').

    Columns are rounded in order; each rounding error is spread over the later columns through
    the Cholesky factor of C^-1 (GPTQ). ``group=None``: one symmetric scale per row; ``group=G``:
    one fp16 scale per G columns (``quant.group_scales``), chosen when the group's first column is
    reached, on the weights as the error feedback left them. Returns the dequantized weight and
    its scales, (m, 1) or (m, n // G)."""
    w = w.double().clone()
    m, n = w.shape
    if group is None:
        lo, hi = -qmax(bits), qmax(bits)
        scales = row_scales(w.float(), bits).double()
    else:
        lo, hi = group_range(bits)
        scales = torch.zeros(m, n // group, dtype=torch.float64)
        block = block // group * group or block  # groups up to a block never straddle two
    h = damped(c.double(), 1e-2)
    h[h.diagonal() <= 0, h.diagonal() <= 0] = 1
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    out = torch.zeros_like(w)
    for i0 in range(0, n, block):
        i1 = min(i0 + block, n)
        wb = w[:, i0:i1].clone()
        errs = torch.zeros_like(wb)
        hb = hinv[i0:i1, i0:i1]
        for j in range(i1 - i0):
            col = i0 + j
            if group is not None and col % group == 0:
                span = torch.cat([wb[:, j:], w[:, i1:]], 1)[:, :group]  # past the block: not yet updated
                scales[:, col // group] = group_scales(span, bits, group)[:, 0].double()
            s = scales[:, 0] if group is None else scales[:, col // group]
            qc = torch.round(wb[:, j] / s).clamp(lo, hi) * s
            out[:, col] = qc
            err = (wb[:, j] - qc) / hb[j, j]
            wb[:, j:] -= err[:, None] * hb[j, j:][None, :]
            errs[:, j] = err
        w[:, i1:] -= errs @ hinv[i0:i1, i1:]
    return out.float(), scales.float()


# ---------------------------------------------------------------- dynamics states


def _ste(t: torch.Tensor, bits: int | None) -> torch.Tensor:
    """Rounded on the way forward, identity on the way back (straight-through)."""
    if bits is None:
        return t
    return t + (fake_quant(t.detach(), bits, STATE_KEEP) - t.detach())


@keep_last
def _whitened_svd(target: torch.Tensor, c: torch.Tensor):
    return torch.linalg.svd(target @ whitener(c)[0], full_matrices=False)


def whitened_lowrank(target: torch.Tensor, c: torch.Tensor, rank: int) -> torch.Tensor:
    """argmin over rank-``rank`` A of tr((A - W) C (A - W)'): truncated SVD of W L, mapped back."""
    u, s, vh = _whitened_svd(target, c)
    return (u[:, :rank] * s[:rank]) @ (vh[:rank] @ whitener(c)[1])


def fit_states(
    target: torch.Tensor,
    c: torch.Tensor,
    spec: DynSpec,
    *,
    bits: int | None = 8,
    steps: int = 100,
    lr: float = 0.01,
) -> FitResult:
    """sql2 states for ``target`` (m x n) minimizing the output error under input moment ``c``,
    stored at ``bits`` (None: fp32). Deterministic (no random start)."""
    if spec.metric != "sql2" or spec.kernel != "linear":
        raise ValueError("output-aware state fits use the sql2 metric with the linear kernel")
    m, n = target.shape
    # the start: mean + rank (H*d - 3) output-optimal approximation, which sql2_svd_init holds exactly
    rank = max(1, spec.rank_budget - 3)
    start = whitened_lowrank(target, c, rank)
    init = sql2_svd_init(start, spec)
    if init is None:
        raise ValueError(f"H*d = {spec.rank_budget} is too small for an output-aware start (needs >= 4)")
    low, _ = whitener(c)
    goal = target @ low
    goal_sq = goal.pow(2).sum().clamp_min(1e-30)
    ones_low = low.sum(0)  # 1' L

    x, y = (t.clone().requires_grad_() for t in init)
    with torch.no_grad():
        coupling, offset = solve_coupling_sql2(x, y, start)
    coupling, offset = coupling.clone().requires_grad_(), offset.clone().requires_grad_()
    params = [x, y, coupling, offset]

    def whitened(x, y, coupling, offset):
        """(W^ L) from the factors: never the m x n x n product W^ @ L."""
        left, right, a, b = sql2_factors(x, y, coupling)
        return left @ (right.T @ low) + (a + offset)[:, None] * ones_low[None, :] + (b @ low)[None, :]

    def loss_of():
        return (whitened(_ste(x, bits), _ste(y, bits), coupling, offset) - goal).pow(2).sum() / goal_sq

    best = [p.detach().clone() for p in params]
    if steps > 0:
        scales = [float(p.detach().abs().mean().clamp_min(1e-8)) for p in params]
        opt = torch.optim.Adam([{"params": [p], "lr": lr * s} for p, s in zip(params, scales)])
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
        _, best = _descend(params, loss_of, opt, sched, steps, None,
                           "the output-aware state fit diverged (NaN/Inf at step {step}); the layer's inputs may hold huge values")
    bx, by, bc, bo = best
    if bits is not None:
        bx, by = fake_quant(bx, bits, STATE_KEEP), fake_quant(by, bits, STATE_KEEP)
    with torch.no_grad():
        out_err = float((whitened(bx, by, bc, bo) - goal).pow(2).sum().div(goal_sq).sqrt())
        w_err = float((sql2_lowrank(bx, by, bc, bo) - target).norm() / target.norm().clamp_min(1e-30))
    return FitResult(bx, by, bc.detach(), bo.detach(), w_err, steps, output_rel_error=out_err)
