"""Exports for deployment: a materialized ONNX graph (verified in ONNX Runtime), a plain ``.pth``
state dict for the original architecture, and a compact ``.dyn`` at another precision.

Every output is written through ``fileio.atomic_path`` (an ONNX graph and its data: ``private_dir``):
a failed check (for example ONNX Runtime disagreeing with PyTorch) leaves no file behind.
"""

from __future__ import annotations

import contextlib
import fnmatch
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ..budget.quant import GROUP_BITS
from ..dynamics.modules import DynamicsLayer, DynSpec, materialize
from ..dynfile.format import STATE_SUFFIXES, promised_bytes, write_dyn
from ..errors import DynError, first_line
from ..io.data import check_input_size, probe_forward
from ..io.allocator import release_freed
from ..io.fileio import atomic_path, check_output_path, move_into_place, private_dir
from . import layout, onnx_files
from .onnx_bytes import budget_check, initializer_bytes, over_budget
from .onnx_quant import quantize_graph, sources_of
from .onnx_states import factor_tables, quantize_factor_tables, quantize_state_tables, weight_free_state_ints
from ..dynfile.rebuild import materialized, open_converted, open_dyn
from ..io.safetensors_io import read_safetensors

DEFAULT_OPSET = 17
DEFAULT_TOLERANCE = 1e-4
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def factorized(model: nn.Module) -> tuple[nn.Module, list[tuple[str, str]]]:
    """A copy of ``model`` with every sql2 layer as two thin layers (``layout.factorized_pair``),
    and ``(name, reason)`` for the converted layers that stay materialized (dense)."""
    names = {n: "factorized" for n, m in model.named_modules() if isinstance(m, DynamicsLayer)}
    net, _, kept = layout.build(model, names)
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
    bytes: int = 0  # bytes on disk: the .onnx file, plus its external data file when there is one
    quantized: list[str] = field(default_factory=list)  # .dyn tensors (and state tables) stored as integers
    layouts: dict[str, str] = field(default_factory=dict)  # converted layer -> the layout it got
    weight_bytes: int = 0  # bytes of all initializers in the graph
    budget_bytes: int | None = None  # the .dyn's byte budget, when it was converted to one
    grew: list[str] = field(default_factory=list)  # tensors with more bytes in the graph than in the .dyn
    activations: str = "float"
    default_session_diff: float | None = None  # --keep-qdq: max abs diff in a default session (int8 activations)
    data_path: Path | None = None  # the weights' file beside ``path`` (external data), or None: all in ``path``


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
    layout_name: str | None = None,
    keep_qdq: bool = False,
    activations: str = "float",
    calib: list[torch.Tensor] | None = None,
    allow_larger: bool = False,
    external_data: bool = False,
) -> OnnxResult:
    """Export a standard ONNX graph, check it with ``onnx.checker`` and compare ONNX Runtime with
    the PyTorch model on random inputs.

    ``layout_name`` (``layout.LAYOUTS``; default ``auto``, or ``weight-free`` / ``factorized`` for
    the two older flags): how each converted layer is laid out; ``auto`` picks per layer by the
    ONNX Runtime cost model of ``layout.predicted_ms``. Layers that cannot take their layout stay
    materialized and are listed in ``kept``.

    ``quantize`` (default: on when the .dyn lists quantized tensors): every tensor the file stores as
    integers goes into the graph as integers + scales, found by value (``onnx_quant``), in nodes
    ONNX Runtime folds at session load; ``keep_qdq``: as ``DequantizeLinear`` instead (for runtimes
    with integer kernels; int4 and group-wise grids then need opset 21), checked with float
    activations and the default session's difference reported (``FLOAT_MATMULNBITS``). The graph's
    bytes on disk (graph and external data together) are held to the file's: a file converted to a byte
    budget is refused (DynError, no file) when the export exceeds it, naming the tensors that grew,
    unless ``allow_larger``; a ``--keep`` file's budget is the search's choice, and is not held.

    ``activations="int8"``: ONNX Runtime's static QDQ quantization (int8 activations and weights),
    calibrated on ``calib``; its outputs are not held to ``rel_tolerance`` (the result reports them).

    Weights over ``onnx_files.EXTERNAL_DATA_ABOVE`` (or any, with ``external_data``) go into one
    file beside the graph, ``<out>.data``, which the graph names by file name alone: ship and move
    the two together. ``OnnxResult.bytes`` counts both.

    Fails (DynError, no file) when max |ort - torch| > ``rel_tolerance`` x max |torch output|.
    """
    import onnx

    if activations not in ("float", "int8"):
        raise DynError(f"unknown activations {activations!r}; choose float or int8")
    if activations == "int8" and not calib:
        raise DynError("int8 activations need calibration images: give --calib (the images the file was converted on)")
    out = check_output_path(out, force)
    data = onnx_files.check_external_data_path(out, force)
    start = time.perf_counter()
    net, meta = open_converted(source, model=model, factory=factory, original=original, trust_pickle=trust_pickle)
    size = check_input_size(tuple(input_size or meta.get("input_size") or (3, 224, 224)))
    probe_forward(net, size)  # one line, not the exporter's traceback
    chosen = layout_name or ("weight-free" if weight_free else "factorized" if factorize else "auto")
    stored = read_safetensors(source)[0] if not isinstance(source, nn.Module) else {}
    budget = (meta.get("budget") or {}).get("target_bytes")
    per_layer = None
    if budget is not None:  # auto keeps each converted layer near its bytes in the file
        per_layer = {name: sum(t.numel() * t.element_size() for k, t in stored.items() if k.startswith(name + "."))
                     for name in meta.get("layers", {})}
    dense, got, kept = layout.build(net, layout.plan(net, size, chosen, per_layer))
    gen = torch.Generator().manual_seed(seed)
    example = torch.randn(1, *size, generator=gen)
    x = torch.randn(check_batch if dynamic_batch else 1, *size, generator=gen)
    with torch.no_grad():
        want = [t.float().numpy() for t in _flat(net(x))]  # the converted model itself, not the copy
    outputs = ["output"] if len(want) == 1 else [f"output{i}" for i in range(len(want))]
    axes = {name: {0: "batch"} for name in ["input", *outputs]} if dynamic_batch else None
    described = {k: v for k, v in (meta.get("quantized") or {}).items() if v.get("bits") in (*GROUP_BITS, 16)}
    # in a private folder beside `out`: a graph over 2 GB gets its tensors beside it, also while checked
    with private_dir(out) as work:
        raw = work / "export" / out.name
        raw.parent.mkdir()
        try:
            with warnings.catch_warnings(), torch.no_grad(), mha_fastpath_off():
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    dense, (example,), str(raw), dynamo=False, opset_version=opset, input_names=["input"],
                    # constant folding would fold a weight-free graph's index arithmetic back into big initializers
                    output_names=outputs, dynamic_axes=axes, do_constant_folding="weight-free" not in got.values(),
                )
        except Exception as e:  # the exporter raises many types for unsupported models/opsets
            raise DynError(f"ONNX export failed at opset {opset} ({first_line(e)})") from None
        graph, done = onnx.load(str(raw)), []  # with any external data: the rewrites below see every tensor
        if activations == "int8":
            static_int8(raw, calib, onnx_files.over_one_file(initializer_bytes(graph)))
            graph = onnx.load(str(raw))
        elif quantize if quantize is not None else bool(described):
            sources = sources_of(net.state_dict(), stored, described)
            if keep_qdq and any(s.bits < 8 or s.group < s.values.shape[1] for s in sources if s.bits != 16):
                try:  # INT4 and blocked DequantizeLinear need opset 21
                    graph = onnx.version_converter.convert_version(graph, max(21, opset))
                except Exception as e:
                    raise DynError(f"--keep-qdq needs opset 21 for int4 or group-wise weights, and this graph does "
                                   f"not convert ({first_line(e)}); export without --keep-qdq") from None
            rewritten = quantize_graph(graph, sources, keep_qdq)
            states = weight_free_state_ints(net, dense, described) if "weight-free" in got.values() else {}
            done = list(rewritten.stored) + quantize_state_tables(graph, states)[0]
            done += quantize_factor_tables(graph, factor_tables(net, got, stored))[0]
        shutil.rmtree(raw.parent)  # the graph is in memory: a large model is not kept on disk twice
        weight_bytes, grew = budget_check(graph, dense, stored, meta)
        tmp = work / out.name  # the final name: the graph names its data file after it
        external = onnx_files.save(graph, tmp, external_data or onnx_files.over_one_file(weight_bytes))
        moves = ([(work / data.name, data)] if external else []) + [(tmp, out)]  # the data first, the graph last
        nbytes = sum(t.stat().st_size for t, _ in moves)  # users ship both files: the budget holds for them
        promised = promised_bytes(meta.get("budget"), meta.get("keep"))
        if promised is not None and nbytes > promised and not allow_larger and activations == "float":
            raise over_budget(nbytes, weight_bytes, promised, grew)
        opset = max((o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")), default=opset)
        graph = dense = net = stored = sources = rewritten = states = None  # the checks read the files
        release_freed()  # ORT's session took 4.6 GB beside those copies (ViT-L/16: 6.5 GB held then)
        try:  # from the path: the checker then reads the external data too
            onnx.checker.check_model(str(tmp), full_check=True)
        except Exception as e:
            raise DynError(f"the exported ONNX graph fails onnx.checker ({first_line(e)})") from None
        # a default session (what users open); a --keep-qdq graph with float activations (see FLOAT_MATMULNBITS)
        diff, scale = _compare(session_outputs(tmp, x.numpy(), [FLOAT_MATMULNBITS] if keep_qdq else []), want)
        tol = rel_tolerance * scale
        if not diff <= tol and activations == "float":  # also catches NaN
            raise DynError(f"ONNX Runtime disagrees with PyTorch: max abs diff {diff:.3g} > {rel_tolerance:g} x max "
                           f"|output| {scale:.3g} = {tol:.3g}; no file written")
        default_diff = _compare(session_outputs(tmp, x.numpy()), want)[0] if keep_qdq else None
        move_into_place(moves)
    if not external and data.is_file():
        data.unlink()  # an earlier export's weights: no graph points to them now
    return OnnxResult(out, diff, scale, tol, time.perf_counter() - start, opset, kept, nbytes, done, got,
                      weight_bytes, budget, grew, activations, default_diff, data if external else None)


FLOAT_MATMULNBITS = ("session.qdq_matmulnbits_accuracy_level", "0")
"""ONNX Runtime (opset 21 graphs) fuses DequantizeLinear + MatMul into MatMulNBits and, at its
default accuracy level 4, computes it with int8 activations: an integer kernel, which --keep-qdq is
for, not an export error. Such a graph is checked with float activations (level 0), and the
default session's difference is reported beside it (ViT-B/16 --size 1/4: 0.03 of 1.84 at level 4,
2.7e-06 at level 0)."""


def session_outputs(path: Path, x: np.ndarray, config=()) -> list[np.ndarray]:
    """Outputs of an ONNX Runtime CPU session on ``x``, with ``config`` session entries set."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    for key, value in config:
        opts.add_session_config_entry(key, value)
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"]).run(None, {"input": x})


def static_int8(path: Path, calib: list[torch.Tensor], external: bool = False) -> None:
    """Rewrite the float graph at ``path`` with ONNX Runtime's static QDQ quantization: int8
    activations (MinMax ranges over ``calib``) and per-channel int8 weights. ``external``: the
    float graph passes protobuf's 2 GiB, so the quantizer's graphs keep their weights in files too."""
    import logging
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"input": b.float().numpy()} for b in calib])

        def get_next(self):
            return next(self.batches, None)

    root, level = logging.getLogger(), logging.getLogger().level
    root.setLevel(logging.ERROR)  # the quantizer logs a line per tensor it leaves alone
    try:
        src = path.with_name(path.name + ".float.onnx")
        path.replace(src)
        try:
            quantize_static(str(src), str(path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                            use_external_data_format=external)
        except Exception as e:
            raise DynError(f"ONNX Runtime's static int8 quantization failed ({first_line(e)})") from None
        finally:
            src.unlink(missing_ok=True)
    finally:
        root.setLevel(level)


def _compare(got: list[np.ndarray], want: list[np.ndarray]) -> tuple[float, float]:
    """(max abs difference, max |reference|) over all outputs."""
    if len(got) != len(want) or any(g.shape != w.shape for g, w in zip(got, want)):
        raise DynError(f"ONNX Runtime returned shapes {[g.shape for g in got]} but PyTorch "
                       f"{[w.shape for w in want]}; no file written")
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
