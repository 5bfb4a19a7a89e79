"""Weight-free inference: converted layers computed from their states without the m x n matrix.

Two paths, both for the ``linear`` kernel (``W = offset + sum_k lambda_k * dist_k``):

* ``l1`` (design notes, "weight-free inference"). ``|x - y|_1`` is a sum of 1-D distances, so every
  (group k, coordinate t) is one *channel* c of ``G = H*d``. Per channel the input states are
  sorted once (at load); for an input vector ``v`` the prefix sums ``C`` (of ``v``) and ``B`` (of
  ``y*v``) in sorted order give ``sum_j |x_i - y_j| v_j = x_i (2 C(p_i) - C(n)) + B(n) - 2 B(p_i)``
  with ``p_i = #{y_j < x_i}``, also fixed at load. A tie ``y_j == x_i`` contributes 0 on either side.
* ``sql2``. ``W = Xa @ Ya^T`` exactly, with ``Xa = [-2 lambda_k x_k | a | 1]`` (m x (G+2)) and
  ``Ya = [y_k | 1 | b]`` (n x (G+2), stored transposed), ``a_i = offset + sum_k lambda_k |x_ki|^2``,
  ``b_j = sum_k lambda_k |y_kj|^2``: two thin matrix products.

Both are exact up to float rounding (tests compare them with the materialized layer). They are
for inference: sort orders and positions are fixed when the module is built.

Other metrics and kernels keep the materialized weight. The FLOP counts here (``l1_flops``,
``sql2_flops``) are the element operations the two path functions execute, one per output
element of each arithmetic op (``tests/test_weightfree.py`` counts them with ``opcount.OpCounter``);
``report`` prints them.

(Over ~350 lines on purpose: the FLOP formulas mirror the kernels line by line and the modules
only wrap them; kept in one file, a change to a kernel shows its formula next to it.)

Longer than 350 lines: one weight-free path per metric/kernel, each with its ONNX-exportable forward.
"""

from __future__ import annotations

import inspect
import threading
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import fused, metrics
from .attention import WeightFreeAttention, weight_free_attention_unsupported
from .modules import DynConv2d, DynLinear, DynamicsLayer, set_submodule, sql2_factors
from .layers import kind_of


def weight_free_path(layer: DynamicsLayer) -> str | None:
    """The weight-free path of a converted layer (a key of ``PATHS``), or None when it must run
    materialized; the metric/kernel registry decides."""
    return metrics.weight_free_path(layer.spec.metric, layer.spec.kernel)


def why_materialized(layer: DynamicsLayer) -> str:
    spec = layer.spec
    return f"metric={spec.metric} kernel={spec.kernel} has no weight-free path (only l1 or sql2 with the linear kernel)"


# ---------------------------------------------------------------- operation counts


def l1_flops(vectors: int, m: int, n: int, channels: int, conv_groups: int = 1) -> int:
    """Element ops of ``l1_matvec`` on ``vectors`` inputs: one per output element of each op.

    Per (vector, conv group): y*v over G(n+1), two cumsums over G(n+1) (n adds each); per vector:
    B'(p) + 2 lambda x C(p) over G x m (addcmul, 2 each), the sum over channels ((G-1) m),
    S*(offset-a), +, +beta (3m), and beta from B'(n) (a dot product of G, per conv group).
    """
    g, c = conv_groups, channels
    per_vector = g * c * (n + 1) + 2 * g * c * n + 2 * c * m + (c - 1) * m + 3 * m + 2 * g * c
    return vectors * per_vector


def sql2_flops(vectors: int, m: int, n: int, channels: int, conv_groups: int = 1) -> int:
    """Multiply-adds (2 FLOPs each) of ``sql2_matvec``'s two thin products of width G+2."""
    r = channels + 2
    return vectors * 2 * r * (conv_groups * n + m)


