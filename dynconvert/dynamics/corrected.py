"""A quantized weight plus a thin dynamics-states correction: the ``intK + states(H)`` form.

The dense weight ``base`` sits on an integer grid (group-wise, ``budget.quant``); the states
(sql2 metric, linear kernel) hold what the rounding lost, fitted in the activation-whitened
space (LQER / EoRA do the same with a plain low-rank term). The forward never builds the
correction densely: with ``W_states = left right' + a 1' + 1 b' + offset`` (``sql2_factors``)
it is two thin products, ``x -> [right, 1, b]' x`` (H*d + 2 values) then ``[left, a + offset, 1]``,
which an ONNX export keeps as two thin Conv/MatMul nodes beside the quantized base.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .modules import DynConv2d, DynLinear, DynSpec, sql2_factors


def thin_factors(layer) -> tuple[torch.Tensor, torch.Tensor]:
    """(left (m, H*d + 2), right (n, H*d + 2)) with left @ right.T == the states' weight."""
    left, right, a, b = sql2_factors(layer.states_out, layer.states_in, layer.coupling)
    ones_m, ones_n = left.new_ones(left.shape[0], 1), right.new_ones(right.shape[0], 1)
    return torch.cat([left, (a + layer.offset)[:, None], ones_m], 1), torch.cat([right, ones_n, b[:, None]], 1)


class _Corrected:
    """Shared part: ``weight`` is base + the states' relations (for consumers that need it dense)."""

    base: nn.Parameter

    @property
    def weight(self) -> torch.Tensor:
        return self.base + super().weight


class CorrectedLinear(_Corrected, DynLinear):
    """``nn.Linear`` whose weight is a quantized ``base`` plus an sql2 states correction."""

    def __init__(self, in_features: int, out_features: int, bias: bool, spec: DynSpec):
        super().__init__(in_features, out_features, bias, spec)
        self.base = nn.Parameter(torch.zeros(out_features, in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left, right = thin_factors(self)
        return F.linear(x, self.base, self.bias) + F.linear(F.linear(x, right.T), left)


class CorrectedConv2d(_Corrected, DynConv2d):
    """``nn.Conv2d`` (groups 1) whose kernel is a quantized ``base`` plus an sql2 states correction."""

    def __init__(self, in_channels, out_channels, kernel_size, stride, padding, dilation, conv_groups, bias, spec):
        if conv_groups != 1:
            raise ValueError("a state correction needs a conv with groups=1")
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, conv_groups, bias, spec)
        self.base = nn.Parameter(torch.zeros(self.weight_shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left, right = thin_factors(self)
        r = right.shape[1]
        thin = F.conv2d(x, right.T.reshape(r, *self.weight_shape[1:]), None, **self.conv_kwargs())
        return F.conv2d(x, self.base, self.bias, **self.conv_kwargs()) + F.conv2d(thin, left[:, :, None, None])
