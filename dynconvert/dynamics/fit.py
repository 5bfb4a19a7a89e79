"""Fitting sub-model states to a layer (the "stress forces").

The reconstruction error is the potential; its gradient on each state is the stress force that
moves it. The couplings and the offset enter linearly, so at every step they are solved in closed
form (least squares on the current relations: variable projection) and Adam moves only the
positions. That removes the slowest direction of the authors' plain-Adam fit, which is why a few
hundred steps here do what tens of thousands did there.

The squared-L2 kernel (the default) descends with hand-made stress forces that never build the
matrix (fit_sql2.py); the full-rank kernels in row blocks (fit_full.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from .calibration import input_whitener, output_rel_error  # noqa: F401 (their old place)
from .modules import DynSpec, materialize, sql2_lowrank
from ..errors import DynError
from .fit_full import couplings_from, fit_full, normal_equations
from .fit_sql2 import Sql2Error, Target, solve_coupling_sql2, sql2_svd_init, top_factors
from .metrics import kernel, low_rank

ProgressFn = Callable[[int, int, float], None]
"""Called as ``on_step(step, total_steps, relative_error)``."""


@dataclass
class FitResult:
    states_out: torch.Tensor
    states_in: torch.Tensor
    coupling: torch.Tensor
    offset: torch.Tensor
    rel_error: float
    steps: int
    output_rel_error: float | None = None
    """Relative error of the layer's outputs on the calibration inputs (calibrated fits only)."""


def descend(params, loss_of, opt, sched, steps: int, on_step: ProgressFn | None, diverged: str):
    """Move ``params`` down ``loss_of()`` (a squared relative error) for ``steps`` steps.

    Returns (error, copies of the best iterate): Adam can bounce, the best state is what we keep.
    A NaN/Inf error stops with DynError(``diverged`` formatted with the step).
    """
    best_err, best = math.inf, [p.detach().clone() for p in params]
    for step in range(steps + 1):
        loss = loss_of()
        err = float(loss.detach().sqrt())
        if not math.isfinite(err):
            raise DynError(diverged.format(step=step))
        if err < best_err:
            best_err, best = err, [p.detach().clone() for p in params]
        if on_step is not None:
            on_step(step, steps, err)
        if step == steps:
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return best_err, best


_descend = descend  # its old, private name


def fit_outputs(params, whitened_of, goal: torch.Tensor, *, steps: int, lr: float, on_step: ProgressFn | None,
                diverged: str) -> tuple[float, list[torch.Tensor]]:
    """The calibrated fit's descent: move every tensor in ``params`` so that ``whitened_of(*params)``
    (the layer's weight times a whitener L, ``calibration.whitener``) reaches ``goal`` (W L), i.e.
    the layer's outputs on the calibration inputs reach the original's. Adam with step sizes
    relative to each tensor's mean magnitude, a cosine schedule; returns ``descend``'s (relative
    output error, copies of the best iterate). Serves a ratio conversion's ``--calib``
    (``refine_on_outputs``) and a budget's states (budget/outputs.fit_states)."""
    goal_sq = goal.pow(2).sum().clamp_min(1e-30)
    scales = [float(p.detach().abs().mean().clamp_min(1e-8)) for p in params]
    opt = torch.optim.Adam([{"params": [p], "lr": lr * sc} for p, sc in zip(params, scales)])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))

    def loss_of():
        return (whitened_of(*params) - goal).pow(2).sum() / goal_sq

    return descend(params, loss_of, opt, sched, steps, on_step, diverged)


def rel_error(target: torch.Tensor, approx: torch.Tensor) -> float:
    """Relative Frobenius error ||target - approx|| / ||target||."""
    denom = target.norm().clamp_min(1e-30)
    return float((target - approx).norm() / denom)


def svd_rel_error(matrix: torch.Tensor, rank: int) -> float:
    """Error of truncated SVD at ``rank``: the equal-budget baseline (rank = H*d).

    The squared singular values are the eigenvalues of the smaller Gram matrix (float64): several
    times quicker than an SVD on the tall or wide matrices of real layers, and the tail sum it
    needs is exact to float64 rounding of the largest one."""
    w = matrix.double()
    sq = torch.linalg.eigvalsh(w.T @ w if w.shape[1] <= w.shape[0] else w @ w.T).clamp_min(0).flip(0)
    total = sq.sum()
    if total == 0:
        return 0.0
    return float(sq[rank:].sum().div(total).sqrt())


