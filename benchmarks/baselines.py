"""Compression baselines for benchmarks/real_model.py: int8 weights, truncated SVD, ONNX Runtime quantization.

Everything here writes a real file and reads the model back from it, so measured bytes are bytes
on disk and measured agreement is the agreement of what the file holds.

- int8 per-channel round-to-nearest: symmetric, one fp32 scale per output channel (per row of
  the weight matrix); stored in safetensors as ``name`` (int8) + ``name.__scale`` (fp32); every
  other tensor as it is (fp32).
- Truncated SVD: every non-depthwise Conv2d / Linear W (m x n, n = in*kh*kw) becomes two layers
  (an nn.MultiheadAttention's q, k, v and out_proj matrices: two factors multiplied back on reading),
  ``a`` (a k x k conv / linear to rank r, holding sqrt(S) Vh) and ``b`` (a 1x1 conv / linear back
  to m, holding U sqrt(S), plus the bias). One rank ratio rho for all layers,
  r = max(1, floor(rho * min(m, n))), the largest rho whose file fits the byte budget. The factors
  are stored fp32, or int8 per row (the same int8 format as above).
- ONNX Runtime: the fp32 export (legacy exporter), ``quantize_dynamic`` and ``quantize_static``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import warnings
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

SCALE_SUFFIX = ".__scale"


# ---------------------------------------------------------------------------- int8 storage

def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output channel (dim 0): (q int8 same shape, scale fp32 of shape [rows])."""
    flat = w.detach().float().reshape(w.shape[0], -1)
    scale = flat.abs().amax(1).clamp_min(1e-12) / 127.0
    q = torch.round(flat / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q.reshape(w.shape), scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (q.float().reshape(q.shape[0], -1) * scale[:, None]).reshape(q.shape)


def save_tensors(path: Path, state: dict[str, torch.Tensor], int8_keys=(), metadata: dict | None = None) -> None:
    """Safetensors file: the keys in ``int8_keys`` as int8 + per-row fp32 scales, the rest unchanged."""
    from safetensors.torch import save_file

    out = {}
    for key, value in state.items():
        if key in int8_keys:
            out[key], out[key + SCALE_SUFFIX] = quantize_rows(value)
        else:
            out[key] = value.detach()
    save_file({k: v.contiguous().clone() for k, v in out.items()}, str(path),
              metadata={k: str(v) for k, v in (metadata or {}).items()})


def load_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state dict with int8 tensors dequantized to fp32, the file's metadata)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        raw = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata() or {}
    state = {}
    for key, value in raw.items():
        if key.endswith(SCALE_SUFFIX):
            continue
        scale = raw.get(key + SCALE_SUFFIX)
        state[key] = dequantize_rows(value, scale) if scale is not None else value
    return state, meta


def weight_keys(model: nn.Module, layers: Callable[[nn.Module], bool]) -> list[str]:
    return [f"{name}.weight" for name, m in model.named_modules() if layers(m)]


def matrix_keys(model: nn.Module) -> list[str]:
    """Every Conv2d/Linear weight and every nn.MultiheadAttention input-projection weight: what
    int8/int4 rows quantize (one scale per row, so a packed q/k/v tensor is fine)."""
    keys = weight_keys(model, is_conv_or_linear)
    return keys + sorted({key for key, _, _ in attention_matrices(model).values() if key not in keys})


def is_conv_or_linear(m: nn.Module) -> bool:
    return isinstance(m, (nn.Conv2d, nn.Linear))


def is_factorizable(m: nn.Module) -> bool:
    """Conv2d with groups == 1, or Linear (depthwise / grouped convs are left alone)."""
    return isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1)


# ---------------------------------------------------------------------------- truncated SVD