def weightfree_flops(layer: DynamicsLayer, vectors: int) -> int | None:
    """FLOPs of the weight-free forward of ``layer`` over ``vectors`` input vectors (bias excluded).

    ``vectors`` is batch x output positions (1 per sample for Linear). ``None`` where the layer's
    metric/kernel has no weight-free path (it runs materialized).
    """
    path = weight_free_path(layer)
    if path is None:
        return None
    m, n = layer.matrix_shape
    g = getattr(layer, "conv_groups", 1)
    return PATHS[path].flops(vectors, m, n, layer.spec.groups * layer.spec.dim, g)


# ---------------------------------------------------------------- the two paths


def _l1_tables(x: torch.Tensor, y: torch.Tensor, coupling: torch.Tensor, offset: torch.Tensor) -> dict:
    """Compact load-time tables of the L1 path from states x (H,m,d), y (H,n,d).

    Per channel c = (k, t): the input states sorted (``ys``) and their order, the output states
    (``xs``) and their positions ``pos`` among the sorted inputs. Both are centred on the channel's
    mean input state (distances do not change; prefix sums of y*v lose less to rounding).
    """
    h, m, d = x.shape
    n = y.shape[1]
    xc = x.permute(0, 2, 1).reshape(h * d, m).double()
    yc = y.permute(0, 2, 1).reshape(h * d, n).double()
    centre = yc.mean(1, keepdim=True)
    xc, yc = xc - centre, yc - centre
    ys, order = torch.sort(yc, dim=1, stable=True)
    pos = torch.searchsorted(ys.contiguous(), xc.contiguous())  # #{y_j < x_i}: ties sit right of the prefix
    index = torch.int16 if n + 1 < 2**15 else torch.int32  # halves what an ONNX file carries for them
    return dict(
        order=order.to(index), ys=ys.float(), xs=xc.float(), pos=pos.to(index),
        lam=coupling.detach().repeat_interleave(d).float(), offset=offset.detach().reshape(()).float(),
    )


def _l1_expand(t: dict, m: int, n: int, g: int) -> dict:
    """The forward's index and weight tensors, derived from the compact tables.

    ``order``: gather index into the zero-padded input (slot n holds 0, so prefix 0 is exact).
    ``ysl``: the sorted states times -2 lambda, so the second prefix sum is B' = -2 lambda B.
    ``gidx``: for channel c and output i (conv group gi), where C(p_i) (and B'(p_i), in the other
    half) sits among one vector's (g, G, n+1) prefix sums. ``w`` (1, G*m): 2 lambda x, the weight
    of C(p_i). ``ca``: offset - sum_c lambda_c x_ci, the weight of sum(v).
    """
    order, pos = t["order"].to(torch.int32), t["pos"].to(torch.int32)
    ys, xs, lam = t["ys"], t["xs"], t["lam"]
    c = ys.shape[0]
    first = torch.full((c, 1), n, dtype=order.dtype, device=order.device)
    order_p = torch.cat([first, order], 1).reshape(-1)
    ysl = torch.cat([torch.zeros_like(ys[:, :1]), ys], 1) * (-2 * lam).unsqueeze(1)
    step = torch.full((), n + 1, dtype=torch.int32, device=pos.device)
    chan = torch.arange(c, dtype=torch.int32, device=pos.device).unsqueeze(1) * step
    group = torch.arange(m, dtype=torch.int32, device=pos.device) // (m // g) * c * step
    gidx = (pos + chan + group).reshape(-1)
    w = (2 * lam.unsqueeze(1) * xs).reshape(1, c * m)
    ca = t["offset"] - (lam.unsqueeze(1) * xs).sum(0)
    return dict(order_p=order_p, ysl=ysl, gidx=gidx, w=w, ca=ca, half=torch.full_like(lam, -0.5))


WORKSPACE_MAX_BYTES = 256 << 20
"""Largest scratch buffer the eager L1 path keeps between calls (per thread, device and dtype)."""

_workspace_store = threading.local()


