"""The squared-L2 (sql2) fit without ever building the approximation.

With squared-L2 relations and the linear kernel, ``W_hat = sum_k c_k R_k + o`` with
``R_k = a_k 1' + 1 b_k' - 2 X_k Y_k'`` (a_k, b_k: the states' squared norms). Everything a
descent step needs then expands into (H, d)-sized terms and two thin products, W @ Y and W' @ X:

* the couplings and offset (closed form, ``solve_coupling_sql2``): their normal equations;
* the squared error, ``|W|^2 - 2 s'r + s'G s`` for the solution s, Gram G and right side r;
* the stress forces on the states (``Sql2Error``): with E = W_hat - W,
  dL/dX_k = 4 c_k (X_k * rowsum(E) - E Y_k) / |W|^2, and E Y_k = W_hat Y_k - W Y_k where
  W_hat Y_k needs only Y' Y (Hd x Hd); the same for Y with E' X_k.

Each step thus costs two (m x n) x (n x H*d) products in float32 (plus X'X and Y'Y, (m + n) (H*d)^2).
Building W_hat and back-propagating through it cost three such products, a float64 W @ Y for the
couplings about two more, and a dozen passes over m x n elements.
"""

from __future__ import annotations

import functools

import torch

from .modules import DynSpec
from .fit_full import couplings_from, ridge_solve


class Target:
    """The matrix a fit aims at, with what every step reads from it computed once (the descent's
    own needs on first use: a single closed-form solve reads only the float64 sums)."""

    def __init__(self, w: torch.Tensor):
        self.w = w
        w64 = w.double()
        self.row_sum64, self.col_sum64 = w64.sum(1), w64.sum(0)
        self.total64 = self.row_sum64.sum()

    @functools.cached_property
    def wt(self) -> torch.Tensor:
        return self.w.T.contiguous()  # W' @ X runs faster on a contiguous W'

    @functools.cached_property
    def row_sum(self) -> torch.Tensor:
        return self.w.sum(1)

    @functools.cached_property
    def col_sum(self) -> torch.Tensor:
        return self.w.sum(0)

    @functools.cached_property
    def sq(self) -> torch.Tensor:
        return self.w.pow(2).sum().clamp_min(1e-30)


def _normal_equations(x, y, t: Target, wy, xtx, yty):
    """Gram matrix and right side of min ||sum_k c_k R_k + o - W|| (float64), from the states
    x (H, m, d), y (H, n, d), the target, ``wy`` = W @ Y_k per group (H, m, d), and the states'
    own products ``xtx`` = X' X, ``yty`` = Y' Y over all H*d coordinates (``_flat``)."""
    x, y, wy = x.double(), y.double(), wy.double()
    (m, n), h, d = t.w.shape, x.shape[0], x.shape[2]
    a, b = x.pow(2).sum(-1), y.pow(2).sum(-1)  # (H, m), (H, n)
    sa, sb = a.sum(1), b.sum(1)
    x1, y1 = x.sum(1), y.sum(1)  # X_k' 1, Y_k' 1: (H, d)
    xa = torch.einsum("kmd,lm->lkd", x, a)  # [l, k] = X_k' a_l
    yb = torch.einsum("knd,ln->lkd", y, b)  # [l, k] = Y_k' b_l
    cross = torch.einsum("lkd,kd->lk", xa, y1)  # <a_l 1', X_k Y_k'>
    cross_b = torch.einsum("kd,lkd->lk", x1, yb)  # <1 b_l', X_k Y_k'>
    products = (xtx.double() * yty.double()).reshape(h, d, h, d).sum((1, 3))  # <X_k Y_k', X_l Y_l'>
    gram = torch.empty(h + 1, h + 1, dtype=torch.float64, device=x.device)
    gram[:h, :h] = (
        n * a @ a.T + m * b @ b.T + sa[:, None] * sb[None, :] + sb[:, None] * sa[None, :]
        - 2 * (cross + cross.T) - 2 * (cross_b + cross_b.T) + 4 * products
    )
    to_ones = n * sa + m * sb - 2 * (x1 * y1).sum(1)
    gram[:h, h] = gram[h, :h] = to_ones
    gram[h, h] = m * n
    rhs = torch.cat([a @ t.row_sum64 + b @ t.col_sum64 - 2 * (x * wy).sum((1, 2)), t.total64.reshape(1)])
    return gram, rhs


def _flat(t: torch.Tensor) -> torch.Tensor:
    """(H, m, d) -> (m, H*d), coordinate g*d + t for group g, state coordinate t."""
    h, m, d = t.shape
    return t.permute(1, 0, 2).reshape(m, h * d)


