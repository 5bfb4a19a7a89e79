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

from ..budget.quant import GROUP_BITS
from ..errors import DynError
from ..io.checkpoint import load_model
from ..dynamics.modules import DynLinear, DynSpec
from .export import export_onnx, open_dyn
from ..dynamics.fused import pick_path
from .opcount import count
from ..dynamics.weightfree import WeightFreeCore

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


# ---------------------------------------------------------------- ONNX Runtime latency of whole models

ONNX_EXPORTS = ("original", "default", "materialized", "factorized", "weight-free", "keep-qdq", "int8 activations")
"""``default``: what ``dynconvert export --onnx`` writes (layout auto, stored integers folded at load)."""


def _ort_rounds(paths: dict, batch: int, size, threads: int, repeats: int, budget_s: float = 20.0) -> dict:
    """kind -> wall ms of ONNX Runtime runs at ``batch``, after 2 warm-up runs each.

    The graphs take turns, one run each per round, so a load that comes and goes on a shared
    machine falls on all of them alike. ``repeats`` rounds, fewer (at least 3) once a round's
    share of ``budget_s`` per graph is spent."""
    import onnxruntime as ort

    def options(kind):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads, opts.log_severity_level = threads, 1, 3
        # idle pool threads would otherwise spin after each run, on the core the next graph needs;
        # the graph optimizations are the default session's
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return opts

    sessions = {k: ort.InferenceSession(str(p), options(k), providers=["CPUExecutionProvider"]) for k, p in paths.items()}
    x = torch.randn(batch, *size, generator=torch.Generator().manual_seed(batch)).numpy()
    feeds = {k: {s.get_inputs()[0].name: x} for k, s in sessions.items()}
    times = {k: [] for k in paths}
    start = time.perf_counter()
    for rnd in range(repeats + 2):
        if rnd >= 5 and time.perf_counter() - start > budget_s * len(paths):
            break
        for k, session in sessions.items():
            t0 = time.perf_counter()
            session.run(None, feeds[k])
            if rnd >= 2:
                times[k].append((time.perf_counter() - t0) * 1e3)
    return times


def _exports(dyn, folder, original, factory, meta, calib=None) -> dict:
    """kind -> (export result, note): every ONNX export of the same model that ``onnx_latency`` times
    (an optional export the graph cannot have is left out)."""
    made = {}
    if original is not None:
        src = meta.get("source") or {}
        net = load_model(original, arch=src.get("arch"), model=factory).model
        made["original"] = (export_onnx(net, folder / "original.onnx", input_size=tuple(meta["input_size"])), "")
    else:  # the original's architecture and float weights: every layer dense, nothing stored as integers
        made["original"] = (export_onnx(dyn, folder / "original.onnx", factory=factory, layout_name="materialized",
                                        quantize=False, allow_larger=True), "the file materialized in fp32 (no original given)")
    made["default"] = (export_onnx(dyn, folder / "default.onnx", factory=factory, allow_larger=True), "")
    for kind in ("materialized", "factorized", "weight-free"):
        made[kind] = (export_onnx(dyn, folder / f"{kind}.onnx", factory=factory, layout_name=kind, allow_larger=True), "")
    optional = []
    if any(v.get("bits") in GROUP_BITS for v in (meta.get("quantized") or {}).values()):
        optional.append(("keep-qdq", dict(keep_qdq=True, allow_larger=True), "DequantizeLinear kept: runs on every call in a default session"))
    if calib is not None:
        optional.append(("int8 activations", dict(activations="int8", calib=calib, layout_name="materialized"), "ORT static QDQ, calibrated"))
    for kind, kw, note in optional:  # a row the graph cannot have is left out, not the table
        try:
            made[kind] = (export_onnx(dyn, folder / f"{kind}.onnx", factory=factory, **kw), note)
        except DynError as e:
            print(f"{kind}: not measured ({e})")
    for kind, (res, note) in made.items():
        if res.layouts and kind == "default":
            counts = {k: list(res.layouts.values()).count(k) for k in dict.fromkeys(res.layouts.values())}
            made[kind] = (res, "layout auto: " + ", ".join(f"{n} {k}" for k, n in counts.items()))
    return made