class LowRank(nn.Module):
    """W ~= B A as two layers: ``a`` (the original's kernel/stride/padding, rank r outputs), ``b`` (1x1 / linear, + bias).

    A padding module the original runs before its conv (EfficientNet's ``static_padding``) is kept.
    """

    def __init__(self, layer: nn.Module, rank: int):
        super().__init__()
        bias = layer.bias is not None
        if isinstance(layer, nn.Linear):
            self.pad = nn.Identity()
            self.a = nn.Linear(layer.in_features, rank, bias=False)
            self.b = nn.Linear(rank, layer.out_features, bias=bias)
        else:
            pad = getattr(layer, "static_padding", None)
            self.pad = pad if isinstance(pad, nn.Module) else nn.Identity()
            self.a = nn.Conv2d(layer.in_channels, rank, layer.kernel_size, layer.stride, layer.padding,
                               layer.dilation, bias=False, padding_mode=layer.padding_mode)
            self.b = nn.Conv2d(rank, layer.out_channels, 1, bias=bias)

    def forward(self, x):
        return self.b(self.a(self.pad(x)))

    @torch.no_grad()
    def init_from(self, layer: nn.Module) -> "LowRank":
        w = layer.weight.detach().float()
        u, s, vh = torch.linalg.svd(w.reshape(w.shape[0], -1), full_matrices=False)
        r = self.a.weight.shape[0]
        root = s[:r].sqrt()
        self.a.weight.copy_((root[:, None] * vh[:r]).reshape(self.a.weight.shape))
        self.b.weight.copy_((u[:, :r] * root).reshape(self.b.weight.shape))
        if layer.bias is not None:
            self.b.bias.copy_(layer.bias)
        return self


def layer_dims(layer: nn.Module) -> tuple[int, int]:
    """(m, n) of the weight matrix: outputs x (inputs * kernel area)."""
    return layer.weight.shape[0], layer.weight[0].numel()


def attention_matrices(model: nn.Module) -> dict[str, tuple[str, int, int]]:
    """The weights of each nn.MultiheadAttention, which torch's forward reads as tensors (it calls
    neither out_proj nor any q/k/v module), so they cannot become two layers: name ("<mha>.q_proj",
    ..., "<mha>.out_proj") -> (state-dict key, first row, rows). SVD stores their factors and the
    model multiplies them back when the file is read."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.MultiheadAttention):
            e, packed = m.embed_dim, m._qkv_same_embed_dim
            for i, c in enumerate(("q_proj", "k_proj", "v_proj")):
                out[f"{name}.{c}"] = (f"{name}.in_proj_weight", i * e, e) if packed else (f"{name}.{c}_weight", 0, e)
            out[f"{name}.out_proj"] = (f"{name}.out_proj.weight", 0, e)
    return out


def matrix_dims(model: nn.Module) -> dict[str, tuple[int, int]]:
    """(m, n) of everything truncated SVD factorizes: Conv2d (groups 1) / Linear layers and attention matrices."""
    attn = attention_matrices(model)
    dims = {name: layer_dims(m) for name, m in model.named_modules() if is_factorizable(m) and name not in attn}
    state = model.state_dict()
    return dims | {name: (rows, state[key].shape[1]) for name, (key, _, rows) in attn.items()}


def factorize(model: nn.Module, ranks: dict[str, int], *, init: bool) -> nn.Module:
    """Replace each named layer by a LowRank of its rank, in place (``init``: from the layer's SVD);
    an attention matrix stays a tensor, replaced (``init``) by its rank-r truncation."""
    attn = attention_matrices(model)
    for name, rank in ranks.items():
        if name in attn:
            if init:
                key, r0, rows = attn[name]
                with torch.no_grad():
                    w = model.get_parameter(key)[r0:r0 + rows]
                    a, b = svd_factors(w, rank)
                    w.copy_(b @ a)
            continue
        layer = model.get_submodule(name)
        low = LowRank(layer, rank)
        if init:
            low.init_from(layer)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, low)
    return model


def svd_factors(w: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b) with b @ a the rank-``rank`` truncated SVD of the matrix ``w``: a = sqrt(S) Vh, b = U sqrt(S)."""
    u, s, vh = torch.linalg.svd(w.detach().float(), full_matrices=False)
    root = s[:rank].sqrt()
    return root[:, None] * vh[:rank], u[:, :rank] * root


def ranks_at(dims: dict[str, tuple[int, int]], rho: float) -> dict[str, int]:
    return {name: max(1, math.floor(rho * min(m, n))) for name, (m, n) in dims.items()}


def svd_payload(model: nn.Module, dims: dict[str, tuple[int, int]], ranks: dict[str, int], int8: bool) -> int:
    """Tensor bytes of the factorized model's file (no header)."""
    attn = attention_matrices(model)
    factored = {attn[name][0] if name in attn else f"{name}.weight" for name in dims}
    fixed = sum(v.numel() * v.element_size() for k, v in model.state_dict().items() if k not in factored)
    value_bytes = 1 if int8 else 4
    for name, (m, n) in dims.items():
        r = ranks[name]
        fixed += r * (m + n) * value_bytes + ((r + m) * 4 if int8 else 0)   # factors (+ per-row scales)
    return fixed


def svd_ranks_for_budget(model: nn.Module, budget: int, int8: bool) -> dict[str, int]:
    """Ranks at the largest uniform rank ratio whose tensor bytes fit ``budget``."""
    dims = matrix_dims(model)
    smallest = svd_payload(model, dims, ranks_at(dims, 0.0), int8)
    if smallest > budget:
        raise ValueError(f"budget {budget:,} B is below the smallest SVD file (rank 1 in every layer): {smallest:,} B")
    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        if svd_payload(model, dims, ranks_at(dims, mid), int8) <= budget:
            lo = mid
        else:
            hi = mid
    return ranks_at(dims, lo)


def lowrank_ranks(model: nn.Module) -> dict[str, int]:
    return {name: m.a.weight.shape[0] for name, m in model.named_modules() if isinstance(m, LowRank)}


def save_svd(path: Path, model: nn.Module, ranks: dict[str, int], int8: bool) -> None:
    """The factorized model's tensors; an attention matrix (at its rank already) as its two factors."""
    keys = {f"{name}.{part}.weight" for name in ranks for part in ("a", "b")} if int8 else ()
    state = dict(model.state_dict())
    for name, (key, r0, rows) in attention_matrices(model).items():
        if name in ranks:
            state[f"{name}.a.weight"], state[f"{name}.b.weight"] = svd_factors(state[key][r0:r0 + rows], ranks[name])
    for key in {key for name, (key, _, _) in attention_matrices(model).items() if name in ranks}:
        del state[key]
    save_tensors(path, state, keys, {"kind": "svd", "int8": int8, "ranks": json.dumps(ranks)})


def build_svd_file(original: nn.Module, path: Path, budget: int, int8: bool) -> dict[str, int]:
    """Factorize a copy of ``original`` so that the file at ``path`` is at most ``budget`` bytes; returns the ranks."""
    import copy

    dims = matrix_dims(original)
    header = 0
    for _ in range(5):   # the payload model leaves out the file's header: take it off the target and refit
        ranks = svd_ranks_for_budget(original, budget - header, int8)
        save_svd(path, factorize(copy.deepcopy(original), ranks, init=True), ranks, int8)
        size = path.stat().st_size
        if size <= budget:
            return ranks
        header = size - svd_payload(original, dims, ranks, int8)
    raise RuntimeError(f"could not fit the SVD file into {budget:,} B (last try {size:,} B)")


def load_svd(path: Path, fresh: nn.Module) -> nn.Module:
    state, meta = load_tensors(path)
    ranks = json.loads(meta["ranks"])
    model = factorize(fresh, ranks, init=False)
    for name, (key, r0, rows) in attention_matrices(model).items():  # multiplied back into their tensors
        if name in ranks:
            dense = state.setdefault(key, torch.zeros_like(model.get_parameter(key)))
            dense[r0:r0 + rows] = state.pop(f"{name}.b.weight") @ state.pop(f"{name}.a.weight")
    model.load_state_dict(state)
    return model.eval()


# ---------------------------------------------------------------------------- ONNX Runtime

def export_onnx(model: nn.Module, path: Path, input_size: tuple[int, ...]) -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Constant folding")   # EfficientNet's static padding slices
        torch.onnx.export(model, torch.zeros(1, *input_size), str(path), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})


