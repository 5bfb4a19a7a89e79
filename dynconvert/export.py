"""Exports for deployment: a materialized ONNX graph (verified in ONNX Runtime), a plain ``.pth``
state dict for the original architecture, and a compact ``.dyn`` at another precision.

Every output is written through ``fileio.atomic_path``: a failed check (for example ONNX Runtime
disagreeing with PyTorch) leaves no file behind.
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import time
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from .api import build_from
from .dynamics import DynamicsLayer, DynSpec, materialize
from .dynfile import STATE_SUFFIXES, read_dyn, write_dyn
from .errors import DynError, first_line
from .fileio import atomic_path, check_output_path

DEFAULT_OPSET = 17
DEFAULT_TOLERANCE = 1e-4
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def materialized(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every converted layer replaced by its dense twin: the original architecture."""
    from .convert import set_submodule

    dense = copy.deepcopy(model)
    for name in [n for n, m in dense.named_modules() if isinstance(m, DynamicsLayer)]:
        set_submodule(dense, name, dense.get_submodule(name).to_dense())
    return dense.eval()


@contextlib.contextmanager
def mha_fastpath_off():
    """nn.MultiheadAttention's eval-mode fast path (``aten::_native_multi_head_attention``) has no
    ONNX export; with it off, the exporter traces the same attention as plain ops."""
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(before)