def onnx_latency(dyn, *, original=None, factory: str | None = None, batches=(1, 32), threads=(2,), repeats: int = 10,
                 on_row=None, calib=None, keep: Path | None = None) -> dict:
    """ONNX Runtime latency of every export of one converted model, side by side with file bytes.

    Exports (each checked against PyTorch by ``export_onnx``, except int8 activations): the
    ``original`` checkpoint when given, the default export (layout auto), each layout forced, the
    stored integers as DequantizeLinear (``keep-qdq``, quantized files) and static int8 QDQ
    (``calib`` given). ``keep``: a folder to leave the .onnx files in. They are timed in turns (``_ort_rounds``)
    at every batch size with ``intra_op_num_threads`` set to each of ``threads``, each keeping
    its best median (the row says which count).
    """
    import tempfile
    from pathlib import Path

    _, meta = open_dyn(dyn)
    size = tuple(meta.get("input_size") or (3, 224, 224))
    load = _loadavg()
    with tempfile.TemporaryDirectory(prefix="dynconvert-onnx-") as tmp:
        folder = Path(keep or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        made = _exports(dyn, folder, original, factory, meta, calib)
        paths = {kind: folder / f"{kind}.onnx" for kind in made}
        rows = {kind: {"export": kind, "bytes": res.bytes, "note": note,  # with any external data file
                       "kept_materialized": len(res.kept)}
                for kind, (res, note) in made.items()}
        for batch in batches:
            runs = [(_ort_rounds(paths, batch, size, t, repeats), t) for t in threads]
            for kind, row in rows.items():
                times, t = min(((r[kind], t) for r, t in runs), key=lambda r: statistics.median(r[0]))
                row[f"b{batch}_ms"] = round(statistics.median(times), 2)
                row[f"b{batch}_spread_ms"] = [round(min(times), 2), round(max(times), 2)]
                row[f"b{batch}_threads"] = t
                if on_row and batch == batches[-1]:
                    on_row(row)
    rows = list(rows.values())
    return {"file": str(dyn), "input_size": list(size), "batches": list(batches), "threads": list(threads),
            "repeats": repeats, "onnxruntime": _ort_version(), "cpu_count": os.cpu_count(), "loadavg_before": load,
            "loadavg_after": _loadavg(), "rows": rows}


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def latency_markdown(res: dict) -> str:
    """The ``onnx_latency`` rows as a Markdown table (ratios against the first row)."""
    base = res["rows"][0]
    agree = any("agreement" in r for r in res["rows"])
    head = (["export", f"bytes (x {base['export']})"] + [f"batch {b} ms (x {base['export']})" for b in res["batches"]]
            + (["top-1 agreement"] if agree else []) + ["note"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in res["rows"]:
        cells = [r["export"], f"{r['bytes']:,} ({r['bytes'] / base['bytes']:.3f}x)"]
        for b in res["batches"]:
            lo, hi = r[f"b{b}_spread_ms"]
            cells.append(f"{r[f'b{b}_ms']:.1f} [{lo:.1f}-{hi:.1f}] ({r[f'b{b}_ms'] / base[f'b{b}_ms']:.2f}x)")
        if agree:
            cells.append(f"{r['agreement']:.4f}" if "agreement" in r else "")
        kept = f"{r['kept_materialized']} layers kept materialized" if r.get("kept_materialized") else ""
        cells.append("; ".join(v for v in (r["note"], kept) if v))
        lines.append("| " + " | ".join(cells) + " |")
    if "pytorch converted" in res.get("agreement", {}):
        lines.append(f"\nPyTorch converted model: top-1 agreement {res['agreement']['pytorch converted']:.4f} "
                     f"on {res.get('eval_crops')} held-apart crops")
    lines.append(f"\nONNX Runtime {res['onnxruntime']}, intra-op threads: best of {res['threads']}; load average "
                 f"before/after: {res['loadavg_before']} / {res['loadavg_after']} on {res['cpu_count']} CPUs")
    return "\n".join(lines) + "\n"
