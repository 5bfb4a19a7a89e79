"""The registry of metrics (distance between two states) and kernels (phi applied to it).

``W_hat[i, j] = offset + sum_k lambda_k * phi(dist(X_k[i], Y_k[j]))``: everything that depends on
which ``dist`` or ``phi`` a layer uses is here, one entry each. The rest of the package asks the
registry (``metric(name)``, ``kernel(name)``, ``low_rank``, ``weight_free_path``) instead of comparing
names, so a new metric is one ``Metric`` entry: its distances, the pull-back of a gradient on them
to the states (what ``fit_full`` descends with), and which weight-free path it has, if any.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

Tensor = torch.Tensor


@dataclass(frozen=True)
class Metric:
    name: str
    doc: str
    distance: Callable[[Tensor, Tensor], Tensor]
    """x (H, m, d), y (H, n, d) -> (H, m, n)."""
    pull: Callable[[Tensor, Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]
    """(x, y, dist, g) -> gradients on x and y of sum(g * dist); ``g`` (H, m, n) may be overwritten."""
    low_rank: bool = False
    """With the linear kernel the relations are thin factors (``dynamics.sql2_factors``)."""
    weight_free: bool = False
    """Has a weight-free forward with the linear kernel (``weightfree.py``, path named as the metric)."""


@dataclass(frozen=True)
class Kernel:
    name: str
    doc: str
    phi: Callable[[Tensor], Tensor]
    dphi: Callable[[Tensor, Tensor], Tensor]
    """(dist, phi(dist)) -> phi'(dist)."""
    linear: bool = False
    svd_start: float | None = None
    """For a non-linear kernel: the mean squared distance at which ``fit.fit_weight`` starts from the
    SVD states (scaled), or None for a random start."""


INVERSE_EPS = 1e-2


def _sql2(x: Tensor, y: Tensor) -> Tensor:
    return x.pow(2).sum(-1, keepdim=True) + y.pow(2).sum(-1).unsqueeze(-2) - 2 * torch.matmul(x, y.transpose(-1, -2))


def _pull_products(x: Tensor, y: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """Gradients of sum_ij g_ij <x_i - y_j, u> (any per-pair scale already in g): with
    d dist_ij / d x_i = g_ij (x_i - y_j), they are X * rowsum(G) - G Y and Y * colsum(G) - G' X."""
    return x * g.sum(-1, keepdim=True) - torch.bmm(g, y), y * g.sum(1).unsqueeze(-1) - torch.bmm(g.transpose(1, 2), x)


def _pull_l1(x: Tensor, y: Tensor, dist: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    # d |x - y|_1 / d x_t = sign(x_t - y_t), one coordinate at a time
    gx, gy = torch.empty_like(x), torch.empty_like(y)
    for t in range(x.shape[-1]):
        part = torch.sub(x[..., t : t + 1], y[..., t].unsqueeze(1)).sign_().mul_(g)
        gx[..., t], gy[..., t] = part.sum(-1), part.sum(1).neg_()
    return gx, gy


def _pull_l2(x: Tensor, y: Tensor, dist: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    return _pull_products(x, y, g.div_(dist.clamp_min(1e-12)))  # d|x - y| = (x - y) / |x - y|


def _pull_sql2(x: Tensor, y: Tensor, dist: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    return _pull_products(x, y, g.mul_(2))  # d|x - y|^2 = 2 (x - y)


METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        Metric("l1", "sum |x - y| (the paper's metric); sorted-prefix-sum weight-free path",
               lambda x, y: torch.cdist(x, y, p=1), _pull_l1, weight_free=True),
        Metric("l2", "Euclidean distance", lambda x, y: torch.cdist(x, y, p=2), _pull_l2),
        Metric("sql2", "squared Euclidean distance: rank <= H*d + 2 relations (docs/method.md)",
               _sql2, _pull_sql2, low_rank=True, weight_free=True),
    )
}

KERNELS: dict[str, Kernel] = {
    k.name: k
    for k in (
        Kernel("linear", "phi(t) = t (the authors' general fit)", lambda d: d, lambda d, r: torch.ones_like(d), linear=True),
        Kernel("inverse", f"phi(t) = 1 / (t + {INVERSE_EPS}) (the authors' LeNet toy)",
               lambda d: 1.0 / (d.clamp_min(0) + INVERSE_EPS), lambda d, r: r.pow(2).neg_()),
        # exp(-t^2) = 1 - t^2 + ...: near the sql2 form (truncated SVD) at small distances, full rank
        # beyond; with l2, 0.944x SVD's error on the digits CNN (benchmarks/fit_quality.py, d <= 2)
        Kernel("gauss", "phi(t) = exp(-t^2) (with l2: the Gaussian kernel)", lambda d: torch.exp(-d * d),
               lambda d, r: d.mul(-2).mul_(r), svd_start=0.5),
    )
}


def metric(name: str) -> Metric:
    try:
        return METRICS[name]
    except KeyError:
        raise ValueError(f"unknown metric {name!r}; choose one of {', '.join(METRICS)}") from None


def kernel(name: str) -> Kernel:
    try:
        return KERNELS[name]
    except KeyError:
        raise ValueError(f"unknown kernel {name!r}; choose one of {', '.join(KERNELS)}") from None


def low_rank(metric_name: str, kernel_name: str) -> bool:
    """Whether the relations are thin factors (materialized and fitted without the (H, m, n) tensor
    by products of width H*d: sql2 with the linear kernel)."""
    return metric(metric_name).low_rank and kernel(kernel_name).linear


def weight_free_path(metric_name: str, kernel_name: str) -> str | None:
    """The weight-free forward for this pair (named as the metric), or None: runs materialized."""
    return metric_name if metric(metric_name).weight_free and kernel(kernel_name).linear else None
