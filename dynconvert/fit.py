"""Fitting sub-model states to a layer (the "stress forces").

The reconstruction error is the potential; its gradient on each state is the stress force that
moves it. The couplings and the offset enter linearly, so at every step they are solved in closed
form (least squares on the current relations: variable projection) and Adam moves only the
positions. That removes the slowest direction of the authors' plain-Adam fit, which is why a few
hundred steps here do what tens of thousands did there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from .dynamics import DynSpec, materialize, relations, sql2_lowrank
from .errors import DynError
from .fit_full import fit_full
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


def _descend(params, loss_of, opt, sched, steps: int, on_step: ProgressFn | None, diverged: str):
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


def _project(x, y, target, spec: DynSpec):
    """Closed-form couplings/offset for the current positions, and the matrix they give."""
    if low_rank(spec.metric, spec.kernel):
        with torch.no_grad():
            coupling, offset = solve_coupling_sql2(x, y, target)
        return coupling, offset, sql2_lowrank(x, y, coupling, offset)
    rel = relations(x, y, spec.metric, spec.kernel)
    with torch.no_grad():
        coupling, offset = solve_coupling(rel, target)
    return coupling, offset, torch.einsum("h,hmn->mn", coupling, rel) + offset


def rel_error(target: torch.Tensor, approx: torch.Tensor) -> float:
    """Relative Frobenius error ||target - approx|| / ||target||."""
    denom = target.norm().clamp_min(1e-30)
    return float((target - approx).norm() / denom)


def svd_rel_error(matrix: torch.Tensor, rank: int) -> float:
    """Error of truncated SVD at ``rank``: the equal-budget baseline (rank = H*d)."""
    s = torch.linalg.svdvals(matrix.double())
    total = s.pow(2).sum()
    if total == 0:
        return 0.0
    return float(s[rank:].pow(2).sum().div(total).sqrt())


def svd_truncate(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The two thin factors (m x r, r x n) of the rank-``rank`` truncated SVD."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]


def solve_coupling(rel: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares couplings and offset for fixed relations: min ||sum_k c_k R_k + o - W||."""
    h = rel.shape[0]
    flat = rel.reshape(h, -1).double()
    ones_dot = flat.sum(1)
    gram = torch.empty(h + 1, h + 1, dtype=torch.float64, device=rel.device)
    gram[:h, :h] = flat @ flat.T
    gram[:h, h] = gram[h, :h] = ones_dot
    gram[h, h] = flat.shape[1]
    rhs = torch.cat([flat @ target.reshape(-1).double(), target.sum().double().reshape(1)])
    ridge = 1e-9 * gram.diagonal().mean().clamp_min(1e-30)
    sol = torch.linalg.solve(gram + ridge * torch.eye(h + 1, dtype=gram.dtype, device=gram.device), rhs)
    return sol[:h].to(rel.dtype), sol[h].to(rel.dtype)


