"""What fine-tuning trains, and how: parameter groups with their step sizes, the schedule, the
distillation loss, and the structural entropy it logs.

Trainable layers: every ``DynamicsLayer`` (its states), and any layer implementing ``Factorized``
(for example the demo's truncated-SVD baseline), whose factors train like states.
"""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..dynamics.modules import DynamicsLayer, relations
from ..errors import DynError


@runtime_checkable
class Factorized(Protocol):
    """A layer whose weight is a product of trainable factors; fine-tuning trains them like states."""

    def trainable_factors(self) -> list[nn.Parameter]: ...


def dyn_layers(model: nn.Module) -> dict[str, DynamicsLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, DynamicsLayer)}


@torch.no_grad()
def structural_entropy(layer: DynamicsLayer) -> float:
    """Normalized Shannon entropy of the relation magnitudes ``|lambda_k phi(dist(x_ki, y_kj))|``.

    p = magnitudes / their sum over all (k, i, j); S = -sum p log p / log(H m n), in [0, 1]:
    1 when every relation carries the same weight, lower when a few relations dominate.
    """
    s = layer.spec
    rel = relations(layer.states_out.float(), layer.states_in.float(), s.metric, s.kernel)
    a = (layer.coupling.float().view(-1, 1, 1) * rel).abs().flatten()
    total = a.sum()
    if a.numel() < 2 or total <= 0:
        return 0.0
    p = a / total
    return float(-(p * torch.log(p.clamp_min(1e-30))).sum() / math.log(a.numel()))


def param_groups(model: nn.Module, optimizer: str, train: str) -> list[dict]:
    """What trains, with per-tensor step sizes that keep couplings from swamping the positions.

    A coupling (and the offset) scales every relation of its layer, so its gradient is a sum over
    all m*n weights. With SGD its step is divided by m*n (the mean stress force per relation);
    with Adam, whose steps are O(lr) whatever the gradient, by the coupling-to-position scale.
    """
    groups, seen = [], set()
    for layer in dyn_layers(model).values():
        m, n = layer.matrix_shape
        if optimizer == "sgd":
            scale = 1.0 / (m * n)
        else:
            pos = torch.cat([layer.states_out.detach().flatten(), layer.states_in.detach().flatten()]).abs().mean()
            scale = float((layer.coupling.detach().abs().mean() / pos.clamp_min(1e-12)).clamp(1e-4, 1.0))
        groups.append(dict(params=[layer.states_out, layer.states_in], lr_scale=1.0, kind="states"))
        groups.append(dict(params=[layer.coupling, layer.offset], lr_scale=scale, kind="coupling"))
        seen.update(id(p) for p in layer.state_parameters())
    for layer in model.modules():  # other factorized layers (e.g. the truncated-SVD baseline) train like states
        if isinstance(layer, Factorized):
            factors = layer.trainable_factors()
            groups.append(dict(params=factors, lr_scale=1.0, kind="states"))
            seen.update(id(p) for p in factors)
    if not groups and train == "states":  # a byte-budgeted file may hold only quantized dense layers
        raise DynError("the model has no converted (dynamics-based) layers to fine-tune; train other parameters "
                       "with --train all or --train states+bias")
    extra = []
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        is_bias_or_norm = name.endswith("bias") or p.ndim <= 1
        if train == "all" or (train == "states+bias" and is_bias_or_norm):
            extra.append(p)
    if extra:
        groups.append(dict(params=extra, lr_scale=1.0, kind="other"))
    trained = {id(p) for g in groups for p in g["params"]}
    for p in model.parameters():
        p.requires_grad_(id(p) in trained)
    return groups


def lr_factor(step: int, total: int, schedule: str) -> float:
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(step, total) / max(total, 1)))
    if schedule == "step":  # x0.1 at half and at three quarters of the run
        return 0.1 ** ((step >= total // 2) + (step >= (3 * total) // 4))
    return 1.0


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) on logits softened by ``temperature``, scaled by T^2 (Hinton et al.)."""
    t = temperature
    return F.kl_div(F.log_softmax(student / t, 1), F.log_softmax(teacher / t, 1), log_target=True, reduction="batchmean") * t * t
