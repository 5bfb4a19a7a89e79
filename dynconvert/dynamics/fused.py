"""A fused weight-free L1 kernel (numba) and the rule that picks weight-free or dense per layer.

The eager L1 path (``weightfree.l1_matvec``) runs six torch ops, each a pass over a
(vectors, H*d, n) tensor. At batch 1 their dispatch and memory traffic dominate. This kernel does
per vector and channel one pass over the sorted inputs (prefix sums C and B, kept in a cache-
resident scratch row) and one over the outputs (read C(p_i) and B(p_i)), in float64 accumulators.

Chosen by measurement (16384 x 16384, H*d = 16, batch 1, one thread, this project's 2-core
machine): dense product 36.5 ms, eager path 0.87 ms, ``torch.compile`` of the eager path 1.35 ms
(plus 18 s to compile), this kernel 0.35 ms. numba is a dependency; where it cannot load (no
wheel for the platform, a broken LLVM), the eager path runs, with a one-line note on first use.
"""

from __future__ import annotations

import math
import sys

import numpy as np
import torch

from .metrics import weight_free_path

try:  # a dependency; the eager path stays the fallback where it cannot load
    from numba import njit
    UNAVAILABLE = None
except Exception as e:  # pragma: no cover - exercised where numba is absent or broken
    njit = None
    UNAVAILABLE = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
_noted = False


def available() -> bool:
    """Whether the fused kernel runs; where numba cannot load, says so once (one line on stderr)."""
    global _noted
    if njit is None and not _noted:
        _noted = True
        sys.stderr.write(f"note: numba cannot load ({UNAVAILABLE}); weight-free L1 layers run the eager path (about 3x slower)\n")
    return njit is not None


def _l1_kernel(v, order, ys, pos, w2, lam, ca, out, n, g):  # pragma: no cover - compiled
    """out[r, i] = sum_c lam_c sum_j |x_ci - y_cj| v[r, j] + offset * sum_j v[r, j] per conv group.

    With p = pos[c, i] = #{y_cj < x_ci}, C and B the prefix sums of v and y*v in sorted order:
    lam (x (2 C(p) - C(n)) + B(n) - 2 B(p)) = w2 C(p) - 2 lam B(p) + [-lam x C(n)] + lam B(n);
    the bracket summed over c (and the offset) is ``ca``.
    """
    rows, chans, m = v.shape[0], order.shape[0], pos.shape[1]
    mg = m // g
    pc = np.empty(n + 1, np.float64)
    pb = np.empty(n + 1, np.float64)
    acc = np.empty(mg, np.float64)
    for r in range(rows):
        for gi in range(g):
            base, first = gi * n, gi * mg
            acc[:] = 0.0
            beta = 0.0
            total = 0.0
            for c in range(chans):
                s = 0.0
                b = 0.0
                pc[0] = 0.0
                pb[0] = 0.0
                for j in range(n):
                    val = v[r, base + order[c, j]]
                    s += val
                    b += ys[c, j] * val
                    pc[j + 1] = s
                    pb[j + 1] = b
                beta += lam[c] * b
                total = s
                lam2 = 2.0 * lam[c]
                for i in range(mg):
                    p = pos[c, first + i]
                    acc[i] += w2[c, first + i] * pc[p] - lam2 * pb[p]
            for i in range(mg):
                out[r, first + i] = acc[i] + total * ca[first + i] + beta


_compiled = njit(cache=True, boundscheck=False, nogil=True)(_l1_kernel) if njit is not None else None


def fused_tables(order, ys, xs, pos, lam, offset) -> tuple:
    """The kernel's numpy arrays from ``weightfree._l1_tables``'s compact tables."""
    lam_np = lam.double().numpy()
    xs_np = xs.double().numpy()
    w2 = (2 * lam_np[:, None] * xs_np).astype(np.float32)
    ca = (float(offset) - (lam_np[:, None] * xs_np).sum(0)).astype(np.float32)
    return (np.ascontiguousarray(order.numpy().astype(np.int32)), np.ascontiguousarray(ys.numpy()),
            np.ascontiguousarray(pos.numpy().astype(np.int32)), w2, lam_np.astype(np.float32), ca)


