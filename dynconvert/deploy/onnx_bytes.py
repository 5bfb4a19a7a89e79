"""The bytes of an exported ONNX graph against the .dyn it came from: every initializer is charged,
by value, to the tensor (or converted layer) of the file it holds, so an export can say exactly
which tensors grew and refuse a graph over the file's byte budget. Used by export.export_onnx.
"""

from __future__ import annotations

import numpy as np

from ..errors import DynError
from .onnx_quant import QUANT_MIN_NUMEL, Index, Source


def _nbytes(init) -> int:
    from onnx import TensorProto, numpy_helper

    if init.data_type in (TensorProto.INT4, TensorProto.UINT4):
        return (int(np.prod(init.dims)) + 1) // 2
    return len(init.raw_data) if init.raw_data else numpy_helper.to_array(init).nbytes


def initializer_bytes(model) -> int:
    """Bytes of all initializers of an ONNX ``model`` (int4 packed two to a byte)."""
    return sum(_nbytes(i) for i in model.graph.initializer)


def budget_check(model, dense, stored: dict, meta: dict) -> tuple[int, list[str]]:
    """(bytes of all initializers of ``model``, one line per tensor with more bytes in the graph
    than in the .dyn). Float initializers are named by value after the exported module's tensors
    (``dense``) and charged to the converted layer they belong to; a quantized tensor of the .dyn
    that no integer initializer holds is named too."""
    from onnx import TensorProto, numpy_helper

    total = initializer_bytes(model)
    if not meta:
        return total, []
    layers = sorted(meta.get("layers", {}), key=len, reverse=True)

    def owner(name: str) -> str:
        return next((layer for layer in layers if name.startswith(layer + ".")), name)

    in_dyn: dict[str, int] = {}
    for key, t in stored.items():
        o = owner(key.split(":")[0])
        in_dyn[o] = in_dyn.get(o, 0) + t.numel() * t.element_size()
    quantized = {k for k, v in (meta.get("quantized") or {}).items() if v.get("bits") != 16}
    named = [Source(k, 32, v.detach().float().reshape(v.shape[0], -1).numpy())
             for k, v in dense.state_dict().items() if v.is_floating_point() and v.ndim >= 2 and v.numel() >= QUANT_MIN_NUMEL]
    index, in_graph, float_left = Index(named), {}, []
    for init in model.graph.initializer:
        if init.data_type != TensorProto.FLOAT or _nbytes(init) < 1024:
            continue
        found = index.match(numpy_helper.to_array(init))
        name = found[0].name if found else init.name
        o = owner(name)
        in_graph[o] = in_graph.get(o, 0) + _nbytes(init)
        if name in quantized:
            float_left.append(name)
    grew = [f"{name}: stored as integers in the .dyn but float in the graph" for name in float_left]
    for o, n in sorted(in_graph.items(), key=lambda kv: -kv[1]):
        if o in in_dyn and n > 1.1 * in_dyn[o] + 1024 and o not in float_left:
            grew.append(f"{o}: {in_dyn[o]:,} B in the .dyn, {n:,} B of float in the graph")
    return total, grew


def over_budget(nbytes: int, weight_bytes: int, budget: int, grew: list[str]):
    """The one-line refusal of an export whose bytes on disk exceed the file's budget: what grew,
    or, when the weights fit, that the graph's own structure (nodes, names) does not fit beside them
    (a small network's graph can outweigh what its compression saves)."""
    if grew or weight_bytes > budget:
        why = f"grew: {'; '.join(grew[:6]) or 'no single tensor'}. Choose another --layout, or pass --allow-larger"
    else:
        why = (f"the weights fit, the graph's structure ({nbytes - weight_bytes:,} B of nodes and names) does not. "
               "Pass --allow-larger to write it anyway")
    return DynError(f"the ONNX file would be {nbytes:,} bytes on disk ({weight_bytes:,} of weights), over the file's "
                    f"budget of {budget:,}; {why}; no file written")
