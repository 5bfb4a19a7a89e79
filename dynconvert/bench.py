"""``dynconvert bench``: the weight-free paths against the dense layer and truncated SVD.

For each layer shape, batch size and device, on the same inputs: the dense product
(``F.linear``), truncated SVD at the same parameter budget (rank H*d, two thin products), the L1
weight-free path and the squared-L2 path. Medians and the spread (min, max) over repeats, and
the peak bytes the weight-free forwards allocate (``OpCounter``: live tensors they create).
States are random: time does not depend on their values.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from .dynamics import DynLinear, DynSpec
from .fused import pick_path
from .opcount import count
from .weightfree import WeightFreeCore

SQUARE_SIZES = (1024, 2048, 4096, 8192, 16384)
RESNET50_LAYERS = ((1000, 2048, "resnet50 fc"), (512, 4608, "resnet50 layer4 3x3 conv"))


@dataclass
class Row:
    m: int
    n: int
    batch: int
    device: str
    hd: int
    layer: str
    dense_ms: float
    svd_ms: float
    weightfree_ms: float
    sql2_ms: float
    dense_spread_ms: list[float]
    svd_spread_ms: list[float]
    weightfree_spread_ms: list[float]
    sql2_spread_ms: list[float]
    threads: dict[str, int]
    dense_matrix_bytes: int
    weightfree_peak_bytes: int | None
    sql2_peak_bytes: int | None
    weightfree_largest_bytes: int | None
    rule: str = ""
    """``fused.pick_path``'s choice for this layer and batch: "weightfree" or "dense"."""


def _loadavg() -> list[float] | None:
    """The machine's 1/5/15-minute load: other processes make CPU timings noisy."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_fn(fn, x, repeats: int, device: str, warmup: int = 3) -> list[float]:
    """Wall time of ``fn(x)`` in ms, ``repeats`` times after ``warmup`` calls."""
    with torch.no_grad():
        for _ in range(warmup):
            fn(x)
        _sync(device)
        out = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn(x)
            _sync(device)
            out.append((time.perf_counter() - start) * 1e3)
    return out


def _core(m: int, n: int, groups: int, dim: int, metric: str, device: str, gen: torch.Generator) -> WeightFreeCore:
    layer = DynLinear(n, m, False, DynSpec(groups, dim, metric, "linear"))
    layer.set_states(
        torch.rand(groups, m, dim, generator=gen), torch.rand(groups, n, dim, generator=gen),
        torch.randn(groups, generator=gen), torch.randn((), generator=gen),
    )
    return WeightFreeCore(layer).to(device)


def _peak(core: WeightFreeCore, x: torch.Tensor, device: str) -> tuple[int, int]:
    """(peak live bytes, largest single allocation) of one forward."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        with torch.no_grad():
            core(x)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base, -1
    c = count(core, x)
    return c.peak_bytes, c.largest_bytes


def _best(fn, x, repeats: int, device: str, threads) -> tuple[list[float], int]:
    """Timings at the thread count (of ``threads``) with the lowest median, and that count."""
    best = None
    for t in threads if device == "cpu" else [torch.get_num_threads()]:
        torch.set_num_threads(t)
        times = time_fn(fn, x, repeats, device)
        if best is None or statistics.median(times) < statistics.median(best[0]):
            best = (times, t)
    return best


def bench_row(m: int, n: int, batch: int, device: str, groups: int, dim: int, repeats: int, layer: str = "",
              threads=(2,)) -> Row:
    gen = torch.Generator().manual_seed(m * 31 + n)
    rank = groups * dim
    x = torch.randn(batch, n, generator=gen).to(device)
    wf = _core(m, n, groups, dim, "l1", device, gen)
    sq = _core(m, n, groups, dim, "sql2", device, gen)
    wf_peak, wf_largest = _peak(wf, x, device)
    sq_peak, _ = _peak(sq, x, device)
    runs = {"weightfree": _best(wf, x, repeats, device, threads), "sql2": _best(sq, x, repeats, device, threads)}
    del wf, sq
    a, b = torch.randn(m, rank, generator=gen).to(device), torch.randn(rank, n, generator=gen).to(device)
    runs["svd"] = _best(lambda v: F.linear(F.linear(v, b), a), x, repeats, device, threads)
    del a, b
    w = torch.randn(m, n, generator=gen).to(device)
    runs["dense"] = _best(lambda v: F.linear(v, w), x, repeats, device, threads)
    del w
    times = {k: v[0] for k, v in runs.items()}
    med = {k: statistics.median(v) for k, v in times.items()}
    spread = {k: [min(v), max(v)] for k, v in times.items()}
    return Row(
        m, n, batch, device, rank, layer, med["dense"], med["svd"], med["weightfree"], med["sql2"],
        spread["dense"], spread["svd"], spread["weightfree"], spread["sql2"], {k: v[1] for k, v in runs.items()}, m * n * 4, wf_peak, sq_peak, wf_largest,
        pick_path(m, n, rank, 1, batch) if device == "cpu" else "",
    )


def run_bench(
    sizes=SQUARE_SIZES, batches=(1, 32), devices=None, groups: int = 4, dim: int = 4, repeats: int = 15,
    resnet50: bool = True, threads=(1, 2), on_row=None,
) -> dict:
    """All rows (see ``Row``) plus the settings, as one JSON-ready dict.

    On CPU every method is timed at each of ``threads`` and keeps its best median (the row says
    which): on a shared 2-core machine a second thread can help the dense product and hurt a
    chain of small ops, or the other way round.
    """
    if devices is None:
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    shapes = [(s, s, f"square {s}") for s in sizes] + (list(RESNET50_LAYERS) if resnet50 else [])
    rows, before, load = [], torch.get_num_threads(), _loadavg()
    try:
        for device in devices:
            for m, n, name in shapes:
                for batch in batches:
                    row = bench_row(m, n, batch, device, groups, dim, repeats, name, threads)
                    rows.append(asdict(row))
                    if on_row:
                        on_row(rows[-1])
    finally:
        torch.set_num_threads(before)
    return {
        "groups_H": groups, "dim_d": dim, "threads": list(threads), "repeats": repeats, "torch": torch.__version__,
        "cpu_count": os.cpu_count(), "loadavg_before": load, "loadavg_after": _loadavg(), "rows": rows,
    }
