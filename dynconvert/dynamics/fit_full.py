"""Fitting the full-rank kernels (l1, l2, the inverse kernel) without the (H, m, n) relation tensor.

The exact fit (``fit.fit_weight`` on small layers) builds every relation at every step and lets
autograd through ``cdist`` keep them all: H*m*n elements twice over, and about 30 ns per element
per step. Here a step takes a block of rows (a seeded permutation, cycled; all rows when they fit
in ``TILE_ELEMENTS`` relations) and:

* builds the block's relations ``R`` (H, rows, n) once (forward only);
* solves couplings and offset on the block in closed form (variable projection, as the exact
  fit does: with them at their optimum the positions' gradient needs no term for them);
* forms the positions' gradient by hand from the residual E, as thin batched products:
  for l2, d|x_i - y_j|/dx_i = (x_i - y_j)/|x_i - y_j|, so with G = c E phi'(D) / D
  the gradient on X is X * rowsum(G) - G Y and on Y is Y * colsum(G) - G' X; for l1 it is
  sum_j G_ij sign(x_it - y_jt) per coordinate.

At the end the couplings and offset are solved over every entry and the error measured exactly,
tile by tile (``exact_coupling``, ``exact_error``): the figure a report shows is the true one.
"""

from __future__ import annotations

import math

import torch

from .modules import DynSpec, relations
from .metrics import kernel, metric
from ..errors import DynError

TILE_ELEMENTS = 1 << 22
"""Relations held at once while polishing (16 MiB of float32 per copy)."""
STEP_ELEMENTS = 1 << 22
"""Relations per descent step: the row block's size. A quarter of it fitted ResNet-50 at the
resnet50 recipe with l2 in 96 CPU-s but left its largest layers worse than SVD (few passes over
their rows: layer3.5.conv3 0.8456 vs SVD 0.8143; with this size 0.7654, 2.4x the time)."""