def _grouped(t: torch.Tensor, h: int) -> torch.Tensor:
    """(m, H*d) -> (H, m, d): the inverse of ``_flat``."""
    m, hd = t.shape
    return t.reshape(m, h, hd // h).permute(1, 0, 2)


def solve_coupling_sql2(x: torch.Tensor, y: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``fit.solve_coupling`` for squared-L2 relations without building them (float64 throughout)."""
    x64, y64 = _flat(x.double()), _flat(y.double())
    wy = _grouped(target.double() @ y64, x.shape[0])
    return couplings_from(*_normal_equations(x, y, Target(target), wy, x64.T @ x64, y64.T @ y64), target.dtype)


def _pull(x, yf, c, a_c, b_c, o, w_y, w_row_sum, yty):
    """The gradient of sum(E^2) on x (without the common factor 4 / |W|^2): per group,
    c_k (X_k * rowsum(E) - E Y_k). ``yf`` is Y flattened (n, H*d); ``w_y`` W @ Y (m, H*d);
    ``w_row_sum`` W 1; ``yty`` Y' Y (H*d, H*d). For y it is called with the roles swapped (W', X)."""
    h, n = x.shape[0], yf.shape[0]
    xc = _flat(x * c[:, None, None])
    y1 = yf.sum(0)  # (H*d,)
    # W_hat Y_k for every k at once: (a_c + o) (1' Y) + 1 (b_c' Y) - 2 sum_l c_l X_l (Y_l' Y)
    what_y = torch.outer(a_c + o, y1) + (b_c @ yf)[None, :] - 2 * xc @ yty
    row_e = n * (a_c + o) + b_c.sum() - 2 * xc @ y1 - w_row_sum  # rowsum(E): (m,)
    e_y = _grouped(what_y - w_y, h)
    return (x * row_e[None, :, None] - e_y) * c[:, None, None]


class Sql2Error(torch.autograd.Function):
    """Squared relative error of sql2 states (couplings and offset at their optimum) as a function
    of the states, with the stress forces computed by hand (module docstring). The couplings are
    held at their optimum, so their own change adds no term (variable projection).
    ``Sql2Error.apply(x, y, Target(w))``."""

    @staticmethod
    def forward(ctx, x, y, t: Target):
        h = x.shape[0]
        xf, yf = _flat(x), _flat(y)
        w_y, wt_x = t.w @ yf, t.wt @ xf  # the two products a step costs: (m, H*d), (n, H*d)
        xtx, yty = xf.T @ xf, yf.T @ yf
        gram, rhs = _normal_equations(x, y, t, _grouped(w_y, h), xtx, yty)
        sol = ridge_solve(gram, rhs)
        sq = t.sq.double()
        err_sq = (sq - 2 * sol @ rhs + sol @ gram @ sol).clamp_min(0) / sq
        c, o = sol[:-1].to(x.dtype), sol[-1].to(x.dtype)
        a_c = (c[:, None] * x.pow(2).sum(-1)).sum(0)
        b_c = (c[:, None] * y.pow(2).sum(-1)).sum(0)
        scale = 4 / t.sq
        gx = _pull(x, yf, c, a_c, b_c, o, w_y, t.row_sum, yty) * scale
        gy = _pull(y, xf, c, b_c, a_c, o, wt_x, t.col_sum, xtx) * scale
        ctx.save_for_backward(gx, gy)
        return err_sq.to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        gx, gy = ctx.saved_tensors
        return gx * grad, gy * grad, None


def top_factors(w: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """U_r S_r^(1/2) and V_r S_r^(1/2) of the rank-``rank`` truncated SVD of ``w`` (float64), from
    the eigenvectors of the smaller Gram matrix: 3-10x quicker than an SVD on tall or wide layers.
    Directions with no energy (below 1e-12 of the largest) get zero factors."""
    tall = w.shape[0] >= w.shape[1]
    a = w if tall else w.T
    evals, evecs = torch.linalg.eigh(a.T @ a)
    sq, v = evals.flip(0)[:rank].clamp_min(0), evecs.flip(1)[:, :rank]
    root = sq.sqrt().sqrt()  # S^(1/2)
    live = sq > 1e-12 * sq[0].clamp_min(1e-300)
    other = (a @ v) / torch.where(live, root, torch.ones_like(root)) * live  # A V S^(-1/2) = U S^(1/2)
    side = v * root
    return (other, side) if tall else (side, other)


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
    left, right = top_factors(w - w.mean(), rank)  # (m, rank), (n, rank)
    r_row, r_col = left.pow(2).sum(1), right.pow(2).sum(1)
    # balance the two sides (x -> a x, y -> y / a keeps <x, y>) so neither norm dwarfs the other
    a = (r_col.max() / r_row.max().clamp_min(1e-30)).pow(0.25).clamp(1e-3, 1e3)
    left, right, r_row, r_col = left * a, right / a, r_row * a**2, r_col / a**2
    x = torch.zeros(m, h * d, dtype=torch.float64)
    y = torch.zeros(n, h * d, dtype=torch.float64)
    x[:, :rank], y[:, :rank] = left, right
    x[:, rank] = (r_row.max() - r_row).sqrt()
    y[:, rank + 1] = (r_col.max() - r_col).sqrt()
    return _grouped(x, h).float().contiguous(), _grouped(y, h).float().contiguous()
