"""Quantized states in a weight-free ONNX graph: the state tables of converted layers whose states
the .dyn stores as integers go into the graph as int8 + per-channel scale and shift, turned into
float by ``Cast``/``Mul``/``Add`` that ONNX Runtime constant-folds at session load (see
onnx_quant). Used by export.export_onnx for the weight-free layout.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from ..budget.quant import quantize
from ..dynamics.modules import DynamicsLayer
from ..dynamics.weightfree import WeightFreeCore
from .layout import factorized_pair
from .onnx_quant import _row_factors


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


def quantize_state_tables(model, states: dict) -> tuple[list[str], int]:
    """Rewrite ``model`` (onnx.ModelProto) in place: each float state table named in ``states``
    (``weight_free_state_ints``) that is ``scale * integers + shift`` per channel becomes int8 +
    scale + shift. Returns (the rewritten names, their bytes in the graph)."""
    from onnx import TensorProto, helper, numpy_helper

    graph, nodes, done, nbytes = model.graph, [], [], 0

    def add(array, name):
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return array.nbytes

    for init in list(graph.initializer):
        if init.data_type != TensorProto.FLOAT or init.name not in states:
            continue
        ints, axis, c = states[init.name]
        a = numpy_helper.to_array(init)
        block = np.take(a, range(c), axis=axis) if a.ndim == 2 and a.shape[axis] >= c else None
        found = _affine_grid(block, ints, axis) if block is not None and block.shape == ints.shape else None
        if found is None:
            continue
        q, scale, shift = found
        name = init.name
        graph.initializer.remove(init)
        target = name if a.shape[axis] == c else f"{name}__states"
        nbytes += add(q, f"{name}__int8") + add(scale, f"{name}__scale") + add(shift, f"{name}__shift")
        nodes += [helper.make_node("Cast", [f"{name}__int8"], [f"{name}__float"], name=f"{name}__cast", to=TensorProto.FLOAT),
                  helper.make_node("Mul", [f"{name}__float", f"{name}__scale"], [f"{name}__scaled"], name=f"{name}__mul"),
                  helper.make_node("Add", [f"{name}__scaled", f"{name}__shift"], [target], name=f"{name}__shifted")]
        if target != name:  # sql2: the two float columns / rows follow the states
            nbytes += add(np.take(a, range(c, a.shape[axis]), axis=axis), f"{name}__rest")
            nodes.append(helper.make_node("Concat", [target, f"{name}__rest"], [name], name=f"{name}__concat", axis=axis))
        done.append(name)
    _prepend(graph, nodes)
    return done, nbytes



def factor_tables(net: nn.Module, got: dict[str, str], stored: dict) -> list[tuple]:
    """For the factorized layout (``layout.factorized_pair``): the thin layers' weights of sql2
    layers whose states the .dyn stores as integers with a scale per state vector (keep (0, 1)), as
    ``(float (rows, cols) weight, integers, scales, shifts, float rows/cols that follow, axis)``.

    With centred states, the outer weight's first H*d columns are L[i, (k, t)] =
    q_out[k, i, t] s_out[k, i] (-2 c_k) + centre[k, t] 2 c_k: integers times a scale per (row,
    group) plus a shift per column; the inner weight's first H*d rows are R'[(k, t), j] =
    q_in[k, j, t] s_in[k, j] - centre[k, t]. The two extra columns / rows (a + offset, 1; 1, b)
    stay float."""
    out = []
    for name, choice in got.items():
        layer = net.get_submodule(name)
        sx, sy = stored.get(f"{name}.states_out:scale"), stored.get(f"{name}.states_in:scale")
        if choice != "factorized" or sx is None or sy is None or getattr(layer, "conv_groups", 1) != 1:
            continue
        if tuple(sx.shape) != (*layer.states_out.shape[:2], 1) or tuple(sy.shape) != (*layer.states_in.shape[:2], 1):
            continue  # not one scale per state vector
        first, second = factorized_pair(layer)
        x, y, c = (t.detach().float() for t in (layer.states_out, layer.states_in, layer.coupling))
        h, m, d = x.shape
        qx, qy = torch.round(x / sx.float()).to(torch.int8), torch.round(y / sy.float()).to(torch.int8)
        centre = torch.cat([x, y], 1).mean(1, keepdim=True)  # (H, 1, d), as sql2_factors
        outer = second.weight.detach().reshape(m, -1)  # (m, rank)
        inner = first.weight.detach().reshape(h * d + 2, -1)  # (rank, n)
        out.append((outer.numpy(), qx.permute(1, 0, 2).numpy(), (sx[:, :, 0].float() * (-2 * c)[:, None]).T[:, :, None].numpy(),
                    (centre * (2 * c)[:, None, None]).permute(1, 0, 2).numpy(), 1))
        out.append((inner.numpy(), qy.permute(0, 2, 1).numpy(), sy[:, :, 0].float()[:, None, :].numpy(),
                    (-centre).permute(0, 2, 1).numpy(), 0))
    return out


def quantize_factor_tables(model, tables: list[tuple]) -> tuple[list[str], int]:
    """Rewrite ``model`` (onnx.ModelProto) in place: each initializer holding a ``factor_tables``
    weight (as is, transposed, or with a BatchNorm folded into its rows) gets its H*d state
    columns / rows as int8 + scales + shifts (``Cast``/``Mul``/``Add``, folded at load); the two
    float ones are concatenated back. Returns (the rewritten names, their bytes in the graph)."""
    from onnx import TensorProto, helper, numpy_helper

    graph, nodes, done, nbytes = model.graph, [], [], 0
    for init in list(graph.initializer):
        if init.data_type != TensorProto.FLOAT or not tables:
            continue
        a = numpy_helper.to_array(init)
        views = [(a.reshape(a.shape[0], -1), False)] + ([(a.T, True)] if a.ndim == 2 else [])
        for view, transposed in views:
            found = next(((t, f) for t in tables if t[0].shape == view.shape
                          for f in [_row_factors(view, t[0])] if f is not None), None)
            if found is not None:
                break
        else:
            continue
        (want, q, scale, shift, axis), factors = found
        hd = q.shape[1] * q.shape[2] if axis == 1 else q.shape[0] * q.shape[1]
        main = (want.shape[0], hd) if axis == 1 else (hd, want.shape[1])
        recon = (q.astype(np.float32) * scale + shift).reshape(main) * (factors[:, None] if axis == 1 else 1)
        body = view[:, :hd] if axis == 1 else view[:hd]
        if not np.all(np.abs(recon - body) <= 1e-5 * max(float(np.abs(body).max()), 1e-30)):
            continue
        name, p = init.name, f"{init.name}__states"
        rest = view[:, hd:] if axis == 1 else view[hd:]
        consts = {"int8": q, "scale": scale.astype(np.float32), "shift": shift.astype(np.float32),
                  "rest": np.ascontiguousarray(rest), "shape": np.array(main, np.int64),
                  "out_shape": np.array(a.shape if not transposed else view.shape, np.int64)}
        if axis == 1 and not np.all(factors == 1):
            consts["rows"] = factors[:, None].astype(np.float32)
        for k, v in consts.items():
            graph.initializer.append(numpy_helper.from_array(v, f"{p}_{k}"))
            nbytes += v.nbytes if k not in ("shape", "out_shape") else 0
        graph.initializer.remove(init)
        steps = [("Cast", [f"{p}_int8"], {"to": TensorProto.FLOAT}), ("Mul", ["@", f"{p}_scale"], {}),
                 ("Add", ["@", f"{p}_shift"], {}), ("Reshape", ["@", f"{p}_shape"], {})]
        steps += [("Mul", ["@", f"{p}_rows"], {})] if "rows" in consts else []
        steps += [("Concat", ["@", f"{p}_rest"], {"axis": axis}), ("Reshape", ["@", f"{p}_out_shape"], {})]
        steps += [("Transpose", ["@"], {"perm": [1, 0]})] if transposed else []
        prev = None
        for i, (op, inputs, attrs) in enumerate(steps):
            outp = name if i == len(steps) - 1 else f"{p}_{i}"
            nodes.append(helper.make_node(op, [prev if v == "@" else v for v in inputs], [outp], name=f"{p}_{op}{i}", **attrs))
            prev = outp
        done.append(name)
    _prepend(graph, nodes)
    return done, nbytes


def _prepend(graph, nodes: list) -> None:
    """Put ``nodes`` (which compute initializers from integers) before every node that uses them."""
    if nodes:
        old = list(graph.node)
        del graph.node[:]
        graph.node.extend(nodes + old)