def svd_truncate(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The two thin factors (m x r, r x n) of the rank-``rank`` truncated SVD (``fit_sql2.top_factors``)."""
    left, right = top_factors(matrix.double(), rank)
    return left.to(matrix.dtype), right.T.to(matrix.dtype)


def solve_coupling(rel: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares couplings and offset for fixed relations: min ||sum_k c_k R_k + o - W|| (float64)."""
    return couplings_from(*normal_equations(rel.double(), target.double()), rel.dtype)


def _scaled_svd_start(target: torch.Tensor, spec: DynSpec, mean_sq: float):
    """``sql2_svd_init``'s states scaled so that their mean squared distance is ``mean_sq``: for a
    kernel with phi(t) ~ a - b t^2 at small t the fit then starts near truncated SVD, far enough
    out to use the kernel's curvature (exp(-t^2) on the digits CNN: 0.01 -> 0.972x SVD's error,
    0.1 -> 0.949x, 0.5 -> 0.944x, 1.0 -> 0.947x; a uniform [0, 1) start 0.953x)."""
    start = sql2_svd_init(target, spec)
    if start is None:
        return None
    x, y = start
    # E|x - y|^2 over all pairs, per group, without the (H, m, n) distances
    sq = x.pow(2).sum(-1).mean(1) + y.pow(2).sum(-1).mean(1) - 2 * (x.mean(1) * y.mean(1)).sum(-1)
    scale = (mean_sq / sq.mean().clamp_min(1e-30)).sqrt()
    return x * scale, y * scale


def fit_weight(
    matrix: torch.Tensor,
    spec: DynSpec,
    *,
    steps: int = 300,
    lr: float = 0.05,
    seed: int = 0,
    device: torch.device | str = "cpu",
    name: str = "layer",
    on_step: ProgressFn | None = None,
    init: str = "svd",
) -> FitResult:
    """Fit ``spec``'s states so that they materialize to ``matrix`` (m x n).

    ``init``: "svd" starts the states at the truncated SVD (``sql2_svd_init``; for the inverse
    kernel too it is random); "random" starts uniform in [0, 1) as the authors do. Metrics other
    than sql2 (and the inverse kernel) are fitted by ``fit_full.fit_full``.

    Deterministic for a given seed and device. Raises DynError naming the layer if the fit
    diverges to NaN/Inf.
    """
    device = torch.device(device)
    target = matrix.detach().to(device=device, dtype=torch.float32)
    if not torch.isfinite(target).all():
        raise DynError(f"layer {name}: weights contain NaN or Inf; fix the checkpoint before converting")
    m, n = target.shape
    start = sql2_svd_init(target.cpu(), spec) if init == "svd" and kernel(spec.kernel).linear else None
    if not low_rank(spec.metric, spec.kernel):
        # full-rank kernels: row blocks and hand-made gradients, never the (H, m, n) tensor
        # (fit_full.py); the SVD states are their warm start too (l1 gains most from it)
        if start is None and init == "svd" and kernel(spec.kernel).svd_start is not None:
            start = _scaled_svd_start(target.cpu(), spec, kernel(spec.kernel).svd_start)
        if start is None:
            gen = torch.Generator().manual_seed(seed)
            start = torch.rand(spec.groups, m, spec.dim, generator=gen), torch.rand(spec.groups, n, spec.dim, generator=gen)
        else:
            # l1/l2 distances scale with the states and the couplings absorb it: give the SVD
            # states the spread of the authors' uniform start, the scale fine-tuning's steps assume
            spread = torch.cat([start[0].reshape(-1), start[1].reshape(-1)]).std().clamp_min(1e-12)
            start = tuple(t * (0.2887 / spread) for t in start)
        x, y, coupling, offset, err = fit_full(target, spec, start, steps=steps, lr=lr, seed=seed, name=name, on_step=on_step)
        return FitResult(x.cpu(), y.cpu(), coupling.cpu(), offset.cpu(), err, steps)
    if start is not None:
        # states from the SVD start are not in [0, 1): step sizes relative to each tensor's spread
        scales = [float(t.std().clamp_min(1e-6)) for t in start]
    else:
        # the authors start states uniform in [0, 1); the couplings set the scale afterwards
        gen = torch.Generator().manual_seed(seed)
        start = torch.rand(spec.groups, m, spec.dim, generator=gen), torch.rand(spec.groups, n, spec.dim, generator=gen)
        scales = [1.0, 1.0]
    x, y = (t.to(device).requires_grad_() for t in start)
    opt = torch.optim.Adam([{"params": [t], "lr": lr * sc} for t, sc in zip((x, y), scales)])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * s / max(steps, 1))))
    problem = Target(target)

    def loss_of():  # sql2: the error and its stress forces without building W_hat (fit_sql2.py)
        return Sql2Error.apply(x, y, problem)

    _, (bx, by) = descend([x, y], loss_of, opt, sched, steps, on_step,
                           f"layer {name}: the fit diverged (NaN/Inf error at step {{step}}); try a smaller --lr")
    with torch.no_grad():
        coupling, offset = solve_coupling_sql2(bx, by, target)
        final = rel_error(target, sql2_lowrank(bx, by, coupling, offset))
    return FitResult(bx.cpu(), by.cpu(), coupling.cpu(), offset.cpu(), final, steps)


def refine_on_outputs(
    start: FitResult,
    matrix: torch.Tensor,
    spec: DynSpec,
    moment: torch.Tensor,
    *,
    steps: int = 300,
    lr: float = 0.01,
    device: torch.device | str = "cpu",
    name: str = "layer",
    on_step: ProgressFn | None = None,
) -> FitResult:
    """Calibrated fit: move all states to reproduce the layer's *outputs* on calibration inputs.

    The weight error is what SVD minimizes; the output error is what accuracy depends on. With
    C the inputs' second moment, the output error of a weight error E is tr(E C E') = ||E L||^2.
    Starts from the weight fit; Adam moves positions, couplings and offset together (step sizes
    relative to each tensor's scale).
    """
    device = torch.device(device)
    target = matrix.detach().to(device=device, dtype=torch.float32)
    whitener = input_whitener(moment.to(device))
    params = [t.detach().to(device).clone().requires_grad_() for t in (start.states_out, start.states_in, start.coupling, start.offset)]
    err, ps = fit_outputs(params, lambda *p: materialize(*p, spec.metric, spec.kernel) @ whitener, target @ whitener,
                          steps=steps, lr=lr, on_step=on_step,
                          diverged=f"layer {name}: the calibrated fit diverged (NaN/Inf at step {{step}}); try fewer --calib-steps")
    with torch.no_grad():
        approx = materialize(*ps, spec.metric, spec.kernel)
    return FitResult(*(p.cpu() for p in ps), rel_error(target, approx), start.steps + steps, output_rel_error=err)
