"""Weight-free inference: converted layers computed from their states without the m x n matrix.

FLOP counts here are what ``report`` prints for the weight-free path.
"""

from __future__ import annotations

from .dynamics import DynamicsLayer


def weightfree_flops(layer: DynamicsLayer, vectors: int) -> int | None:
    """FLOPs of the weight-free forward of ``layer`` over ``vectors`` input vectors.

    ``vectors`` is batch x output positions (1 per sample for Linear). ``None`` where the layer's
    metric/kernel has no weight-free path (it runs materialized).
    L1/linear (sorted prefix sums, design notes): H*d*(2n + 4m) per vector.
    sql2/linear (thin products): 2*H*d*(n + m) for the two products plus 2n + 3m for the
    row/column terms and the offset.
    """
    spec = layer.spec
    m, n = layer.matrix_shape
    if spec.kernel != "linear":
        return None
    if spec.metric == "l1":
        return vectors * spec.groups * spec.dim * (2 * n + 4 * m)
    if spec.metric == "sql2":
        return vectors * (2 * spec.groups * spec.dim * (n + m) + 2 * n + 3 * m)
    return None
