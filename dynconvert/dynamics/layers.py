"""The layer-kind registry: the one place that knows each convertible kind of weight.

A kind says how to find its dense weights in a model, why one cannot be converted, how to make
the converted layer, how to rebuild it from a .dyn's ``config``, how to describe it there, and
which weight-free module runs it. ``plan``, ``.dyn`` writing and reading, export and the
weight-free path all go through ``KINDS``; adding a kind is one entry here.

Weights that no kind covers (a parameter a custom module multiplies by itself) are never silently
left dense: ``uncovered_parameters`` lists them with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch.nn as nn

from .attention import DynProj, ProjTarget, find_proj_target, proj_targets
from .corrected import CorrectedConv2d, CorrectedLinear
from .modules import DynConv2d, DynamicsLayer, DynLinear, DynSpec


@dataclass(frozen=True)
class LayerKind:
    name: str  # the "kind" recorded in a .dyn
    layer_class: type  # the converted layer
    targets: Callable[[str, nn.Module], list]  # (name, module) -> [(layer name, dense target)]
    why_not: Callable[[nn.Module], str | None]  # why a dense target cannot be converted, or None
    from_config: Callable[[dict, DynSpec], DynamicsLayer]  # rebuild from a .dyn's config
    config: Callable[[DynamicsLayer], dict]  # the config recorded in a .dyn
    weight_free: str  # name of the weight-free module class in weightfree.py

    def make(self, dense: nn.Module, spec: DynSpec) -> DynamicsLayer:
        """An (unfitted) converted layer for ``dense``, its bias copied."""
        return self.layer_class.from_dense(dense, spec)


def _linear_config(layer: DynLinear) -> dict:
    return dict(in_features=layer.in_features, out_features=layer.out_features, bias=layer.bias is not None)


def _conv_config(layer: DynConv2d) -> dict:
    return dict(
        in_channels=layer.in_channels, out_channels=layer.out_channels, kernel_size=list(layer.kernel_size),
        stride=list(layer.stride), padding=list(layer.padding) if isinstance(layer.padding, tuple) else layer.padding,
        dilation=list(layer.dilation), groups=layer.conv_groups, bias=layer.bias is not None,
    )


def _modules_of(cls):
    return lambda name, module: [(name, module)] if isinstance(module, cls) else []


KINDS: tuple[LayerKind, ...] = (
    # most specific first: a DynProj and a CorrectedLinear are also DynLinears.
    # A quantized weight plus a state correction (budgets only: no dense layer is their target)
    LayerKind(
        "linear+q", CorrectedLinear, lambda name, module: [], lambda layer: None,
        lambda c, spec: CorrectedLinear(c["in_features"], c["out_features"], c["bias"], spec),
        _linear_config, "",
    ),
    LayerKind(
        "conv2d+q", CorrectedConv2d, lambda name, module: [], lambda layer: None,
        lambda c, spec: CorrectedConv2d(c["in_channels"], c["out_channels"], c["kernel_size"], c["stride"],
                                        c["padding"], c["dilation"], c["groups"], c["bias"], spec),
        _conv_config, "",
    ),
    LayerKind(
        "mha_proj", DynProj, proj_targets, lambda target: None,
        lambda c, spec: DynProj(c["in_features"], c["out_features"], spec),
        lambda layer: dict(in_features=layer.in_features, out_features=layer.out_features),
        "WeightFreeLinear",
    ),
    LayerKind(
        "linear", DynLinear, _modules_of(nn.Linear), lambda layer: None,
        lambda c, spec: DynLinear(c["in_features"], c["out_features"], c["bias"], spec),
        _linear_config, "WeightFreeLinear",
    ),
    LayerKind(
        "conv2d", DynConv2d, _modules_of(nn.Conv2d), DynConv2d.convertible,
        lambda c, spec: DynConv2d(c["in_channels"], c["out_channels"], c["kernel_size"], c["stride"], c["padding"],
                                  c["dilation"], c["groups"], c["bias"], spec),
        _conv_config, "WeightFreeConv2d",
    ),
)
BY_NAME = {k.name: k for k in KINDS}


def kind_of(layer: DynamicsLayer) -> LayerKind:
    """The kind of a converted layer."""
    for k in KINDS:
        if isinstance(layer, k.layer_class):
            return k
    raise TypeError(f"{type(layer).__name__} is not a converted layer")


def dense_kind(dense: nn.Module) -> LayerKind | None:
    """The kind whose dense target ``dense`` is (a Linear, a Conv2d, an MHA projection), or None."""
    if isinstance(dense, ProjTarget):
        return BY_NAME["mha_proj"]
    return next((k for k in KINDS if k.name != "mha_proj" and k.targets("", dense)), None)


def find_targets(model: nn.Module):
    """Every dense weight some kind can convert: (layer name, kind, dense target), in module order."""
    for name, module in model.named_modules():
        if isinstance(module, DynamicsLayer):
            continue
        for k in KINDS:  # an MHA yields its projections; its out_proj is a Linear child of its own
            for target_name, target in k.targets(name, module):
                yield target_name, k, target


def make_dynamic(dense: nn.Module, spec: DynSpec) -> DynamicsLayer:
    """An (unfitted) dynamics-based replacement for a dense layer or MHA projection."""
    kind = dense_kind(dense)
    if kind is None:
        raise TypeError(f"cannot convert {type(dense).__name__}")
    return kind.make(dense, spec)


def dynamic_from_meta(kind: str, config: dict, spec: DynSpec) -> DynamicsLayer:
    """Rebuild an empty converted layer from the description stored in a .dyn file."""
    if kind not in BY_NAME:
        raise ValueError(f"unknown layer kind {kind!r}")
    return BY_NAME[kind].from_config(config, spec)


def layer_config(layer: DynamicsLayer) -> tuple[str, dict]:
    """(kind, constructor arguments) of a converted layer, for the .dyn metadata."""
    kind = kind_of(layer)
    return kind.name, kind.config(layer)


def dense_target(model: nn.Module, name: str) -> nn.Module:
    """The dense layer (or MHA projection) a converted layer ``name`` replaces; AttributeError if none."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    target = find_proj_target(parent, child)
    return target if target is not None else model.get_submodule(name)


def matrix_like(shape) -> bool:
    """At least two dimensions larger than 1: a weight that could be a matrix (not a scale or a token)."""
    return sum(s > 1 for s in shape) >= 2


def uncovered_parameters(model: nn.Module) -> list[tuple[str, str]]:
    """(parameter name, reason) for every matrix-like parameter that no kind converts: owned by a
    module that uses it in its own forward (a custom attention, a positional table, an embedding)."""
    out = []
    for name, module in model.named_modules():
        if isinstance(module, DynamicsLayer) or dense_kind(module) is not None \
                or isinstance(module, nn.MultiheadAttention):
            continue
        for pname, p in module.named_parameters(recurse=False):
            if p is None or not matrix_like(p.shape):
                continue
            full = f"{name}.{pname}" if name else pname
            shape = "x".join(map(str, p.shape))
            if isinstance(module, nn.Embedding):
                why = f"embedding table {shape} (a lookup, not a matrix product): left dense"
            else:
                why = (f"parameter {shape} used directly by {type(module).__name__}.forward (not an nn.Linear, "
                       "nn.Conv2d or nn.MultiheadAttention weight; dynconvert cannot rewrite that forward): left dense")
            out.append((full, why))
    return out


__all__ = ["KINDS", "LayerKind", "dense_kind", "dense_target", "dynamic_from_meta", "find_targets",
           "kind_of", "layer_config", "make_dynamic", "uncovered_parameters"]
