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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ..dynamics.attention import with_module_calls
from ..dynamics.conversion import set_submodule
from ..dynamics.modules import DynamicsLayer, DynLinear, DynSpec, materialize, sql2_factors
from ..dynfile.format import STATE_SUFFIXES, write_dyn
from ..errors import DynError, first_line
from ..io.fileio import atomic_path, check_output_path
from .onnx_quant import quantize_initializers, weight_free_state_ints
from ..dynfile.rebuild import materialized, open_converted, open_dyn
from ..dynamics.weightfree import to_weight_free

DEFAULT_OPSET = 17
DEFAULT_TOLERANCE = 1e-4
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def factorized(model: nn.Module) -> tuple[nn.Module, list[tuple[str, str]]]:
    """A copy of ``model`` with every sql2 layer as two thin layers, and ``(name, reason)`` for
    the converted layers that stay materialized (dense).

    Squared-L2 states are a rank-(H*d + 2) factorization (``sql2_factors``):
    ``W x = L (R' x) + (a + offset) (1' x) + 1 (b' x)``. So a conv becomes a conv with H*d + 2
    output channels (rows R', 1', b'; same kernel, stride and padding) and a 1x1 conv (columns L,
    a + offset, 1), and a Linear two Linears: (H*d + 2)(m + n) multiply-adds per output position
    instead of m n, in the runtime's own fast kernels. l1/l2 relations are full rank.
    """
    # an MHA reads its projections' weights instead of calling them: the module-call form calls
    # each one, so that two thin layers can stand in for it
    net, kept = with_module_calls(copy.deepcopy(model).eval()), []
    for name, layer in [(n, m) for n, m in net.named_modules() if isinstance(m, DynamicsLayer)]:
        spec, (m, n) = layer.spec, layer.matrix_shape
        rank = spec.groups * spec.dim + 2
        parent = net.get_submodule(name.rpartition(".")[0])
        why = ("inside an attention that has no module-call form" if isinstance(parent, nn.MultiheadAttention)
               else f"{spec.metric}/{spec.kernel} relations are not a low-rank product" if (spec.metric, spec.kernel) != ("sql2", "linear")
               else f"rank {rank} costs no less than the dense {m}x{n}" if rank * (m + n) >= m * n else None)
        if why:
            kept.append((name, why))
            set_submodule(net, name, layer.to_dense())
            continue
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
        set_submodule(net, name, nn.Sequential(first, second))
    return net, kept


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
    original: str | Path | None = None,
    trust_pickle: bool = False,
    input_size: tuple[int, int, int] | None = None,
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = True,
    rel_tolerance: float = DEFAULT_TOLERANCE,
    check_batch: int = 2,
    seed: int = 0,
    force: bool = False,
    weight_free: bool = False,
    quantize: bool | None = None,
    factorize: bool = False,
) -> OnnxResult:
    """Materialize the weights into a standard ONNX graph, check it with ``onnx.checker`` and
    compare ONNX Runtime with the PyTorch model on random inputs.

    ``weight_free``: the graph carries the states (and L1 sort orders) instead of weight
    matrices and computes converted layers with Gather, CumSum and MatMul (weightfree.py); layers
    without a weight-free path stay materialized and are listed in ``kept``.

    ``factorize``: sql2 layers as two thin convs / matmuls (``factorized``) instead of one dense
    one; other converted layers stay materialized and are listed in ``kept``.

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
    net, meta = open_converted(source, model=model, factory=factory, original=original, trust_pickle=trust_pickle)
    size = tuple(input_size or meta.get("input_size") or (3, 224, 224))
    kept: list[tuple[str, str]] = []
    if weight_free:
        # Every layer with a path, not fused.layer_path's pick (as dynconvert.load does): the file
        # is asked to carry states, not matrices, and the rule models numba, not ONNX Runtime.
        # (ORT, batch 1, one thread, l1 H*d=2: a conv 16x27 over 16x16 0.006 ms dense vs 0.210 ms
        # weight-free, Linear 1024x4096 0.201 vs 0.095 ms: the rule's picks, but its times are not ORT's.)
        dense, kept = to_weight_free(copy.deepcopy(net))
    elif factorize:
        dense, kept = factorized(net)
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
        described = {k: v for k, v in (meta.get("quantized") or {}).items() if v.get("bits") in (2, 3, 4, 8)}
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
    original: str | Path | None = None,
    trust_pickle: bool = False,
    force: bool = False,
) -> Path:
    """A plain state dict with the weights materialized: ``original_arch.load_state_dict(torch.load(out))`` works."""
    out = check_output_path(out, force)
    net, _ = open_converted(source, model=model, factory=factory, original=original, trust_pickle=trust_pickle)
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
    quantized = {k: {key: v[key] for key in ("bits", "keep", "group") if key in v}
                 for k, v in meta.pop("quantized", {}).items() if k in tensors}
    for name in layers:
        for s in STATE_SUFFIXES:
            if f"{name}.{s}" not in quantized:
                tensors[f"{name}.{s}"] = tensors[f"{name}.{s}"].to(DTYPES[dtype])
    meta.update(layers=layers, skipped=skipped, state_dtype=dtype)
    write_dyn(out, tensors, meta, quantized=quantized)
    return out
