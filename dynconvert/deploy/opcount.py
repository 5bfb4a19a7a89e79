"""Counting what a forward pass really does: element operations per arithmetic op and the bytes of
live tensors it allocates (``OpCounter``). The weight-free FLOP formulas and peak-memory figures of
``weightfree.py`` / ``dynconvert bench`` are checked against it.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ..dynamics.weightfree import _eager_only, clear_workspace


_FREE = {"view", "reshape", "_unsafe_view", "expand", "permute", "transpose", "t", "slice", "select", "unsqueeze",
         "squeeze", "index_select", "cat", "stack", "constant_pad_nd", "clone", "contiguous", "copy_", "empty", "zeros",
         "detach", "alias", "as_strided", "im2col", "_to_copy", "lift_fresh", "fill_", "new_zeros", "zero_"}


class OpCounter(TorchDispatchMode):
    """Counts what a forward executes: FLOPs by the rule of ``l1_flops``/``sql2_flops`` (one per
    output element of each elementwise op, n-1 adds per row of a cumsum, in - out adds for a sum,
    2*M*K*N for a matrix product), the peak bytes of live tensors it allocates and the largest one.

    Unknown arithmetic ops raise, so a count never silently misses work.
    """

    def __init__(self):
        super().__init__()
        self.flops = 0
        self.peak_bytes = 0
        self.largest_bytes = 0
        self._live: list = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        self.flops += self._flops(name, args, out)
        self._track([*args, *kwargs.values()], out)
        return out

    @staticmethod
    def _flops(name, args, out) -> int:
        if name in _FREE:
            return 0
        if name in ("mul", "add", "sub", "div", "neg", "mul_", "add_"):
            return out.numel()
        if name in ("addcmul", "addcmul_"):
            return 2 * out.numel()
        if name in ("cumsum", "cumsum_"):
            x, dim = args[0], args[1]
            return x.numel() - (x.numel() // x.shape[dim] if x.numel() else 0)
        if name == "sum":
            return args[0].numel() - out.numel()
        if name in ("mm", "bmm", "addmm", "mv", "dot"):
            a, b = (args[1], args[2]) if name == "addmm" else (args[0], args[1])
            k = a.shape[-1]
            return 2 * k * out.numel() + (out.numel() if name == "addmm" else 0)
        raise NotImplementedError(f"OpCounter has no FLOP rule for aten.{name}")

    def _track(self, args, out) -> None:
        from torch.multiprocessing.reductions import StorageWeakRef

        inputs = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if not isinstance(t, torch.Tensor) or t.untyped_storage().data_ptr() in inputs:
                continue  # a view or in-place result allocates nothing
            size = t.untyped_storage().nbytes()
            self.largest_bytes = max(self.largest_bytes, size)
            self._live.append((StorageWeakRef(t.untyped_storage()), size))
        self._live = [(r, s) for r, s in self._live if not r.expired()]
        self.peak_bytes = max(self.peak_bytes, sum(s for _, s in self._live))


# ---------------------------------------------------------------- ONNX


def count(fn, *args) -> OpCounter:
    """Run ``fn(*args)`` without gradients under an OpCounter and return the counter.

    The L1 scratch buffer is dropped first, so the peak includes it. The eager L1 path runs
    (the fused kernel, when installed, allocates less: two (n+1) rows and the output).
    """
    clear_workspace()
    _eager_only.on = True
    try:
        with torch.no_grad(), OpCounter() as c:
            fn(*args)
    finally:
        _eager_only.on = False
    return c
