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
- ``output_error`` (dynamics/calibration.py, with the moments and the whitener both routes share):
  the weighted error itself, the figure the budget allocation compares.
"""

from __future__ import annotations

import math

import torch

from ..dynamics.calibration import (  # noqa: F401 (input_vectors, execution_order: their old place)
    Moments, collect_moments, damped, execution_order, input_vectors, keep_last, output_error, whitener,
)
from ..dynamics.modules import DynSpec, sql2_factors, sql2_lowrank
from ..dynamics.fit import FitResult, fit_outputs
from ..dynamics.fit_sql2 import solve_coupling_sql2, sql2_svd_init
from .quant import fake_quant, group_range, group_scales, qmax

STATE_KEEP = (0, 1)
"""Quantized states (H, rows, d) keep one scale per sub-model state vector: a shared scale per
coordinate would put the sql2 start's large levelling coordinates on a coarse grid (measured: output
error 0.32 instead of 0.11 on a real 352 x 1248 layer)."""


# ---------------------------------------------------------------- targets (moments, whitener, output error: dynamics/calibration.py)


def corrected_target(w: torch.Tensor, mom: Moments) -> torch.Tensor:
    """W* = W E[x x~'] E[x~ x~']^-1: the weight that best maps compressed inputs to original outputs."""
    if mom.cross is mom.own:
        return w
    c = damped(mom.own.double(), 1e-3)
    return torch.linalg.solve(c, (w.double() @ mom.cross.double()).T).T.float()


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


@keep_last
def _inverse_factor(c: torch.Tensor) -> torch.Tensor:
    """The upper Cholesky factor of (damped C)^-1 that GPTQ spreads rounding errors with: the same
    for every candidate of a layer, and 1.8 s of a 2.8 s int4 fit of a 3072-input layer."""
    h = damped(c.double(), 1e-2)
    h[h.diagonal() <= 0, h.diagonal() <= 0] = 1
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)


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
    hinv = _inverse_factor(c)
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

    best = [p.detach().clone() for p in params]
    if steps > 0:  # (the states stored at ``bits`` in the loop: rounded forward, straight-through backward)
        _, best = fit_outputs(params, lambda x, y, c, o: whitened(_ste(x, bits), _ste(y, bits), c, o), goal, steps=steps,
                              lr=lr, on_step=None, diverged="the output-aware state fit diverged (NaN/Inf at step {step}); "
                                                            "the layer's inputs may hold huge values")
    bx, by, bc, bo = best
    if bits is not None:
        bx, by = fake_quant(bx, bits, STATE_KEEP), fake_quant(by, bits, STATE_KEEP)
    with torch.no_grad():
        goal_sq = goal.pow(2).sum().clamp_min(1e-30)
        out_err = float((whitened(bx, by, bc, bo) - goal).pow(2).sum().div(goal_sq).sqrt())
        w_err = float((sql2_lowrank(bx, by, bc, bo) - target).norm() / target.norm().clamp_min(1e-30))
    return FitResult(bx, by, bc.detach(), bo.detach(), w_err, steps, output_rel_error=out_err)