def _row_tiles(h: int, m: int, n: int):
    rows = max(1, TILE_ELEMENTS // max(1, h * n))
    return [(i, min(i + rows, m)) for i in range(0, m, rows)]


def ridge_solve(gram: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """The normal equations of the couplings-and-offset least squares, with a tiny ridge (every
    closed-form coupling solve in the package goes through here)."""
    ridge = 1e-9 * gram.diagonal().mean().clamp_min(1e-30)
    return torch.linalg.solve(gram + ridge * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device), rhs)


def couplings_from(gram: torch.Tensor, rhs: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(couplings, offset) solving the normal equations, in ``dtype``."""
    sol = ridge_solve(gram, rhs)
    return sol[:-1].to(dtype), sol[-1].to(dtype)


def normal_equations(rel: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gram matrix and right-hand side of min ||sum_k c_k R_k + o - W|| (in ``rel``'s precision,
    returned as float64: the block fit runs float32, the exact polish float64)."""
    h = rel.shape[0]
    flat, w = rel.reshape(h, -1), w.reshape(-1).to(rel.dtype)
    gram = torch.empty(h + 1, h + 1, dtype=torch.float64, device=rel.device)
    gram[:h, :h] = flat @ flat.T
    gram[:h, h] = gram[h, :h] = flat.sum(1)
    gram[h, h] = flat.shape[1]
    return gram, torch.cat([flat @ w, w.sum().reshape(1)]).double()


def exact_coupling(x, y, target, spec: DynSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares couplings and offset over every entry (``fit.solve_coupling``'s normal
    equations, accumulated tile by tile)."""
    h, (m, n) = x.shape[0], target.shape
    gram = torch.zeros(h + 1, h + 1, dtype=torch.float64, device=target.device)
    rhs = torch.zeros(h + 1, dtype=torch.float64, device=target.device)
    with torch.no_grad():
        for i0, i1 in _row_tiles(h, m, n):
            rel = relations(x[:, i0:i1].double(), y.double(), spec.metric, spec.kernel)
            g, r = normal_equations(rel, target[i0:i1])
            gram += g
            rhs += r
    return couplings_from(gram, rhs, target.dtype)


def exact_error(x, y, coupling, offset, target, spec: DynSpec) -> float:
    """Relative Frobenius error over every entry, tile by tile."""
    h, (m, n) = x.shape[0], target.shape
    num = 0.0
    with torch.no_grad():
        for i0, i1 in _row_tiles(h, m, n):
            rel = relations(x[:, i0:i1], y, spec.metric, spec.kernel)
            approx = torch.einsum("h,hmn->mn", coupling, rel) + offset
            num += float((approx - target[i0:i1]).double().pow(2).sum())
    den = float(target.double().pow(2).sum())
    return math.sqrt(num / den) if den > 0 else 0.0


def block_step(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, spec: DynSpec):
    """On one block (x: its rows' states (H, b, d), y (H, n, d), w (b, n)): the block's squared
    relative error and its gradient on x and y, with the couplings at their block optimum."""
    met, ker = metric(spec.metric), kernel(spec.kernel)
    dist = met.distance(x, y)
    rel = ker.phi(dist)
    coupling, offset = couplings_from(*normal_equations(rel, w), x.dtype)
    resid = torch.mm(coupling[None], rel.reshape(rel.shape[0], -1)).reshape(w.shape).add_(offset - w)
    scale = 1.0 / float(w.pow(2).sum().clamp_min(1e-30))
    loss = float(resid.pow(2).sum()) * scale
    g = resid.unsqueeze(0) * (2 * scale * coupling)[:, None, None]  # dL/d rel, (H, b, n)
    if not ker.linear:
        g = g.mul_(ker.dphi(dist, rel))
    gx, gy = met.pull(x, y, dist, g)
    return loss, gx, gy


class _LazyAdam:
    """Adam on one tensor whose rows (dim 1) may each get a gradient only in some steps: a row
    moves, and its moments and step count advance, only when its gradient is given (as
    TensorFlow's LazyAdam). Plain Adam would keep moving absent rows on stale momentum."""

    def __init__(self, t: torch.Tensor, lr: float, betas=(0.9, 0.999), eps=1e-8):
        self.t, self.lr, self.b1, self.b2, self.eps = t, lr, *betas, eps
        self.m1, self.m2 = torch.zeros_like(t), torch.zeros_like(t)
        self.count = torch.zeros(t.shape[1], dtype=torch.float64, device=t.device)

    def step(self, grad: torch.Tensor, idx: torch.Tensor | None, factor: float) -> None:
        sel = slice(None) if idx is None else idx
        self.count[sel] += 1
        k = self.count[sel]
        m1 = self.m1[:, sel].mul_(self.b1).add_(grad, alpha=1 - self.b1)
        m2 = self.m2[:, sel].mul_(self.b2).addcmul_(grad, grad, value=1 - self.b2)
        if idx is not None:
            self.m1[:, idx], self.m2[:, idx] = m1, m2
        c1 = (1 - self.b1**k).float()[None, :, None]
        c2 = (1 - self.b2**k).float()[None, :, None]
        self.t[:, sel] -= self.lr * factor * (m1 / c1) / ((m2 / c2).sqrt() + self.eps)


def fit_full(target, spec: DynSpec, start, *, steps: int, lr: float, seed: int, name: str = "layer", on_step=None):
    """Move ``start`` = (x (H, m, d), y (H, n, d)) down the error, a row block per step (Adam,
    lazily for the rows' states; cosine schedule; step sizes relative to each tensor's spread).
    Returns (x, y, coupling, offset, exact relative error)."""
    h, (m, n) = spec.groups, target.shape
    x, y = (t.detach().to(target.device, torch.float32, copy=True) for t in start)
    # the authors' uniform [0, 1) start has spread 0.29: lr is relative to that
    opt_x, opt_y = (_LazyAdam(t, lr * float(t.std().clamp_min(1e-6)) / 0.2887) for t in (x, y))
    rows = max(1, min(m, STEP_ELEMENTS // max(1, h * n)))
    blocks = -(-m // rows)
    gen = torch.Generator().manual_seed(seed)
    order = None
    best = (math.inf, None)  # with every row in each step the loss is exact: keep the best iterate
    for step in range(steps + (blocks == 1)):
        if blocks > 1 and step % blocks == 0:  # a fresh permutation every pass over the rows
            order = torch.randperm(m, generator=gen).to(target.device)
        idx = None if blocks == 1 else order[(step % blocks) * rows : (step % blocks + 1) * rows]
        xb, wb = (x, target) if idx is None else (x[:, idx], target[idx])
        loss, gx, gy = block_step(xb, y, wb, spec)
        if not math.isfinite(loss):
            raise DynError(f"layer {name}: the fit diverged (NaN/Inf error at step {step}); try a smaller --lr")
        if on_step is not None:
            on_step(min(step, steps), steps, math.sqrt(loss))
        if blocks == 1 and loss < best[0]:
            best = (loss, (x.clone(), y.clone()))
        if step == steps:
            break
        factor = 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / max(steps, 1)))
        opt_x.step(gx, idx, factor)
        opt_y.step(gy, None, factor)
    x, y = best[1] if best[1] is not None else (x, y)
    coupling, offset = exact_coupling(x, y, target, spec)
    err = exact_error(x, y, coupling, offset, target, spec)
    if not math.isfinite(err):
        raise DynError(f"layer {name}: the fit diverged (NaN/Inf error); try a smaller --lr")
    return x, y, coupling, offset, err