def solve_coupling_sql2(x: torch.Tensor, y: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``solve_coupling`` for squared-L2 relations without building them.

    R_k = a_k 1' + 1 b_k' - 2 X_k Y_k' (a_k, b_k: squared norms of the states), so every inner
    product <R_k, R_l>, <R_k, 1 1'> and <R_k, W> expands into (H, d)-sized terms and one W @ Y.
    """
    x, y, w = x.double(), y.double(), target.double()
    m, n = w.shape
    a, b = x.pow(2).sum(-1), y.pow(2).sum(-1)  # (H, m), (H, n)
    sa, sb = a.sum(1), b.sum(1)
    x1, y1 = x.sum(1), y.sum(1)  # X_k' 1, Y_k' 1: (H, d)
    xa = torch.einsum("kmd,lm->lkd", x, a)  # [l, k] = X_k' a_l
    yb = torch.einsum("knd,ln->lkd", y, b)  # [l, k] = Y_k' b_l
    cross = torch.einsum("lkd,kd->lk", xa, y1)  # <a_l 1', X_k Y_k'>
    cross_b = torch.einsum("kd,lkd->lk", x1, yb)  # <1 b_l', X_k Y_k'>
    xx = torch.einsum("kmd,lme->klde", x, x)
    yy = torch.einsum("knd,lne->klde", y, y)
    h = x.shape[0]
    gram = torch.empty(h + 1, h + 1, dtype=torch.float64, device=x.device)
    gram[:h, :h] = (
        n * a @ a.T + m * b @ b.T + sa[:, None] * sb[None, :] + sb[:, None] * sa[None, :]
        - 2 * (cross + cross.T) - 2 * (cross_b + cross_b.T) + 4 * (xx * yy).sum((2, 3))
    )
    to_ones = n * sa + m * sb - 2 * (x1 * y1).sum(1)
    gram[:h, h] = gram[h, :h] = to_ones
    gram[h, h] = m * n
    wy = torch.einsum("mn,knd->kmd", w, y)
    rhs = torch.cat([a @ w.sum(1) + b @ w.sum(0) - 2 * (x * wy).sum((1, 2)), w.sum().reshape(1)])
    ridge = 1e-9 * gram.diagonal().mean().clamp_min(1e-30)
    sol = torch.linalg.solve(gram + ridge * torch.eye(h + 1, dtype=gram.dtype, device=gram.device), rhs)
    return sol[:h].to(target.dtype), sol[h].to(target.dtype)


def sql2_svd_init(target: torch.Tensor, spec: DynSpec) -> tuple[torch.Tensor, torch.Tensor] | None:
    """sql2 states that reproduce mean(W) + the rank-(H*d - 2) truncated SVD of W - mean(W) exactly.

    With every coupling at -1/2, ``sum_k c_k |x_ki - y_kj|^2`` is ``<x_i, y_j>`` (all H*d
    coordinates) minus row terms |x_i|^2/2 and column terms |y_j|^2/2. The SVD factors fill all
    coordinates but two, and those two even the row and column terms out: one holds
    x_i = sqrt(K - r_i) with y_j = 0, so every row's squared norm becomes the constant K (which the
    offset absorbs); the other does the same for the columns. All coordinates stay at the scale of
    the SVD factors, so float32 loses nothing to cancellation. The fit thus starts no worse than
    SVD two ranks down, and the stress forces take it from there.
    ``None`` when H*d < 3 (nothing left after the two levelling coordinates).
    """
    h, d = spec.groups, spec.dim
    rank = h * d - 2
    if rank < 1:
        return None
    m, n = target.shape
    w = target.double()
    u, sv, vh = torch.linalg.svd(w - w.mean(), full_matrices=False)
    root = sv[:rank].sqrt()
    left, right = u[:, :rank] * root, vh[:rank].T * root  # (m, rank), (n, rank)
    r_row, r_col = left.pow(2).sum(1), right.pow(2).sum(1)
    # balance the two sides (x -> a x, y -> y / a keeps <x, y>) so neither norm dwarfs the other
    a = (r_col.max() / r_row.max().clamp_min(1e-30)).pow(0.25).clamp(1e-3, 1e3)
    left, right, r_row, r_col = left * a, right / a, r_row * a**2, r_col / a**2
    x = torch.zeros(m, h * d, dtype=torch.float64)
    y = torch.zeros(n, h * d, dtype=torch.float64)
    x[:, :rank], y[:, :rank] = left, right
    x[:, rank] = (r_row.max() - r_row).sqrt()
    y[:, rank + 1] = (r_col.max() - r_col).sqrt()
    # coordinate index g*d + t -> group g, state coordinate t
    return (x.reshape(m, h, d).permute(1, 0, 2).float().contiguous(), y.reshape(n, h, d).permute(1, 0, 2).float().contiguous())


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
    target_sq = target.pow(2).sum().clamp_min(1e-30)

    def loss_of():
        approx = _project(x, y, target, spec)[2]
        return (approx - target).pow(2).sum() / target_sq

    _, (bx, by) = _descend([x, y], loss_of, opt, sched, steps, on_step,
                           f"layer {name}: the fit diverged (NaN/Inf error at step {{step}}); try a smaller --lr")
    with torch.no_grad():
        coupling, offset, approx = _project(bx, by, target, spec)
        final = rel_error(target, approx)
    return FitResult(bx.cpu(), by.cpu(), coupling.cpu(), offset.cpu(), final, steps)


def input_whitener(moment: torch.Tensor, keep: float = 1 - 1e-6) -> torch.Tensor:
    """L with L L' ~= C for the layer's input second moment C (n x n), truncated to the
    eigen-directions that hold ``keep`` of its trace: ||E L|| is then the output error of E."""
    evals, evecs = torch.linalg.eigh(moment.double())
    evals = evals.clamp_min(0).flip(0)
    evecs = evecs.flip(1)
    cum = evals.cumsum(0) / evals.sum().clamp_min(1e-30)
    k = int((cum < keep).sum()) + 1
    return (evecs[:, :k] * evals[:k].sqrt()).float()


def output_rel_error(target: torch.Tensor, approx: torch.Tensor, whitener: torch.Tensor) -> float:
    """Relative error of the outputs ``x @ W'`` over the calibration inputs."""
    return rel_error(target @ whitener, approx @ whitener)


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
    goal = target @ whitener
    goal_sq = goal.pow(2).sum().clamp_min(1e-30)
    params = [t.detach().to(device).clone().requires_grad_() for t in (start.states_out, start.states_in, start.coupling, start.offset)]
    scales = [float(p.detach().abs().mean().clamp_min(1e-8)) for p in params]
    opt = torch.optim.Adam([{"params": [p], "lr": lr * sc} for p, sc in zip(params, scales)])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))

    def loss_of():
        approx = materialize(*params, spec.metric, spec.kernel)
        return (approx @ whitener - goal).pow(2).sum() / goal_sq

    err, ps = _descend(params, loss_of, opt, sched, steps, on_step,
                       f"layer {name}: the calibrated fit diverged (NaN/Inf at step {{step}}); try fewer --calib-steps")
    with torch.no_grad():
        approx = materialize(*ps, spec.metric, spec.kernel)
    return FitResult(*(p.cpu() for p in ps), rel_error(target, approx), start.steps + steps, output_rel_error=err)
