"""How each converted layer is laid out in an ONNX graph, and the rule that picks it.

Three layouts of a converted layer: ``materialized`` (the dense weight: the original
architecture), ``factorized`` (sql2 relations as two thin convs / matmuls, ``factorized_pair``)
and ``weight-free`` (the states and sort orders, computed with Gather/CumSum/MatMul). ``auto`` picks
per layer by ``predicted_ms``, a cost model of ONNX Runtime's CPU kernels (as ``fused.layer_path``
does for PyTorch), at the input vectors the layer multiplies per call of one input.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from ..dynamics.attention import with_module_calls
from ..dynamics.modules import DynamicsLayer, DynLinear, set_submodule, sql2_factors
from ..dynamics.weightfree import to_weight_free, vectors_per_call, weight_free_path
from ..errors import DynError

LAYOUTS = ("auto", "materialized", "factorized", "weight-free")

# ONNX Runtime 1.32, 2 intra-op threads, this project's 2-core machine, from whole-model figures
# (ResNet-18 recipe at batch 1, idle cores, issue 19: original 38.7 ms for 1.82 GMACs; factorized
# 0.39x = 15.1 ms, 0.44 GMACs in the thin layers; weight-free 104.8 ms for 4.1e8 steps) and one
# layer (Linear 1024x4096, batch 1: dense 0.201 ms, weight-free L1 H*d = 2: 0.095 ms): a dense
# conv/matmul runs at DENSE_MACS_PER_S, or reads its weight at DENSE_BYTES_PER_S when that is
# slower (a matvec), plus a fixed cost per node; the thin ones at THIN_EFFICIENCY of the rate; the
# weight-free graph costs WF_STEP_S per (vector, channel, input-or-output element) plus WF_NODE_S.
DENSE_MACS_PER_S = 47e9
DENSE_BYTES_PER_S = 80e9
THIN_EFFICIENCY = 0.75
NODE_S = 15e-6
WF_STEP_S = 2.5e-10
WF_NODE_S = 90e-6
MARGIN = 0.8
"""A layout other than materialized is picked only when predicted below this fraction of dense."""
FIT = 1.5
"""For a budgeted file, a layout competes when its weights take at most this times the layer's
bytes in the file (int8 factors carry two float rows/columns more than the states)."""


def predicted_ms(layer: DynamicsLayer, vectors: int) -> dict[str, float]:
    """Layout -> predicted ONNX Runtime milliseconds of ``layer`` over ``vectors`` input vectors
    (batch x output positions); only the layouts the layer has."""
    m, n = layer.matrix_shape
    g = getattr(layer, "conv_groups", 1)
    out = {"materialized": 1e3 * (NODE_S + max(vectors * m * n * g / DENSE_MACS_PER_S, 4 * m * n / DENSE_BYTES_PER_S))}
    spec = layer.spec
    if (spec.metric, spec.kernel) == ("sql2", "linear"):
        rank = spec.groups * spec.dim + 2
        macs = vectors * g * rank * (n + m / g)
        weights = 4 * rank * (g * n + m)
        out["factorized"] = 1e3 * (2 * NODE_S + max(macs / (DENSE_MACS_PER_S * THIN_EFFICIENCY), weights / DENSE_BYTES_PER_S))
    if weight_free_path(layer) is not None:
        out["weight-free"] = 1e3 * (WF_NODE_S + vectors * spec.groups * spec.dim * (g * n + m) * WF_STEP_S)
    return out


def graph_bytes(layer: DynamicsLayer, stored_bytes: int) -> dict[str, int]:
    """Layout -> about the bytes the layer's weights take in the graph; ``stored_bytes``: its
    states in the .dyn (the weight-free graph carries them, L1 also int64 sort orders)."""
    spec, (m, n) = layer.spec, layer.matrix_shape
    g, channels = getattr(layer, "conv_groups", 1), spec.groups * spec.dim
    rank = channels + 2
    factorized = 4 * rank * (g * n + m)
    if 0 < stored_bytes < factorized and g == 1:  # int8 states: the factors' state rows stay integers
        factorized = stored_bytes + 8 * (n + m) + 4 * m
    return {"materialized": 4 * m * n, "factorized": factorized,
            "weight-free": stored_bytes + (8 * channels * g * n if weight_free_path(layer) == "l1" else 0)}


def auto_choice(layer: DynamicsLayer, vectors: int, stored_bytes: int | None = None) -> str:
    """The predicted fastest layout, materialized unless another is clearly (``MARGIN``) faster.
    With ``stored_bytes`` (a file converted to a byte budget), only layouts that keep about the
    layer's bytes in the .dyn compete, and the smallest wins when none does."""
    times = predicted_ms(layer, vectors)
    if stored_bytes is not None:
        sizes = {k: v for k, v in graph_bytes(layer, stored_bytes).items() if k in times}
        fits = {k: times[k] for k in times if sizes[k] <= FIT * stored_bytes + 1024}
        if not fits:
            return min(sizes, key=sizes.get)
        if "materialized" not in fits:
            return min(fits, key=fits.get)
    best = min(times, key=times.get)
    return best if times[best] < MARGIN * times["materialized"] else "materialized"


