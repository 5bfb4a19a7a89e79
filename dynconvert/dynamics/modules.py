"""The dynamics-based layer: sub-model states and the relations between them.

This module is the only place that knows the method's math (Pei & Wang, ICML 2023). A weight
matrix ``W`` of shape ``m x n`` becomes ``H`` groups of sub-model states, output states ``X_k``
(``m x d``) and input states ``Y_k`` (``n x d``), one coupling coefficient ``lambda_k`` per group
and one scalar offset::

    W_hat[i, j] = offset + sum_k lambda_k * phi(dist(X_k[i], Y_k[j]))

A convolution's weight ``(out, in/groups, kh, kw)`` is treated as the matrix
``out x (in/groups * kh * kw)``: each output channel is a sub-model, each (input channel, kernel
position) an input sub-model. (The paper's LeNet toy shares states across kernel positions; we
do not, so any conv can be converted with one rule.)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import metrics

METRICS = tuple(metrics.METRICS)
"""Metric names; what each one is lives in the registry (``metrics.py``)."""
KERNELS = tuple(metrics.KERNELS)


@dataclass(frozen=True)
class DynSpec:
    """How one layer is represented: H groups of d-dimensional states, a metric and a kernel."""

    groups: int
    dim: int
    metric: str = "sql2"
    kernel: str = "linear"

    def __post_init__(self) -> None:
        if self.groups < 1 or self.dim < 1:
            raise ValueError(f"groups and dim must be >= 1, got groups={self.groups} dim={self.dim}")
        metrics.metric(self.metric), metrics.kernel(self.kernel)  # ValueError naming the choices

    @property
    def rank_budget(self) -> int:
        """H*d: the rank of the truncated SVD that costs the same (``(m+n)`` per rank)."""
        return self.groups * self.dim

    def state_params(self, m: int, n: int) -> int:
        """Parameters of a layer in this form: states, couplings and the offset."""
        return self.groups * self.dim * (m + n) + self.groups + 1

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DynSpec":
        return cls(int(d["groups"]), int(d["dim"]), str(d["metric"]), str(d["kernel"]))


def choose_spec(m: int, n: int, ratio: float, max_dim: int, metric: str, kernel: str) -> DynSpec | None:
    """A spec whose parameters fit in ``ratio * m * n``, with H*d near the largest that fits.

    ``None`` when not even one group of one dimension
    fits, i.e. the layer cannot be compressed at this ratio.
    """
    budget = math.floor(ratio * m * n)
    cands = []
    for dim in range(1, max_dim + 1):
        groups = (budget - 1) // (dim * (m + n) + 1)
        if groups >= 1:
            cands.append(DynSpec(groups, dim, metric, kernel))
    if not cands:
        return None
    # Richer states (larger d) fit better at equal H*d; give up at most 10% of the budget for them.
    most = max(c.rank_budget for c in cands)
    return max((c for c in cands if c.rank_budget >= 0.9 * most), key=lambda c: (c.dim, c.rank_budget))


def distances(x: torch.Tensor, y: torch.Tensor, metric: str) -> torch.Tensor:
    """Pairwise distances per group: ``x`` (H, m, d), ``y`` (H, n, d) -> (H, m, n)."""
    return metrics.metric(metric).distance(x, y)


def relations(x: torch.Tensor, y: torch.Tensor, metric: str, kernel: str) -> torch.Tensor:
    """phi(dist): the relation of every output state to every input state, (H, m, n)."""
    return metrics.kernel(kernel).phi(distances(x, y, metric))


def materialize(
    x: torch.Tensor, y: torch.Tensor, coupling: torch.Tensor, offset: torch.Tensor, metric: str, kernel: str
) -> torch.Tensor:
    """The (m, n) weight matrix the states stand for."""
    if metrics.low_rank(metric, kernel):
        return sql2_lowrank(x, y, coupling, offset)
    rel = relations(x, y, metric, kernel)
    return torch.einsum("h,hmn->mn", coupling, rel) + offset


def sql2_factors(x: torch.Tensor, y: torch.Tensor, coupling: torch.Tensor):
    """The squared-L2 relations as thin factors, using
    ``sum_k c_k |x_ki - y_kj|^2 = a_i + b_j - 2 sum_k c_k <x_ki, y_kj>``: returns (left (m, H*d),
    right (n, H*d), a (m,), b (n,)) with W - offset = left @ right' + a 1' + 1 b'. The materialized
    and the weight-free paths both build on it."""
    h, m, d = x.shape
    # distances are unchanged when a group's states move together; centred, the norms stay small
    # and float32 loses less to cancellation between a_i + b_j and the product
    centre = torch.cat([x, y], 1).mean(1, keepdim=True)
    x, y = x - centre, y - centre
    # elementwise sums, not einsum: no matmul for FLOP counters to charge to the weight-free path
    a = (coupling[:, None] * x.pow(2).sum(-1)).sum(0)
    b = (coupling[:, None] * y.pow(2).sum(-1)).sum(0)
    left = (x * (-2 * coupling)[:, None, None]).permute(1, 0, 2).reshape(m, h * d)
    right = y.permute(1, 0, 2).reshape(y.shape[1], h * d)
    return left, right, a, b


def sql2_lowrank(x: torch.Tensor, y: torch.Tensor, coupling: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """Squared-L2 relations materialized without the (H, m, n) tensor: one (m, H*d) x (H*d, n)
    product plus row and column terms (``sql2_factors``)."""
    left, right, a, b = sql2_factors(x, y, coupling)
    return torch.addmm(a[:, None] + b[None, :] + offset, left, right.T)


class DynamicsLayer(nn.Module):
    """Shared part of the converted layers: the states and the weight they materialize to."""

    matrix_shape: tuple[int, int]
    weight_shape: tuple[int, ...]

    def _init_states(self, spec: DynSpec, m: int, n: int) -> None:
        self.spec = spec
        self.matrix_shape = (m, n)
        self.states_out = nn.Parameter(torch.zeros(spec.groups, m, spec.dim))
        self.states_in = nn.Parameter(torch.zeros(spec.groups, n, spec.dim))
        self.coupling = nn.Parameter(torch.zeros(spec.groups))
        self.offset = nn.Parameter(torch.zeros(()))
        self._cache: tuple[tuple, torch.Tensor] | None = None

    def set_states(self, states_out, states_in, coupling, offset) -> None:
        with torch.no_grad():
            self.states_out.copy_(states_out)
            self.states_in.copy_(states_in)
            self.coupling.copy_(torch.as_tensor(coupling).reshape(self.coupling.shape))
            self.offset.copy_(torch.as_tensor(offset).reshape(()))

    def _filled(self, dense: nn.Module) -> nn.Module:
        """``dense`` (the layer this one replaced) with the materialized weight and the bias."""
        with torch.no_grad():
            dense.weight.copy_(self.weight)
            if self.bias is not None:
                dense.bias.copy_(self.bias)
        return dense

    def state_parameters(self) -> list[nn.Parameter]:
        return [self.states_out, self.states_in, self.coupling, self.offset]

    def num_state_params(self) -> int:
        return sum(p.numel() for p in self.state_parameters())

    def weight_matrix(self) -> torch.Tensor:
        return materialize(
            self.states_out, self.states_in, self.coupling, self.offset, self.spec.metric, self.spec.kernel
        )

    @property
    def weight(self) -> torch.Tensor:
        """The materialized weight, in the dense layer's shape.

        Recomputed whenever gradients flow (training); otherwise cached until a state changes.
        """
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.state_parameters()):
            return self.weight_matrix().reshape(self.weight_shape)
        key = tuple((p._version, p.data_ptr(), p.device, p.dtype) for p in self.state_parameters())
        if self._cache is None or self._cache[0] != key:
            with torch.no_grad():
                self._cache = (key, self.weight_matrix().reshape(self.weight_shape))
        return self._cache[1]

    def extra_repr(self) -> str:
        s = self.spec
        return f"{super().extra_repr()}, groups_H={s.groups}, dim={s.dim}, metric={s.metric}, kernel={s.kernel}"


class DynLinear(DynamicsLayer):
    """``nn.Linear`` whose weight is the relations among sub-model states."""

    def __init__(self, in_features: int, out_features: int, bias: bool, spec: DynSpec):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight_shape = (out_features, in_features)
        self._init_states(spec, out_features, in_features)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @classmethod
    def from_dense(cls, layer: nn.Linear, spec: DynSpec) -> "DynLinear":
        new = cls(layer.in_features, layer.out_features, layer.bias is not None, spec)
        if layer.bias is not None:
            new.bias.data.copy_(layer.bias.detach())
        return new

    def to_dense(self) -> nn.Linear:
        return self._filled(nn.Linear(self.in_features, self.out_features, bias=self.bias is not None))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}" + (
            super().extra_repr()
        )


class DynConv2d(DynamicsLayer):
    """``nn.Conv2d`` (any stride, padding, dilation, groups) whose kernel comes from states."""

    def __init__(self, in_channels, out_channels, kernel_size, stride, padding, dilation, conv_groups, bias, spec):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = tuple(kernel_size)
        self.stride, self.padding, self.dilation = tuple(stride), padding, tuple(dilation)
        if isinstance(self.padding, list):
            self.padding = tuple(self.padding)
        self.conv_groups = conv_groups
        kh, kw = self.kernel_size
        self.weight_shape = (out_channels, in_channels // conv_groups, kh, kw)
        self._init_states(spec, out_channels, in_channels // conv_groups * kh * kw)
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None

    @staticmethod
    def convertible(layer: nn.Conv2d) -> str | None:
        """Why a conv cannot be converted, or None when it can."""
        if layer.padding_mode != "zeros":
            return f"padding_mode={layer.padding_mode!r} is not supported"
        if type(layer) is not nn.Conv2d and (tuple(layer.kernel_size) != (1, 1) or tuple(layer.stride) != (1, 1)):
            # a subclass may pad or otherwise act in its own forward (EfficientNet's "same" convs);
            # a 1x1 stride-1 conv has nothing to pad, so replacing it keeps what it computes
            return f"{type(layer).__name__} (a Conv2d subclass with its own forward) is only converted when 1x1"
        if layer.groups == layer.in_channels and layer.in_channels > 1:
            return "depthwise convolution (too few weights per channel to compress)"
        return None

    @classmethod
    def from_dense(cls, layer: nn.Conv2d, spec: DynSpec) -> "DynConv2d":
        new = cls(
            layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
            layer.dilation, layer.groups, layer.bias is not None, spec,
        )
        if layer.bias is not None:
            new.bias.data.copy_(layer.bias.detach())
        return new

    def conv_kwargs(self) -> dict:
        return dict(stride=self.stride, padding=self.padding, dilation=self.dilation, groups=self.conv_groups)

    def to_dense(self) -> nn.Conv2d:
        return self._filled(nn.Conv2d(
            self.in_channels, self.out_channels, self.kernel_size, bias=self.bias is not None, **self.conv_kwargs()
        ))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias, **self.conv_kwargs())

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, groups={self.conv_groups}" + super().extra_repr()
        )


def dense_matrix(layer: nn.Module) -> torch.Tensor:
    """The weight of a dense Linear/Conv2d as the (m, n) matrix the states reproduce."""
    w = layer.weight.detach()
    return w.reshape(w.shape[0], -1)


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at ``name``; a layer that replaces a parameter (an MHA projection) installs itself.
    Here, not in conversion.py, so that the reader (dynfile/rebuild.py) does not load the fitting stack."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if hasattr(new, "install_into"):
        new.install_into(parent, child)
    else:
        setattr(parent, child, new)