def ort_predictor(path: Path, threads: int) -> Callable[[torch.Tensor], torch.Tensor]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return lambda x: torch.from_numpy(sess.run(None, {name: x.numpy()})[0])


@contextlib.contextmanager
def quiet_ort():
    """ONNX Runtime's quantizers log a warning per tensor they leave alone and per unused initializer."""
    import onnxruntime as ort

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    ort.set_default_logger_severity(3)
    try:
        yield
    finally:
        root.setLevel(level)
        ort.set_default_logger_severity(2)


def ort_preprocess(src: Path, dst: Path) -> Path:
    """ORT's recommended pre-quantization step (shape inference + graph optimization); ``src`` if it fails."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        with quiet_ort():
            quant_pre_process(str(src), str(dst))
        return dst
    except Exception:  # the quantizers also run on the plain export
        return src


def ort_quantize_dynamic(src: Path, dst: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with quiet_ort():
        quantize_dynamic(str(src), str(dst), per_channel=True, weight_type=QuantType.QInt8)


def ort_quantize_static(src: Path, dst: Path, calib: torch.Tensor, batch: int = 8) -> None:
    """QDQ format, per-channel int8 weights, int8 activations, MinMax ranges over ``calib``."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"input": calib[i : i + batch].numpy()} for i in range(0, len(calib), batch)])

        def get_next(self):
            return next(self.batches, None)

    with quiet_ort():
        quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