def plan(net: nn.Module, input_size, layout: str, stored: dict[str, int] | None = None) -> dict[str, str]:
    """Converted layer name -> the layout it gets (before checking it has one). ``stored``: for a
    file with a byte budget, each converted layer's bytes in it (see ``auto_choice``)."""
    if layout not in LAYOUTS:
        raise DynError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    names = [n for n, m in net.named_modules() if isinstance(m, DynamicsLayer)]
    if layout != "auto":
        return {n: layout for n in names}
    vectors = vectors_per_call(net, input_size, batch=1)
    # a quantized weight with a state correction (corrected.py) is already as small as it gets
    # beside its thin correction: its dense form would lose the integer grid
    return {n: "factorized" if _corrected(net.get_submodule(n)) else
            auto_choice(net.get_submodule(n), vectors.get(n, 1), None if stored is None else stored.get(n, 0))
            for n in names}


def _corrected(layer: nn.Module) -> bool:
    return getattr(layer, "base", None) is not None


class CorrectedForm(nn.Module):
    """A corrected layer (corrected.py) for export: its quantized base as a plain Linear/Conv2d
    (the exporter keeps its integers) plus the correction's two thin layers (``factorized_pair``)."""

    def __init__(self, layer: DynamicsLayer):
        super().__init__()
        with torch.no_grad():
            self.base = layer.to_dense()
            self.base.weight.copy_(layer.base.reshape(self.base.weight.shape))
            self.correction = factorized_pair(layer)
            self.correction[1].bias = None  # the base carries the bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.correction(x)


def factorized_pair(layer: DynamicsLayer) -> nn.Sequential:
    """A sql2 layer as two thin layers. Squared-L2 states are a rank-(H*d + 2) factorization
    (``sql2_factors``): ``W x = L (R' x) + (a + offset) (1' x) + 1 (b' x)``. So a conv becomes a
    conv with H*d + 2 output channels (rows R', 1', b'; same kernel, stride and padding) and a 1x1
    conv (columns L, a + offset, 1), and a Linear two Linears: (H*d + 2)(m + n) multiply-adds per
    output position instead of m n, in the runtime's own fast kernels."""
    spec, (m, n) = layer.spec, layer.matrix_shape
    rank = spec.groups * spec.dim + 2
    with torch.no_grad():
        left, right, a, b = sql2_factors(layer.states_out, layer.states_in, layer.coupling)
        inner = torch.cat([right.T, torch.ones(1, n), b[None]])  # (rank, n)
        outer = torch.cat([left, (a + layer.offset)[:, None], torch.ones(m, 1)], 1)  # (m, rank)
        has_bias = layer.bias is not None
        if isinstance(layer, DynLinear):
            first, second = nn.Linear(n, rank, bias=False), nn.Linear(rank, m, bias=has_bias)
            first.weight.copy_(inner)
            second.weight.copy_(outer)
        else:
            g = layer.conv_groups  # every group applies the same inner rows to its own inputs
            first = nn.Conv2d(layer.in_channels, g * rank, layer.kernel_size, bias=False, **layer.conv_kwargs())
            second = nn.Conv2d(g * rank, m, 1, groups=g, bias=has_bias)
            first.weight.copy_(inner.reshape(rank, *layer.weight_shape[1:]).repeat(g, 1, 1, 1))
            second.weight.copy_(outer.reshape(m, rank, 1, 1))
        if has_bias:
            second.bias.copy_(layer.bias)
    return nn.Sequential(first, second)


def _why_not_factorized(layer: DynamicsLayer, parent: nn.Module) -> str | None:
    spec, (m, n) = layer.spec, layer.matrix_shape
    rank = spec.groups * spec.dim + 2
    if isinstance(parent, nn.MultiheadAttention):
        return "inside an attention that has no module-call form"
    if (spec.metric, spec.kernel) != ("sql2", "linear"):
        return f"{spec.metric}/{spec.kernel} relations are not a low-rank product"
    if rank * (m + n) >= m * n:
        return f"rank {rank} costs no less than the dense {m}x{n}"
    return None


def build(net: nn.Module, choices: dict[str, str]) -> tuple[nn.Module, dict[str, str], list[tuple[str, str]]]:
    """A copy of ``net`` with each converted layer in its chosen layout. Returns (module, the
    layout each layer got, ``(name, reason)`` for the layers that stay materialized against their
    choice)."""
    # an MHA reads its projections' weights instead of calling them: the module-call form calls
    # each one, so that two thin layers (or a weight-free module) can stand in for it
    wants_calls = any(c != "materialized" for c in choices.values())
    model = with_module_calls(copy.deepcopy(net).eval()) if wants_calls else copy.deepcopy(net).eval()
    got, kept = {}, []
    for name, layer in [(n, m) for n, m in model.named_modules() if isinstance(m, DynamicsLayer)]:
        choice = choices.get(name, "materialized")
        parent = model.get_submodule(name.rpartition(".")[0])
        if choice != "materialized" and _corrected(layer):  # has no other compact form
            set_submodule(model, name, CorrectedForm(layer))
            got[name] = "factorized"
            continue
        if choice == "factorized" and (why := _why_not_factorized(layer, parent)):
            kept.append((name, why))
            choice = "materialized"
        if choice == "materialized":
            set_submodule(model, name, layer.to_dense())
        elif choice == "factorized":
            set_submodule(model, name, factorized_pair(layer))
        got[name] = choice
    if any(c == "weight-free" for c in got.values()):  # the layers left converted
        model, no_path = to_weight_free(model)
        for name, why in no_path:
            kept.append((name, why))
            got[name] = "materialized"
            set_submodule(model, name, model.get_submodule(name).to_dense())
    return model.eval(), got, kept
