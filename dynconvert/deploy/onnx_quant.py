"""int8 initializers in an exported ONNX graph: weights that lie on an integer grid in the .dyn go
into the graph as int8 + scale + ``DequantizeLinear`` (or ``Cast`` + ``Mul``), so the .onnx file keeps
the .dyn's bytes. Used by export.export_onnx.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ..dynamics.modules import DynamicsLayer
from ..budget.quant import qmax, quantize, quantize_grouped, recover_scales
from ..dynamics.weightfree import WeightFreeCore


QUANT_MIN_NUMEL = 64
"""Smaller initializers stay float: their scales and the extra node would cost more than they save."""


def _grid(w: np.ndarray, bits: int, keep: list[int]) -> tuple[np.ndarray, np.ndarray] | None:
    """(int8 values, float32 scales shaped to broadcast) when ``w`` lies on a symmetric ``bits``-bit
    grid with one scale per slice along ``keep``, within float rounding; else None."""
    q_max = qmax(bits)
    reduce = tuple(i for i in range(w.ndim) if i not in keep)
    amax = np.abs(w).max(axis=reduce, keepdims=True) if reduce else np.abs(w)
    scale = np.maximum(amax / np.float32(q_max), np.float32(1e-12)).astype(np.float32)
    q = np.clip(np.rint(w / scale), -q_max, q_max)
    # a folded BatchNorm multiplies each output channel in float32: an ulp or so per value
    if not np.all(np.abs(q * scale - w) <= 1e-4 * scale):
        return None
    return q.astype(np.int8), scale


def weight_free_state_ints(net: nn.Module, wf: nn.Module, described: dict) -> dict[str, tuple]:
    """For the weight-free graph: initializer name -> (integers laid out like it, channel axis,
    channels) for the state tables of converted layers whose states are quantized.

    The tables hold the states per channel c = (group k, coordinate t), centred (a per-channel
    shift) and, for sql2, times -2 lambda_k (a per-channel factor); L1 sorts the input states.
    So each table's channel slice is ``alpha_c * integers + beta_c``; ``quantize_initializers``
    fits alpha and beta to the exported values and keeps them only when they reproduce them."""
    out: dict[str, tuple] = {}
    layers = {n: m for n, m in net.named_modules() if isinstance(m, DynamicsLayer)}
    for name, core in wf.named_modules():
        layer = layers.get(name.removesuffix(".core")) if name.endswith(".core") else None
        if not isinstance(core, WeightFreeCore) or layer is None:
            continue
        ints = {}
        for which in ("states_out", "states_in"):
            info = described.get(f"{name.removesuffix('.core')}.{which}")
            if info is None or 1 in info["keep"]:  # one scale per state row cannot be per channel
                continue
            ints[which] = quantize(getattr(layer, which).detach().float(), info["bits"], tuple(info["keep"]))[0]
        h, m, d = layer.states_out.shape
        n = layer.states_in.shape[1]
        c = h * d
        if core.path == "l1":
            if "states_in" in ints:
                rows = ints["states_in"].permute(0, 2, 1).reshape(c, n)
                out[f"{name}.ys"] = (torch.gather(rows, 1, core.order.long()).numpy(), 0, c)
            if "states_out" in ints:
                out[f"{name}.xs"] = (ints["states_out"].permute(0, 2, 1).reshape(c, m).numpy(), 0, c)
        else:  # sql2: xa (m, G+2) and ya (G+2, n); the last two columns / rows stay float
            if "states_out" in ints:
                out[f"{name}.xa"] = (ints["states_out"].permute(1, 0, 2).reshape(m, c).numpy(), 1, c)
            if "states_in" in ints:
                out[f"{name}.ya"] = (ints["states_in"].permute(1, 0, 2).reshape(n, c).t().contiguous().numpy(), 0, c)
    return out


def _affine_grid(a: np.ndarray, q: np.ndarray, axis: int):
    """(int8 values, positive float32 scales, float32 shifts) with ``a ~= scale * q + shift`` per
    slice along ``axis``, within float rounding; None when ``a`` is not such a map of ``q``."""
    a64, q64 = a.astype(np.float64), q.astype(np.float64)
    other = tuple(i for i in range(a.ndim) if i != axis)
    am, qm = a64.mean(axis=other, keepdims=True), q64.mean(axis=other, keepdims=True)
    var = ((q64 - qm) ** 2).sum(axis=other, keepdims=True)
    alpha = np.where(var > 0, ((a64 - am) * (q64 - qm)).sum(axis=other, keepdims=True) / np.where(var > 0, var, 1), 1.0)
    sign = np.where(alpha < 0, -1.0, 1.0)
    alpha = np.abs(alpha)
    alpha = np.where(alpha > 0, alpha, 1.0).astype(np.float32)
    q_signed = (q64 * sign).astype(np.int8)
    deq = q_signed.astype(np.float32) * alpha
    beta = (a64 - deq.astype(np.float64)).mean(axis=other, keepdims=True).astype(np.float32)
    recon = (deq + beta).astype(np.float64)
    mag = np.maximum(np.abs(a64).max(axis=other, keepdims=True), np.abs(beta.astype(np.float64)))
    tol = 1e-4 * alpha + 8 * np.finfo(np.float32).eps * mag
    if not np.all(np.abs(recon - a64) <= tol):
        return None
    return q_signed, alpha, beta


def quantize_initializers(path: Path, described: dict, opset: int, states: dict | None = None) -> list[str]:
    """Rewrite the ONNX file at ``path``: every float initializer shaped like a quantized tensor of
    the .dyn (or like its transpose, for a 2-D weight) that lies on that tensor's integer grid
    becomes int8 + scale + DequantizeLinear. ``states`` (``weight_free_state_ints``): state tables
    of a weight-free graph, which become int8 + scale + DequantizeLinear + a per-channel shift.
    Returns the names of the rewritten initializers."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    by_shape: dict[tuple, list[tuple[int, list[int]]]] = {}
    grouped = {tuple(i["shape"]): (i["bits"], i["group"]) for i in described.values() if "group" in i}
    for info in described.values():
        if "group" in info:
            continue
        shape, keep = tuple(info["shape"]), list(info["keep"])
        by_shape.setdefault(shape, []).append((info["bits"], keep))
        if len(shape) == 2:  # a Linear weight may be exported transposed (MatMul)
            by_shape.setdefault(shape[::-1], []).append((info["bits"], [1 - k for k in keep][::-1]))
    model = onnx.load(str(path))
    graph = model.graph
    new_nodes, done = [], []
    states = states or {}
    matmul_inputs = {i for node in graph.node if node.op_type == "MatMul" for i in node.input}

    def dequantize(q, scale, axis, out, prefix):
        """Nodes computing float ``out`` from int8 ``q`` times per-``axis`` ``scale``."""
        graph.initializer.append(numpy_helper.from_array(q, f"{prefix}__int8"))
        if opset >= 13:
            graph.initializer.append(numpy_helper.from_array(scale.reshape(-1), f"{prefix}__scale"))
            return [helper.make_node("DequantizeLinear", [f"{prefix}__int8", f"{prefix}__scale"], [out],
                                     name=f"{prefix}__dequantize", axis=axis)]
        graph.initializer.append(numpy_helper.from_array(scale, f"{prefix}__scale"))
        return [helper.make_node("Cast", [f"{prefix}__int8"], [f"{prefix}__float"], name=f"{prefix}__cast", to=TensorProto.FLOAT),
                helper.make_node("Mul", [f"{prefix}__float", f"{prefix}__scale"], [out], name=f"{prefix}__dequantize")]

    for init in list(graph.initializer):
        if init.data_type == TensorProto.FLOAT and init.name in states:
            ints, axis, c = states[init.name]
            a = numpy_helper.to_array(init)
            block = np.take(a, range(c), axis=axis) if a.ndim == 2 and a.shape[axis] >= c else None
            found = _affine_grid(block, ints, axis) if block is not None and block.shape == ints.shape else None
            if found is None:
                continue
            q, scale, shift = found
            name = init.name
            graph.initializer.remove(init)
            graph.initializer.append(numpy_helper.from_array(shift, f"{name}__shift"))
            target = name if a.shape[axis] == c else f"{name}__states"
            new_nodes += dequantize(q, scale, axis, f"{name}__scaled", name)
            new_nodes.append(helper.make_node("Add", [f"{name}__scaled", f"{name}__shift"], [target], name=f"{name}__shifted"))
            if target != name:  # sql2: the two float columns / rows follow the states
                graph.initializer.append(numpy_helper.from_array(np.take(a, range(c, a.shape[axis]), axis=axis), f"{name}__rest"))
                new_nodes.append(helper.make_node("Concat", [target, f"{name}__rest"], [name], name=f"{name}__concat", axis=axis))
            done.append(name)
            continue
        if init.data_type == TensorProto.FLOAT and tuple(init.dims) in grouped:
            found = _grouped(numpy_helper.to_array(init), *grouped[tuple(init.dims)])
            if found is not None:  # int8 + (m, n // G, 1) scales, reshaped around the Mul
                (q, scale), name, shape = found, init.name, list(init.dims)
                graph.initializer.remove(init)
                graph.initializer.extend([numpy_helper.from_array(q, f"{name}__int8"),
                                          numpy_helper.from_array(scale, f"{name}__scale"),
                                          numpy_helper.from_array(np.array(shape, np.int64), f"{name}__shape")])
                new_nodes += [
                    helper.make_node("Cast", [f"{name}__int8"], [f"{name}__float"], name=f"{name}__cast", to=TensorProto.FLOAT),
                    helper.make_node("Mul", [f"{name}__float", f"{name}__scale"], [f"{name}__scaled"], name=f"{name}__dequantize"),
                    helper.make_node("Reshape", [f"{name}__scaled", f"{name}__shape"], [name], name=f"{name}__reshape"),
                ]
                done.append(name)
                continue
        if init.data_type != TensorProto.FLOAT or tuple(init.dims) not in by_shape:
            continue
        w = numpy_helper.to_array(init)
        if w.size < QUANT_MIN_NUMEL:
            continue
        for bits, keep in by_shape[tuple(init.dims)]:
            found = _grid(w, bits, keep)
            if found is not None:
                break
        else:
            continue
        q, scale = found
        name = init.name
        graph.initializer.remove(init)
        graph.initializer.append(numpy_helper.from_array(q, f"{name}__int8"))
        # ONNX Runtime fuses DequantizeLinear -> MatMul into MatMulNBits, which by default rounds the
        # activations to int8 too (a transformer's Linear layers on 3-D inputs: measured 0.4% of the
        # output scale on a tiny ViT); Cast + Mul computes the same weight and is left alone
        if opset >= 13 and len(keep) <= 1 and name not in matmul_inputs:  # per-axis (or per-tensor) DequantizeLinear
            flat = scale.reshape(-1) if keep else scale.reshape(())
            graph.initializer.append(numpy_helper.from_array(flat, f"{name}__scale"))
            attrs = {"axis": keep[0]} if keep else {}
            new_nodes.append(helper.make_node("DequantizeLinear", [f"{name}__int8", f"{name}__scale"], [name],
                                              name=f"{name}__dequantize", **attrs))
        else:  # several scaled dims: a broadcast scale tensor
            graph.initializer.append(numpy_helper.from_array(scale, f"{name}__scale"))
            new_nodes += [
                helper.make_node("Cast", [f"{name}__int8"], [f"{name}__float"], name=f"{name}__cast", to=TensorProto.FLOAT),
                helper.make_node("Mul", [f"{name}__float", f"{name}__scale"], [name], name=f"{name}__dequantize"),
            ]
        done.append(name)
    if done:
        nodes = list(graph.node)
        del graph.node[:]
        graph.node.extend(new_nodes + nodes)  # the dequantized weights exist before any use
        onnx.save(model, str(path))
    return done


def _grouped(w: np.ndarray, bits: int, group: int):
    """(int8 integers (m, n // G, G), float32 scales (m, n // G, 1)) of a group-wise weight, or None."""
    scales = recover_scales(torch.from_numpy(w.copy()), bits, group)
    if scales is None:
        return None
    m = w.shape[0]
    q = quantize_grouped(torch.from_numpy(w.copy()), bits, scales).reshape(m, -1, group)
    return q.numpy(), scales.reshape(m, -1, 1).numpy()