def l1_fused(v: torch.Tensor, tables: tuple, m: int, n: int, g: int) -> torch.Tensor:
    """``v`` (N, g*n) float32 on CPU -> (N, m), the same product as ``weightfree.l1_matvec``."""
    order, ys, pos, w2, lam, ca = tables
    vn = v.detach().contiguous().numpy()
    out = np.empty((vn.shape[0], m), np.float32)
    _compiled(vn, order, ys, pos, w2, lam, ca, out, n, g)
    return torch.from_numpy(out)


# ---------------------------------------------------------------- which path is faster

# Calibrated on this project's machine (2 cores, one thread, `dynconvert bench --json` rows, 1024^2
# to 16384^2 and ResNet-50's largest layers at batch 1 and 32): a per-step cost of the kernel and
# the dense product's bandwidth (higher while the matrix fits in cache) and FLOP rate. Rough on
# purpose and on the slow side for weight-free: MARGIN keeps a wrong pick from costing time.
WF_PER_STEP = 1.0e-9
"""Seconds per (vector, channel, input-or-output element) step of the fused kernel (0.66-1.05 ns
measured, idle to loaded)."""
WF_OVERHEAD = 1e-5
EAGER_FACTOR, EAGER_OVERHEAD = 3.0, 6e-5
"""The eager path (no numba): 2.5-4x the kernel's per-step cost, ~50 us of op dispatch."""
DENSE_BYTES_PER_S, DENSE_CACHED_BYTES_PER_S, CACHE_BYTES = 25e9, 80e9, 8 << 20
DENSE_FLOPS = 50e9
DENSE_OVERHEAD = 5e-6
MARGIN = 0.6
"""Weight-free is picked only when predicted below this fraction of dense."""


def predicted_seconds(m: int, n: int, channels: int, g: int, vectors: int, fused: bool | None = None) -> tuple[float, float]:
    """(weight-free, dense) time of one layer over ``vectors`` input vectors, by the cost model.

    ``n`` is the per-group input width (the matrix's columns), ``g`` the conv groups.
    """
    fused = available() if fused is None else fused
    steps = vectors * channels * (g * n + m)
    if fused:
        wf = WF_OVERHEAD + steps * WF_PER_STEP
    else:
        wf = EAGER_OVERHEAD + steps * WF_PER_STEP * EAGER_FACTOR
    nbytes = 4.0 * m * n
    bandwidth = DENSE_CACHED_BYTES_PER_S if nbytes <= CACHE_BYTES else DENSE_BYTES_PER_S
    dense = DENSE_OVERHEAD + max(nbytes / bandwidth, 2.0 * m * n * vectors / DENSE_FLOPS)
    return wf, dense


def pick_path(m: int, n: int, channels: int, g: int = 1, vectors: int = 1, fused: bool | None = None) -> str:
    """"weightfree" when the cost model says it is clearly faster than the dense product, else "dense"."""
    wf, dense = predicted_seconds(m, n, channels, g, vectors, fused)
    return "weightfree" if wf < MARGIN * dense and math.isfinite(wf) else "dense"


def layer_path(layer, vectors: int) -> str:
    """``pick_path`` for a converted layer (``dynamics.DynamicsLayer``) run on ``vectors`` input
    vectors per call (batch, times output positions for a conv): "weightfree" only where it has an
    L1 weight-free path and the cost model says it is clearly faster."""
    if weight_free_path(layer.spec.metric, layer.spec.kernel) != "l1":
        return "dense"
    m, n = layer.matrix_shape
    return pick_path(m, n, layer.spec.groups * layer.spec.dim, getattr(layer, "conv_groups", 1), vectors)