def open_dyn(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """read_dyn, with a pointed message for the common mistake of passing the original checkpoint."""
    path = Path(path)
    if path.is_file() and zipfile.is_zipfile(path):
        raise DynError(f"{path} is a PyTorch checkpoint, not a .dyn; convert it first (dynconvert convert {path} --out model.dyn)")
    return read_dyn(path)


def _open(source, model, factory) -> tuple[nn.Module, dict]:
    """(converted module, metadata) from a .dyn path or an already converted module."""
    if isinstance(source, nn.Module):
        return source.eval(), {}
    tensors, meta = open_dyn(source)
    return build_from(tensors, meta, model=model, factory=factory, path=source), meta


@dataclass
class OnnxResult:
    path: Path
    max_abs_diff: float
    output_scale: float  # max |output| of the PyTorch model on the check inputs
    tolerance: float  # the allowed max abs diff: rel_tolerance x output_scale
    seconds: float
    opset: int
    kept: list[tuple[str, str]] = field(default_factory=list)  # weight-free export: layers left materialized
    bytes: int = 0  # size of the written .onnx file
    quantized: list[str] = field(default_factory=list)  # initializers stored as int8 (+ scale, DequantizeLinear)


def _flat(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flat(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _flat(o)]
    raise DynError(f"the model returns {type(out).__name__}; ONNX export needs tensors")


def export_onnx(
    source: str | Path | nn.Module,
    out: str | Path,
    *,
    model: nn.Module | None = None,
    factory: str | None = None,
    input_size: tuple[int, int, int] | None = None,
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = True,
    rel_tolerance: float = DEFAULT_TOLERANCE,
    check_batch: int = 2,
    seed: int = 0,
    force: bool = False,
    weight_free: bool = False,
    quantize: bool | None = None,
) -> OnnxResult:
    """Materialize the weights into a standard ONNX graph, check it with ``onnx.checker`` and
    compare ONNX Runtime with the PyTorch model on random inputs.

    ``weight_free``: the graph carries the states (and L1 sort orders) instead of weight
    matrices and computes converted layers with Gather, CumSum and MatMul (weightfree.py); layers
    without a weight-free path stay materialized and are listed in ``kept``.

    ``quantize`` (default: on when the .dyn lists quantized tensors): weights that lie on an
    integer grid in the file go into the graph as int8 initializers with float32 scales and a
    ``DequantizeLinear`` (per output channel; ``Cast`` + ``Mul`` below opset 13 or for a grid with
    several scaled dims), so the .onnx file is about a quarter of the fp32 size for them. The grid is
    re-derived from each exported initializer, so a BatchNorm folded into a conv (which scales each
    output channel) keeps it; ``OnnxResult.quantized`` lists what was stored as int8.

    Fails (DynError, no file) when max |ort - torch| > ``rel_tolerance`` x max |torch output|.
    """
    import onnx
    import onnxruntime as ort

    out = check_output_path(out, force)
    start = time.perf_counter()
    net, meta = _open(source, model, factory)
    size = tuple(input_size or meta.get("input_size") or (3, 224, 224))
    kept: list[tuple[str, str]] = []
    if weight_free:
        from .weightfree import to_weight_free

        dense, kept = to_weight_free(copy.deepcopy(net))
    else:
        dense = materialized(net)
    gen = torch.Generator().manual_seed(seed)
    example = torch.randn(1, *size, generator=gen)
    batch = check_batch if dynamic_batch else 1
    x = torch.randn(batch, *size, generator=gen)
    with torch.no_grad():
        want = [t.float().numpy() for t in _flat(net(x))]  # the converted model itself, not the copy
    n_out = len(want)
    outputs = ["output"] if n_out == 1 else [f"output{i}" for i in range(n_out)]
    axes = {name: {0: "batch"} for name in ["input", *outputs]} if dynamic_batch else None
    with atomic_path(out) as tmp:
        try:
            with warnings.catch_warnings(), torch.no_grad(), mha_fastpath_off():
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    dense, (example,), str(tmp), dynamo=False, opset_version=opset, input_names=["input"],
                    # constant folding would fold a weight-free graph's index arithmetic back into big initializers
                    output_names=outputs, dynamic_axes=axes, do_constant_folding=not weight_free,
                )
        except Exception as e:  # the exporter raises many types for unsupported models/opsets
            raise DynError(f"ONNX export failed at opset {opset} ({first_line(e)})") from None
        # fp16-stored tensors (bits 16) stay float in the graph; only integers become DequantizeLinear
        described = {k: v for k, v in (meta.get("quantized") or {}).items() if v.get("bits") in (4, 8)}
        stored_int8 = []
        if quantize if quantize is not None else bool(described):
            states = weight_free_state_ints(net, dense, described) if weight_free else {}
            stored_int8 = quantize_initializers(tmp, described, opset, states)
        try:
            onnx.checker.check_model(str(tmp), full_check=True)
        except Exception as e:
            raise DynError(f"the exported ONNX graph fails onnx.checker ({first_line(e)})") from None
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        session = ort.InferenceSession(str(tmp), opts, providers=["CPUExecutionProvider"])
        got = session.run(None, {"input": x.numpy()})
        diff, scale = _compare(got, want)
        tol = rel_tolerance * scale
        if not diff <= tol:  # also catches NaN
            raise DynError(
                f"ONNX Runtime disagrees with PyTorch: max abs diff {diff:.3g} > {rel_tolerance:g} x max |output| "
                f"{scale:.3g} = {tol:.3g}; no file written"
            )
    return OnnxResult(out, diff, scale, tol, time.perf_counter() - start, opset, kept, out.stat().st_size, stored_int8)


QUANT_MIN_NUMEL = 64
"""Smaller initializers stay float: their scales and the extra node would cost more than they save."""


def _grid(w: np.ndarray, bits: int, keep: list[int]) -> tuple[np.ndarray, np.ndarray] | None:
    """(int8 values, float32 scales shaped to broadcast) when ``w`` lies on a symmetric ``bits``-bit
    grid with one scale per slice along ``keep``, within float rounding; else None."""
    from .quant import qmax

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
    from .quant import quantize
    from .weightfree import WeightFreeCore

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
    for info in described.values():
        shape, keep = tuple(info["shape"]), list(info["keep"])
        by_shape.setdefault(shape, []).append((info["bits"], keep))
        if len(shape) == 2:  # a Linear weight may be exported transposed (MatMul)
            by_shape.setdefault(shape[::-1], []).append((info["bits"], [1 - k for k in keep][::-1]))
    model = onnx.load(str(path))
    graph = model.graph
    new_nodes, done = [], []
    states = states or {}

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
        if opset >= 13 and len(keep) <= 1:  # per-axis (or per-tensor) DequantizeLinear
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


def _compare(got: list[np.ndarray], want: list[np.ndarray]) -> tuple[float, float]:
    """(max abs difference, max |reference|) over all outputs."""
    if len(got) != len(want) or any(g.shape != w.shape for g, w in zip(got, want)):
        raise DynError(
            f"ONNX Runtime returned shapes {[g.shape for g in got]} but PyTorch {[w.shape for w in want]}; no file written"
        )
    diff = max(float(np.max(np.abs(g.astype(np.float64) - w))) if w.size else 0.0 for g, w in zip(got, want))
    scale = max(float(np.max(np.abs(w))) if w.size else 0.0 for w in want)
    return diff, scale


def export_pth(
    source: str | Path | nn.Module,
    out: str | Path,
    *,
    model: nn.Module | None = None,
    factory: str | None = None,
    force: bool = False,
) -> Path:
    """A plain state dict with the weights materialized: ``original_arch.load_state_dict(torch.load(out))`` works."""
    out = check_output_path(out, force)
    net, _ = _open(source, model, factory)
    state = {k: v.detach().cpu().contiguous() for k, v in materialized(net).state_dict().items()}
    with atomic_path(out) as tmp:
        torch.save(state, tmp)
    return out


def export_safetensors(
    source: str | Path,
    out: str | Path,
    *,
    dtype: str = "fp16",
    materialize_layers: list[str] = (),
    force: bool = False,
) -> Path:
    """A compact .dyn (same format and metadata) with the states stored as ``dtype``; quantized
    tensors (format version 2) stay stored as integers.

    ``materialize_layers``: glob patterns of converted layers to store as dense weights instead
    (they leave ``layers`` and join ``skipped``). ``dynconvert.load`` reads the result and casts
    the states back to float32.
    """
    if dtype not in DTYPES:
        raise DynError(f"unknown --dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    out = check_output_path(out, force)
    tensors, meta = open_dyn(source)
    meta = {k: v for k, v in meta.items() if k not in ("format", "format_version", "dynconvert_version", "tensors_sha256")}
    layers, skipped = dict(meta["layers"]), list(meta.get("skipped", []))
    unmatched = [p for p in materialize_layers if not any(fnmatch.fnmatchcase(n, p) for n in layers)]
    if unmatched:
        raise DynError(f"--materialize {unmatched[0]!r} matches no converted layer of {source}")
    for name in [n for n in layers if any(fnmatch.fnmatchcase(n, p) for p in materialize_layers)]:
        info = layers.pop(name)
        spec = DynSpec.from_dict(info["spec"])
        x, y, c, o = (tensors.pop(f"{name}.{s}").float() for s in STATE_SUFFIXES)
        tensors[f"{name}.weight"] = materialize(x, y, c, o, spec.metric, spec.kernel).reshape(info["weight_shape"])
        skipped.append({"name": name, "reason": "materialized at export"})
    # quantized tensors stay integers (their dequantized values are exact); states of layers
    # materialized above are gone, and the dense weight built from them is not on a grid
    quantized = {k: {"bits": v["bits"], "keep": v["keep"]} for k, v in meta.pop("quantized", {}).items() if k in tensors}
    for name in layers:
        for s in STATE_SUFFIXES:
            if f"{name}.{s}" not in quantized:
                tensors[f"{name}.{s}"] = tensors[f"{name}.{s}"].to(DTYPES[dtype])
    meta.update(layers=layers, skipped=skipped, state_dtype=dtype)
    write_dyn(out, tensors, meta, quantized=quantized)
    return out
