"""Quantized tensors of a .dyn in an exported ONNX graph (the "Quantized tensor in ONNX" interface).

Every tensor the .dyn stores as integers leaves the export as integers plus scales: int8 as an int8
initializer, b <= 4 bits packed two per byte in a uint8 one; ``Cast``/``Mul`` (and ``Mod``/
``BitShift`` for the nibbles) turn them into the float weight. ONNX Runtime constant-folds those
nodes once at session load in a default session (its optimized graph is the fp32 one), whereas it
keeps a ``DequantizeLinear`` and runs it on every call (measured 1.4-2.1x slower on a small CNN and
EfficientNet-Lite2); ``keep_qdq`` writes those for runtimes with integer kernels. fp16-stored tensors
(bits 16) leave as fp16 + ``Cast``.

Initializers are found by value, never by name: the exporter renames weights, folds a BatchNorm
into the conv before it (each output row times a factor), transposes a Linear's weight for MatMul
and slices an attention's packed projection. An initializer matches rows o..o+r of a stored tensor
when, viewed (r, n) (or transposed), each of its rows is that row times one factor.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..budget import quant

QUANT_MIN_NUMEL = 64
"""Smaller initializers stay float: their scales and nodes would cost more than they save."""
SIGN_PREFIX = 32


@dataclass
class Source:
    """One tensor of the .dyn stored below fp32: values viewed (m, n); for integers ``q`` (m, n)
    and scales ``s`` (m, n // group)."""
    name: str
    bits: int
    values: np.ndarray  # (m, n) float32: what the module holds
    q: np.ndarray | None = None
    s: np.ndarray | None = None
    group: int = 0
    dyn_bytes: int = 0


def sources_of(state: dict, stored: dict, described: dict) -> list[Source]:
    """The .dyn's quantized tensors that are weights of the module (rows = dim 0): integer grids with
    one scale per row or per group of a row, and fp16-stored tensors."""
    out = []
    for name, entry in described.items():
        w = state.get(name)
        if w is None or w.ndim == 0 or w.numel() < QUANT_MIN_NUMEL:
            continue
        bits, m = int(entry["bits"]), w.shape[0]
        values = w.detach().float().reshape(m, -1).numpy()
        if bits == 16:
            out.append(Source(name, 16, values, dyn_bytes=2 * w.numel()))
            continue
        scales = stored.get(f"{name}:scale")
        if scales is None:
            continue
        keep = entry.get("keep", [0])
        if entry.get("group") is None and list(keep) not in ([0], []):
            continue  # e.g. states (H, m, d) with a scale per state vector: never a weight in a graph
        scale_exp, _, _ = quant.grid_of(w.detach().float(), entry, scales)
        s_full = scale_exp.expand(w.shape).reshape(m, -1)
        n = s_full.shape[1]
        group = int(entry.get("group") or n)
        q = torch.round(w.detach().float().reshape(m, -1) / s_full).to(torch.int8).numpy()
        s = s_full[:, ::group].contiguous().numpy().astype(np.float32)
        dyn_bytes = (w.numel() * bits + 7) // 8 + scales.numel() * scales.element_size()
        out.append(Source(name, bits, values, q, s, group, dyn_bytes))
    return out


def _sign_key(row: np.ndarray) -> tuple:
    """Signs of the first entries relative to the first non-zero one: a row times any factor keeps it."""
    head = np.sign(row[:SIGN_PREFIX]).astype(np.int8)
    nz = np.flatnonzero(head)
    return (row.size, head.tobytes() if not nz.size else (head * head[nz[0]]).tobytes())


class Index:
    """Row lookup over all sources: sign key -> [(source, row)]."""

    def __init__(self, sources: list[Source]):
        self.sources, self.rows = sources, {}
        # tensors of one number per row (biases, norms) are found by exact value: a row of one
        # number has no sign pattern to key on (each bias was searched among every bias's entries)
        self.vectors = {src.values.tobytes(): si for si, src in enumerate(sources) if src.values.shape[1] == 1}
        for si, src in enumerate(sources):
            v = src.values
            if v.shape[1] == 1:
                continue
            head = np.sign(v[:, :SIGN_PREFIX]).astype(np.int8)
            first = np.where(head.any(1), head[np.arange(len(v)), np.argmax(head != 0, 1)], 1)
            norm = head * first[:, None]
            for i in range(len(v)):
                self.rows.setdefault((v.shape[1], norm[i].tobytes()), []).append((si, i))

    def match(self, x: np.ndarray):
        """(source, first row, transposed, row factors or None) for initializer ``x``, or None."""
        if x.ndim >= 1 and x.size == x.shape[0]:  # one number per row
            si = self.vectors.get(x.astype(np.float32).tobytes())
            return None if si is None else (self.sources[si], 0, False, np.ones(len(x), np.float32))
        views = [(x.reshape(x.shape[0], -1), False)] if x.ndim >= 1 and x.shape[0] else []
        if x.ndim == 2:
            views.append((x.T, True))
        for view, transposed in views:
            r = view.shape[0]
            for si, o in self.rows.get(_sign_key(view[0]), [])[:256]:
                src = self.sources[si]
                if o + r > len(src.values):
                    continue
                a = _row_factors(view, src.values[o:o + r])
                if a is not None:
                    return src, o, transposed, a
        return None


def _row_factors(x: np.ndarray, base: np.ndarray) -> np.ndarray | None:
    """Per-row factors a with x ~= a * base (None where not within float rounding); all ones -> ones."""
    if _factors(x[:1], base[:1]) is None:  # one row first: most candidates fail there
        return None
    return _factors(x, base)


def _factors(x: np.ndarray, base: np.ndarray) -> np.ndarray | None:
    x64, b64 = x.astype(np.float64), base.astype(np.float64)
    bb = (b64 * b64).sum(1)
    a = np.where(bb > 0, (x64 * b64).sum(1) / np.where(bb > 0, bb, 1), 1.0)
    recon = a[:, None] * b64
    tol = 4 * np.finfo(np.float32).eps * np.maximum(np.abs(x64).max(1, keepdims=True), 1e-30)
    if not np.all(np.abs(recon - x64) <= tol):
        return None
    return a.astype(np.float32)


@dataclass
class Rewritten:
    """What ``quantize_graph`` did: per source, the initializers it became and their bytes."""
    stored: dict = field(default_factory=dict)  # source name -> [initializer names]
    onnx_bytes: dict = field(default_factory=dict)  # source name -> bytes of its integers + scales in the graph
    float_left: list = field(default_factory=list)  # (initializer, source) a quantized source left as float


class _Builder:
    """Nodes and initializers of one rewritten tensor, named ``<prefix>_<suffix>``: a short prefix
    per tensor, because the names are bytes of the file the user ships. Small constants that many
    tensors use (moduli, shifts, shapes) are written once per graph (``shared``)."""

    def __init__(self, graph, prefix: str, shared: dict):
        self.graph, self.prefix, self.shared, self.nodes, self.bytes = graph, prefix, shared, [], 0

    def _add(self, name: str, value: np.ndarray) -> str:
        from onnx import numpy_helper

        self.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def const(self, suffix: str, value: np.ndarray) -> str:
        self.bytes += value.nbytes
        return self._add(f"{self.prefix}_{suffix}", value)

    def common(self, value: np.ndarray) -> str:
        """A small constant shared by every tensor that needs the same value."""
        key = (value.dtype.str, value.shape, value.tobytes())
        if key not in self.shared:
            self.shared[key] = self._add(f"dq_c{len(self.shared)}", value)
        return self.shared[key]

    def node(self, op: str, inputs: list[str], suffix: str, out: str | None = None, **attrs) -> str:
        from onnx import helper

        out = out or f"{self.prefix}_{suffix}"
        self.nodes.append(helper.make_node(op, inputs, [out], **attrs))
        return out


def planes(bits: int) -> list[tuple[int, int]]:
    """(slot bits, shift) of the bit planes an integer of ``bits`` travels in: int4 in nibbles, int2
    four per byte, int3 as a 2-bit plane plus a 1-bit plane, int5 and int6 as a nibble plus a 1- or
    2-bit plane (``bits`` bits a value, as in the .dyn)."""
    return {2: [(2, 0)], 3: [(2, 0), (1, 2)], 4: [(4, 0)], 5: [(4, 0), (1, 4)], 6: [(4, 0), (2, 4)]}[bits]


def pack_nibbles(q: np.ndarray, slot: int = 4) -> np.ndarray:
    """Integers in [-2^(slot-1), 2^(slot-1) - 1] -> uint8, 8 // slot per byte: with L = ceil(N / k),
    element j L + i sits in bits [slot j, slot (j + 1)) of byte i (padding: the zero code)."""
    zero = 1 << (slot - 1)
    return pack_unsigned((q.reshape(-1).astype(np.int16) + zero).astype(np.uint8), slot, zero)


def pack_unsigned(flat: np.ndarray, slot: int, pad: int = 0) -> np.ndarray:
    """Values in [0, 2^slot) -> uint8, 8 // slot per byte, laid out as ``pack_nibbles`` says."""
    k = 8 // slot
    flat = np.concatenate([flat.reshape(-1).astype(np.uint8), np.full(-flat.size % k, pad, np.uint8)])
    parts = flat.reshape(k, -1)
    out = np.zeros(parts.shape[1], np.uint8)
    for j in range(k):
        out |= parts[j] << (slot * j)
    return out


def _emit(b: _Builder, src: Source, o: int, shape: tuple, transposed: bool, a: np.ndarray, out: str, keep_qdq: bool):
    """Nodes computing initializer ``out`` (``shape``) from the integers of rows o.. of ``src``."""
    from onnx import TensorProto, helper, numpy_helper

    r = shape[1] if transposed else shape[0]
    q, s = src.q[o:o + r], src.s[o:o + r]
    n, g = q.shape[1], src.group
    per_row = g == n
    ones = bool(np.all(a == 1))
    flat_shape = (n, r) if transposed else shape
    final = out if not transposed else None
    if keep_qdq:
        if src.bits == 8 and per_row:
            ints = b.const("int8", q.reshape((r, *shape[1:]) if not transposed else (r, n)))
            scale = (s[:, 0] * a).astype(np.float32)
            deq = b.node("DequantizeLinear", [ints, b.const("scale", scale)], "dequantize", final, axis=0)
        else:  # opset 21: INT4 (int2/int3 values fit; int5/int6 go as INT8), one scale per group of a row
            if src.bits <= 4:
                t = helper.make_tensor(f"{b.prefix}_int4", TensorProto.INT4, q.shape, q.reshape(-1).tolist())
                b.graph.initializer.append(t)
                b.bytes += (q.size + 1) // 2
            else:
                t = numpy_helper.from_array(q.astype(np.int8), f"{b.prefix}_int8")
                b.graph.initializer.append(t)
                b.bytes += q.size
            scale = (s * a[:, None]).astype(np.float32)
            attrs = {"axis": 1, "block_size": g} if not per_row else {"axis": 0}
            deq = b.node("DequantizeLinear", [t.name, b.const("scale", scale if not per_row else scale[:, 0])], "dequantize", **attrs)
            deq = b.node("Reshape", [deq, b.common(np.array(flat_shape if not transposed else (r, n), np.int64))], "reshape", final)
    else:
        if src.bits == 8 and per_row and not transposed:  # the integers in the weight's own shape: no Reshape
            vals = b.node("Cast", [b.const("int8", q.reshape(shape))], "cast", to=TensorProto.FLOAT)
            scale = (s[:, 0] * a).astype(np.float32).reshape(r, *[1] * (len(shape) - 1))
            b.node("Mul", [vals, b.const("scale", scale)], "scaled", out)
            return
        if src.bits == 8:
            vals = b.node("Cast", [b.const("int8", q)], "cast", to=TensorProto.FLOAT)
        else:
            unsigned = (q.reshape(-1).astype(np.int16) + (1 << (src.bits - 1))).astype(np.uint8)
            total = None
            for slot, shift in planes(src.bits):
                tag, k = f"{slot}_{shift}", 8 // slot
                p = b.const(f"p{tag}", pack_unsigned((unsigned >> shift) & ((1 << slot) - 1), slot)[None])
                # row j of (k, L): bits [slot j, slot (j + 1)) of every byte, i.e. elements j L ..
                shifts = b.common(np.arange(0, 8, slot, dtype=np.uint8)[:, None])
                parts = b.node("BitShift", [p, shifts], f"s{tag}", direction="RIGHT")
                parts = b.node("Mod", [parts, b.common(np.array([1 << slot], np.uint8))], f"m{tag}")
                u = b.node("Reshape", [parts, b.common(np.array([-1], np.int64))], f"f{tag}")
                if q.size % k:
                    u = b.node("Slice", [u, b.common(np.array([0], np.int64)),
                                         b.common(np.array([q.size], np.int64))], f"t{tag}")
                f = b.node("Cast", [u], f"c{tag}", to=TensorProto.FLOAT)
                if shift:
                    f = b.node("Mul", [f, b.common(np.array([1 << shift], np.float32))], f"h{tag}")
                total = f if total is None else b.node("Add", [total, f], f"a{tag}")
            vals = b.node("Sub", [total, b.common(np.array([1 << (src.bits - 1)], np.float32))], "centre")
        if per_row:
            vals = b.node("Reshape", [vals, b.common(np.array([r, n], np.int64))], "rows") if src.bits != 8 else vals
            deq = b.node("Mul", [vals, b.const("scale", (s[:, :1] * a[:, None]).astype(np.float32))], "scaled")
        else:
            vals = b.node("Reshape", [vals, b.common(np.array([r, n // g, g], np.int64))], "groups")
            s16 = s.astype(np.float16)
            exact = np.array_equal(s16.astype(np.float32), s)
            sc = b.node("Cast", [b.const("scale16", s16[:, :, None])], "scale", to=TensorProto.FLOAT) if exact \
                else b.const("scale", s[:, :, None])
            deq = b.node("Mul", [vals, sc], "scaled")
            if not ones:
                deq = b.node("Mul", [deq, b.const("rowfactor", a[:, None, None])], "rowscaled")
        deq = b.node("Reshape", [deq, b.common(np.array((r, n) if transposed else shape, np.int64))], "reshape", final)
    if transposed:
        b.node("Transpose", [deq], "transpose", out, perm=[1, 0])


def _emit_fp16(b: _Builder, src: Source, o: int, shape: tuple, transposed: bool, a: np.ndarray, out: str):
    """Nodes computing initializer ``out`` (``shape``) from the fp16 rows o.. of ``src``, times the
    per-row factors ``a`` the exporter folded in (a BatchNorm after a conv): the fp16 values stay
    fp16 in the graph instead of becoming a float tensor of twice the bytes."""
    from onnx import TensorProto

    r = shape[1] if transposed else shape[0]
    rows = src.values[o:o + r].astype(np.float16)
    own = rows.shape if transposed else (r, *shape[1:])
    ones = bool(np.all(a == 1))
    val = b.node("Cast", [b.const("fp16", rows.reshape(own))], "cast", out if ones and not transposed else None,
                 to=TensorProto.FLOAT)
    if not ones:
        factors = a.astype(np.float32).reshape(r, *[1] * (len(own) - 1))
        val = b.node("Mul", [val, b.const("rowfactor", factors)], "rowscaled", None if transposed else out)
    if transposed:
        b.node("Transpose", [val], "transpose", out, perm=[1, 0])


def dedupe_initializers(graph) -> int:
    """Identical float initializers (a weight shared by two layers) become one; returns how many went."""
    seen, renamed = {}, {}
    for init in list(graph.initializer):
        key = (init.data_type, tuple(init.dims), init.raw_data) if init.raw_data else None
        if key is None:
            continue
        if key in seen:
            renamed[init.name] = seen[key]
            graph.initializer.remove(init)
        else:
            seen[key] = init.name
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in renamed:
                node.input[i] = renamed[name]
    return len(renamed)


def quantize_graph(model, sources: list[Source], keep_qdq: bool = False) -> Rewritten:
    """Rewrite ``model`` (onnx.ModelProto) in place: every float initializer that is (rows of) a
    source, up to a per-row factor and a transpose, becomes that source's integers + scales."""
    from onnx import TensorProto, numpy_helper

    graph = model.graph
    dedupe_initializers(graph)
    index, res, nodes, shared = Index(sources), Rewritten(), [], {}
    for i, init in enumerate(list(graph.initializer)):
        if init.data_type != TensorProto.FLOAT or int(np.prod(init.dims)) < QUANT_MIN_NUMEL:
            continue
        x = numpy_helper.to_array(init)
        found = index.match(x)
        if found is None:
            continue
        src, o, transposed, a = found
        b = _Builder(graph, f"dq{i}", shared)
        if src.bits == 16:
            _emit_fp16(b, src, o, tuple(x.shape), transposed, a, init.name)
        else:
            _emit(b, src, o, tuple(x.shape), transposed, a, init.name, keep_qdq)
        graph.initializer.remove(init)
        nodes += b.nodes
        res.stored.setdefault(src.name, []).append(init.name)
        res.onnx_bytes[src.name] = res.onnx_bytes.get(src.name, 0) + b.bytes
    old = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + old)  # the weights exist before any use
    return res