def _workspace(numel: int, like: torch.Tensor) -> torch.Tensor | None:
    """A reused scratch buffer of ``numel`` elements, or None when it would exceed the cap.

    Fresh multi-MB tensors on every call cost page faults that, on a busy CPU, take longer than
    the arithmetic; layers run one after another, so one buffer serves them all.
    """
    if numel * like.element_size() > WORKSPACE_MAX_BYTES:
        return None
    store = _workspace_store.__dict__.setdefault("bufs", {})
    key = (like.device, like.dtype)
    buf = store.get(key)
    if buf is None or buf.numel() < numel:
        buf = store[key] = torch.empty(numel, dtype=like.dtype, device=like.device)
    return buf[:numel]


def clear_workspace() -> None:
    """Free the scratch buffers the eager L1 path keeps (this thread)."""
    _workspace_store.__dict__.pop("bufs", None)


def l1_matvec(v: torch.Tensor, e: dict, lam: torch.Tensor, m: int, n: int, g: int, reuse: bool = False) -> torch.Tensor:
    """``v`` (N, g*n) -> (N, m): every output of the L1 layer from sorted prefix sums, no m x n tensor.

    ``reuse``: compute in place in a kept scratch buffer (eager inference); otherwise out of place
    (ONNX export, autograd). Both run the same arithmetic.
    """
    c = lam.shape[0]
    vp = F.pad(v.reshape(-1, n), (0, 1))  # (N*g, n+1): slot n is the zero prefix
    rows = vp.shape[0]
    width = c * (n + 1)
    size_q, size_p = 2 * rows * width, 2 * (rows // g) * c * m
    buf = _workspace(size_q + size_p, v) if reuse else None
    if buf is None:
        vs = vp.index_select(1, e["order_p"])  # inputs in each channel's sorted order: (N*g, G*(n+1))
        q = torch.stack([vs, vs * e["ysl"].reshape(-1)])  # v and -2 lambda y v: (2, N*g, G*(n+1))
        prefix = q.reshape(2, rows, c, n + 1).cumsum(-1)  # C and B'
        picked = prefix.reshape(2 * rows // g, g * width).index_select(1, e["gidx"]).reshape(2, -1, c * m)
        both = torch.addcmul(picked[1], picked[0], e["w"])
    else:
        q, pk = buf[:size_q].view(2, rows, width), buf[size_q:].view(2, rows // g, c * m)
        torch.index_select(vp, 1, e["order_p"], out=q[0])
        torch.mul(q[0], e["ysl"].reshape(-1), out=q[1])
        prefix = q.view(2, rows, c, n + 1).cumsum_(-1)
        torch.index_select(q.view(2 * rows // g, g * width), 1, e["gidx"], out=pk.view(2 * rows // g, c * m))
        both = pk[1].addcmul_(pk[0], e["w"])
    out = both.reshape(-1, c, m).sum(1)  # sum_c lambda_c (2 x C(p) - 2 B(p))
    total = prefix[0, :, 0, n].reshape(-1, g, 1)  # C(n) = sum(v), per conv group
    beta = torch.matmul(prefix[1, :, :, n], e["half"]).reshape(-1, g, 1)  # sum_c lambda_c B(n) = -sum_c B'(n) / 2
    return (out.reshape(-1, g, m // g) + total * e["ca"].reshape(g, m // g) + beta).reshape(-1, m)


def _sql2_tables(x, y, coupling, offset, g: int) -> dict:
    """Xa (m, G+2) and Ya^T (G+2, n) with W = Xa @ Ya^T, exactly (module docstring).

    Stored like truncated SVD's factors of ``F.linear(F.linear(v, B), A)``, which BLAS runs fastest.
    """
    left, right, a, b = sql2_factors(x.detach().double(), y.detach().double(), coupling.detach().double())
    a = a + offset.detach().double()
    xa = torch.cat([left, a[:, None], torch.ones_like(a)[:, None]], 1)
    ya = torch.cat([right, torch.ones_like(b)[:, None], b[:, None]], 1)
    return dict(xa=xa.float().contiguous(), ya=ya.t().float().contiguous())


def sql2_matvec(v: torch.Tensor, xa: torch.Tensor, ya: torch.Tensor, m: int, n: int, g: int) -> torch.Tensor:
    """``v`` (N, g*n) -> (N, m) through two thin products (per conv group when g > 1)."""
    if g == 1:
        # (Ya^T v^T)^T rather than v Ya: BLAS's kernels for an output G+2 = 18 wide are up to 1.6x
        # slower than for 16 (truncated SVD's width); this orientation costs what the FLOPs say.
        return F.linear(torch.mm(ya, v.t()).t(), xa)
    z = F.linear(v.reshape(-1, g, n).transpose(0, 1), ya)  # (g, N, G+2)
    return torch.matmul(z, xa.reshape(g, m // g, -1).transpose(1, 2)).transpose(0, 1).reshape(-1, m)


# ---------------------------------------------------------------- modules

_eager_only = threading.local()


def _use_fused(v: torch.Tensor) -> bool:
    """The fused L1 kernel serves CPU float32 inference when numba is installed; ``count`` measures
    the eager ops instead (the kernel's work is invisible to torch's dispatcher)."""
    return fused.available() and v.device.type == "cpu" and v.dtype == torch.float32 and not getattr(
        _eager_only, "on", False)



class WeightFreeCore(nn.Module):
    """The matrix-vector product of one converted layer from its states (inference only).

    Buffers in the state dict are the compact tables (states, sort orders, positions); the
    expanded index/weight tensors are derived once here, or inside the graph during ONNX export
    so that the file carries only the compact tables.
    """

    def __init__(self, layer: DynamicsLayer):
        super().__init__()
        self.path = weight_free_path(layer)
        if self.path is None:
            raise ValueError(why_materialized(layer))
        self.m, self.n = layer.matrix_shape
        self.g = getattr(layer, "conv_groups", 1)
        self.channels = layer.spec.groups * layer.spec.dim
        args = (layer.states_out.detach(), layer.states_in.detach(), layer.coupling.detach(), layer.offset.detach())
        impl = PATHS[self.path]
        with torch.no_grad():
            tables = impl.tables(*args, self.g)
            for k, t in tables.items():
                self.register_buffer(k, t)
            if impl.expand is not None:
                for k, t in impl.expand(tables, self.m, self.n, self.g).items():
                    self.register_buffer("_e_" + k, t, persistent=False)

    def _expanded(self) -> dict:
        if torch.onnx.is_in_onnx_export():
            tables = {k: getattr(self, k) for k in ("order", "ys", "xs", "pos", "lam", "offset")}
            return _l1_expand(tables, self.m, self.n, self.g)
        return {k: getattr(self, "_e_" + k) for k in ("order_p", "ysl", "gidx", "w", "ca", "half")}

    def _fused_tables(self) -> tuple:
        """The fused kernel's arrays, built on first use (tables are fixed at inference)."""
        key = (self.order.data_ptr(), self.pos.data_ptr(), self.xs.data_ptr(), self.lam.data_ptr())
        if getattr(self, "_fused", None) is None or self._fused[0] != key:
            self._fused = (key, fused.fused_tables(self.order, self.ys, self.xs, self.pos, self.lam, self.offset))
        return self._fused[1]

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return PATHS[self.path].forward(self, v)

    def flops(self, vectors: int) -> int:
        return PATHS[self.path].flops(vectors, self.m, self.n, self.channels, self.g)

    def extra_repr(self) -> str:
        return f"{self.path}, m={self.m}, n={self.n}, channels={self.channels}, conv_groups={self.g}"


def _l1_forward(core: WeightFreeCore, v: torch.Tensor) -> torch.Tensor:
    reuse = not torch.onnx.is_in_onnx_export() and not (torch.is_grad_enabled() and v.requires_grad)
    if reuse and _use_fused(v):
        return fused.l1_fused(v, core._fused_tables(), core.m, core.n, core.g)
    return l1_matvec(v, core._expanded(), core.lam, core.m, core.n, core.g, reuse)


@dataclass(frozen=True)
class WeightFreePath:
    """One weight-free forward: its load-time tables (persistent buffers), the derived tensors
    (non-persistent, or None), the forward and its FLOP count."""

    tables: Callable[..., dict]
    expand: Callable[..., dict] | None
    forward: Callable[[WeightFreeCore, torch.Tensor], torch.Tensor]
    flops: Callable[..., int]


PATHS: dict[str, WeightFreePath] = {
    "l1": WeightFreePath(lambda x, y, c, o, g: _l1_tables(x, y, c, o), _l1_expand, _l1_forward, l1_flops),
    "sql2": WeightFreePath(_sql2_tables, None, lambda core, v: sql2_matvec(v, core.xa, core.ya, core.m, core.n, core.g),
                           sql2_flops),
}
"""Weight-free paths by name; ``metrics.weight_free_path`` names the one a layer uses."""


class WeightFreeLinear(nn.Module):
    """A converted ``Linear`` computed from its states."""

    def __init__(self, layer: DynLinear):
        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.core = WeightFreeCore(layer)
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.core(x.reshape(-1, self.in_features))
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)


class WeightFreeConv2d(nn.Module):
    """A converted ``Conv2d``: patches by unfold (or strided slicing for an unpadded 1x1), then the core."""

    def __init__(self, layer: DynConv2d):
        super().__init__()
        self.in_channels, self.out_channels = layer.in_channels, layer.out_channels
        self.kernel_size, self.stride, self.dilation = layer.kernel_size, layer.stride, layer.dilation
        self.pad = self._padding(layer.padding, layer.kernel_size, layer.dilation)  # (left, right, top, bottom)
        self.core = WeightFreeCore(layer)
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone(), requires_grad=False)

    @staticmethod
    def _padding(padding, kernel_size, dilation) -> tuple[int, int, int, int]:
        if padding == "valid":
            return (0, 0, 0, 0)
        if padding == "same":  # PyTorch puts the odd pixel on the right/bottom
            (kh, kw), (dh, dw) = kernel_size, dilation
            th, tw = dh * (kh - 1), dw * (kw - 1)
            return (tw // 2, tw - tw // 2, th // 2, th - th // 2)
        ph, pw = (padding, padding) if isinstance(padding, int) else padding
        return (pw, pw, ph, ph)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        if any(self.pad):
            x = F.pad(x, self.pad)
        (kh, kw), (sh, sw), (dh, dw) = self.kernel_size, self.stride, self.dilation
        ho = (x.shape[2] - dh * (kh - 1) - 1) // sh + 1
        wo = (x.shape[3] - dw * (kw - 1) - 1) // sw + 1
        if (kh, kw) == (1, 1):
            v = x[:, :, ::sh, ::sw].permute(0, 2, 3, 1).reshape(-1, self.in_channels)
        else:
            cols = F.unfold(x, self.kernel_size, dilation=self.dilation, stride=self.stride)  # (b, C*kh*kw, L)
            v = cols.transpose(1, 2).reshape(-1, cols.shape[1])
        out = self.core(v)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(b, ho, wo, self.out_channels).permute(0, 3, 1, 2)


def weight_free_module(layer: DynamicsLayer) -> nn.Module:
    """The weight-free module of a converted layer, as its kind (``layers.KINDS``) names it."""
    return globals()[kind_of(layer).weight_free](layer)


def _reads_weight(parent: nn.Module, child: str) -> bool:
    """Whether ``parent``'s forward reads ``child``'s ``.weight`` itself (torchvision's Swin
    attention passes ``self.qkv.weight`` to a function): a weight-free child, which has no weight,
    cannot sit there."""
    try:
        source = inspect.getsource(type(parent).forward)
    except (OSError, TypeError):
        return False
    return f".{child}.weight" in source


def vectors_per_call(model: nn.Module, input_size, batch: int = 1) -> dict[str, int]:
    """Input vectors each converted layer's matrix multiplies in one forward of ``batch`` inputs
    of ``input_size`` (C, H, W): batch x output positions, found by one probe forward. Layers the
    forward does not call as modules (an attention reading their weights) are absent; ``{}`` when
    the model does not run at that size."""
    seen, hooks = {}, []

    def record(name):
        def hook(module, args, out):
            seen[name] = out.shape[0] * out.shape[2] * out.shape[3] if out.dim() == 4 else out.numel() // out.shape[-1]
        return hook

    for name, layer in model.named_modules():
        if isinstance(layer, DynamicsLayer):
            hooks.append(layer.register_forward_hook(record(name)))
    try:
        with torch.no_grad():
            model(torch.zeros(batch, *input_size))
    except (RuntimeError, ValueError, TypeError, IndexError):
        return {}
    finally:
        for h in hooks:
            h.remove()
    return seen


def _slower_weight_free(layer: DynamicsLayer, vectors: int) -> str | None:
    """Why ``layer`` should stay materialized by ``fused.layer_path``'s cost model at ``vectors``
    input vectors per call, or None. The model is the L1 kernel's: the sql2 path (two thin
    products with fewer FLOPs than the dense one at any saving ratio) is always kept."""
    if weight_free_path(layer) != "l1" or fused.layer_path(layer, vectors) == "weightfree":
        return None
    m, n = layer.matrix_shape
    wf, dense = fused.predicted_seconds(m, n, layer.spec.groups * layer.spec.dim, getattr(layer, "conv_groups", 1), vectors)
    return (f"the cost model predicts it slower weight-free: {wf * 1e3:.3g} ms vs {dense * 1e3:.3g} ms dense per call "
            f"of {vectors} input vector{'s' if vectors > 1 else ''}; weight_free='all' forces it")


def to_weight_free(model: nn.Module, vectors: dict[str, int] | int | None = None) -> tuple[nn.Module, list[tuple[str, str]]]:
    """Swap every converted layer that has a weight-free path for its weight-free module, in place.
    An ``nn.MultiheadAttention`` holding converted layers becomes a ``WeightFreeAttention`` (its
    forward reads weights; this one calls modules).

    ``vectors``: None swaps every layer that has a path. Otherwise the input vectors per call of
    each layer (a dict by name, see ``vectors_per_call``; an int for layers it lacks, or for all),
    and an L1 layer that ``fused.layer_path`` predicts slower weight-free stays materialized.

    Returns the model (eval mode) and ``(name, reason)`` for the layers that stay materialized.
    """
    default = vectors if isinstance(vectors, int) else 1
    kept, attention = [], {}
    for name, layer in [(n, m) for n, m in model.named_modules() if isinstance(m, DynamicsLayer)]:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        if weight_free_path(layer) is None:
            kept.append((name, why_materialized(layer)))
            continue
        if getattr(layer, "base", None) is not None:  # corrected.py: already thin beside its quantized weight
            kept.append((name, "a quantized weight with a state correction runs as it is"))
            continue
        if vectors is not None:
            per_call = vectors.get(name, default) if isinstance(vectors, dict) else default
            if why := _slower_weight_free(layer, per_call):
                kept.append((name, why))
                continue
        if isinstance(parent, nn.MultiheadAttention):
            if why := weight_free_attention_unsupported(parent):
                kept.append((name, why))
                continue
            attention[parent_name] = parent
        elif _reads_weight(parent, child):
            kept.append((name, f"{type(parent).__name__}.forward reads {child}.weight itself"))
            continue
        wf = weight_free_module(layer)
        if parent_name in attention:
            parent._modules[child] = wf  # the MHA is replaced below; its forward is not run again
        else:
            set_submodule(model, name, wf)
    for name, mha in attention.items():
        set_submodule(model, name, WeightFreeAttention(mha))
    return model.eval(), kept


__all__ = [
    "WeightFreeConv2d", "WeightFreeCore", "WeightFreeLinear",
    "l1_flops", "l1_matvec", "sql2_flops", "sql2_matvec", "to_weight_free", "vectors_per_call", "weight_free_path",
    "weightfree_flops",
]
