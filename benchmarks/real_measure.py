"""benchmarks.real_model, phase 3: measuring a row against the reference, the table and the plot."""

from __future__ import annotations

import os
import platform
import re
import sys
import time
import traceback
from pathlib import Path

import torch

from benchmarks.real_families import Bench, predict_all
from benchmarks.real_rows import RowSpec


# ---------------------------------------------------------------------------- measurement

def agreement(logits: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(top-1 agreement, top-5 containment of the reference's top-1)."""
    target = ref.argmax(1)
    top1 = (logits.argmax(1) == target).float().mean().item()
    k = min(5, logits.shape[1])
    top5 = (logits.topk(k, dim=1).indices == target[:, None]).any(1).float().mean().item()
    return top1, top5


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def measure(spec: RowSpec, bench: Bench) -> dict:
    """Build the row's file, read it back, and compare its outputs with the original's on the evaluation inputs."""
    row = dict(name=spec.name, kind=spec.kind, method=spec.method)
    t0 = time.perf_counter()
    try:
        built = spec.build(bench, bench.out / slug(spec.name))
        t1 = time.perf_counter()
        logits = predict_all(built.predict, bench.family.eval_x, bench.args.batch)
        t2 = time.perf_counter()
        size = built.path.stat().st_size
        row.update(file=built.path.name, bytes=size, ratio=round(size / bench.fp32_bytes, 5))
        row["top1"], row["top5"] = agreement(logits, bench.ref)
        if bench.family.eval_y is not None:
            row["accuracy"] = (logits.argmax(1) == bench.family.eval_y).float().mean().item()
        row.update(build_s=round(t1 - t0, 2), eval_s=round(t2 - t1, 2), seconds=round(t2 - t0, 2), **built.extra)
    except Exception as exc:  # a failing row is a result, not the end of the run
        text = str(exc).strip().splitlines()
        row.update(error=f"{type(exc).__name__}: {text[0] if text else ''}"[:300], seconds=round(time.perf_counter() - t0, 2),
                   traceback=traceback.format_exc().strip().splitlines()[-6:])
        print(f"[{spec.name}] failed: {row['error']}", file=sys.stderr)
    return row


# ---------------------------------------------------------------------------- output

def fmt_bytes(n: int) -> str:
    return f"{n / 1e6:.3f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def table_cells(row: dict, has_acc: bool) -> list[str]:
    if "error" in row:
        return [row["name"], "-", "-", "-", "-"] + (["-"] if has_acc else []) + [f"{row['seconds']:.1f}", row["error"]]
    cells = [row["name"], fmt_bytes(row["bytes"]), f"{row['ratio']:.4f}", f"{row['top1']:.4f}", f"{row['top5']:.4f}"]
    return cells + ([f"{row['accuracy']:.4f}"] if has_acc else []) + [f"{row['seconds']:.1f}", ""]


def print_table(rows: list[dict], title: str, has_acc: bool) -> None:
    head = ["row", "bytes", "x fp32", "top-1 agr", "top-5 cont"] + (["accuracy"] if has_acc else []) + ["s", "note"]
    body = [table_cells(r, has_acc) for r in rows]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(c) for c in col) for col in zip(head, *body)]
        print(title)
        for line in [head, *body]:
            print("  ".join(c.ljust(w) for c, w in zip(line, widths)))
        return
    table = Table(title=title)
    for i, h in enumerate(head):
        table.add_column(h, justify="left" if i in (0, len(head) - 1) else "right", overflow="fold")
    for line in body:
        table.add_row(*line)
    Console(width=max(120, len(title))).print(table)


MARKERS = "o^vsDPXh<>pd"


def plot(rows: list[dict], path: Path, title: str) -> str | None:
    """Top-1 agreement vs bytes (log x), one marker per method; returns a note when skipped."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot"
    ok = [r for r in rows if "error" not in r]
    if not ok:
        return "no successful rows: no plot"
    fig, ax = plt.subplots(figsize=(8, 5))
    methods = list(dict.fromkeys(r["method"] for r in ok))
    for i, method in enumerate(methods):
        pts = [r for r in ok if r["method"] == method]
        style = dict(marker="*", s=220, color="black") if method == "fp32" else dict(marker=MARKERS[i % len(MARKERS)], s=60)
        ax.scatter([r["bytes"] for r in pts], [r["top1"] for r in pts], label=method, **style)
    ax.set_xscale("log")
    ax.set_xlabel("file bytes (log)")
    ax.set_ylabel("top-1 agreement with the original")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(title)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def machine_info(args) -> dict:
    import onnxruntime

    return dict(python=platform.python_version(), platform=platform.platform(), cpu_count=os.cpu_count(),
                torch_threads=torch.get_num_threads(), threads_flag=args.threads,
                omp_num_threads=os.environ.get("OMP_NUM_THREADS"), torch=torch.__version__,
                onnxruntime=onnxruntime.__version__)


