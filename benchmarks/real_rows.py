"""benchmarks.real_model, phase 2: the rows, each building one representation as a real file and reading it back."""

from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from benchmarks import baselines as B
from benchmarks.real_built import Built, dyn_read_back, progress_printer
from benchmarks.real_families import Bench, torch_predictor
from benchmarks.quant_rows import build_gptq4, build_int4_recon


KINDS = ("fp32", "int8", "int4", "gptq4", "ort", "svd", "svd_int8", "dynconvert", "data_free", "distill", "int4_recon",
         "gptq4_recon", "distill_aug")
DATA_FREE_SIZE = Fraction(1, 6)
DISTILL_SIZE = Fraction(1, 8)


# ---------------------------------------------------------------------------- rows

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
    from dynconvert.dynamics.conversion import ConvertOptions
    from dynconvert.budget.quant import fake_quant

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

def dyn_calibrated(bench: Bench, size: Fraction):
    import dynconvert

    key = ("dynconvert", size)
    if key not in bench.cache:
        model_copy = copy.deepcopy(bench.family.original)
        start = time.perf_counter()
        with measured_once(bench):
            bench.cache[key] = dynconvert.convert(model_copy, size=float(size), calib=bench.calib_batches(),
                                                  input_size=bench.family.input_size, on_progress=progress_printer(f"dynconvert {label(size)}"))
        bench.cache[key].seconds = time.perf_counter() - start
        print(f"   conversion {label(size)}: {bench.cache[key].seconds:.0f} s", flush=True)
    return bench.cache[key]


@contextlib.contextmanager
def measured_once(bench: Bench):
    """The candidates' measured network errors depend on the model and the calibration crops, not
    on the budget, but which candidates are measured does: a budget leaves out those far below its
    share (``share``, pipeline.CHEAPEST_SHARE). So budgets with the same share reuse one table (what
    a search over budgets does), and each other budget measures its own, as its conversion alone
    would (a 1/8 run that reused the table of 1/4 lacked the candidates it needs, and failed)."""
    from dynconvert.budget import pipeline

    real = pipeline.measure_candidates

    def once(model, units, *args, notes=None, **kwargs):
        key = ("measured", tuple(u.name for u in units), kwargs.get("share", 0.0))
        if key not in bench.cache:
            table = {}
            bench.cache[key] = (real(model, units, *args, notes=table, **kwargs), table)
        result, table = bench.cache[key]
        if notes is not None:
            notes.update(table)
        return result

    pipeline.measure_candidates = once
    try:
        yield
    finally:
        pipeline.measure_candidates = real


def build_dynconvert(size: Fraction):
    def build(bench: Bench, stem: Path) -> Built:
        conv = dyn_calibrated(bench, size)
        built = dyn_read_back(bench, conv, stem.with_suffix(".dyn"))
        built.extra.update(kinds=conv.budget["kinds"])  # how many layers chose each representation
        print(f"   {label(size)}: layers per choice {conv.budget['kinds']}", flush=True)
        return built

    return build


def build_dynconvert_data_free(bench: Bench, stem: Path) -> Built:
    import dynconvert

    model_copy = copy.deepcopy(bench.family.original)
    conv = dynconvert.convert(model_copy, size=float(DATA_FREE_SIZE), data_free=True, input_size=bench.family.input_size,
                              on_progress=progress_printer("dynconvert data-free"), on_note=print)
    return dyn_read_back(bench, conv, stem.with_suffix(".dyn"))


def distill(bench: Bench, student, augment: bool = False) -> dict:
    """The one distillation call the distilled rows share (same data, same time budget). A
    dynconvert ``Conversion`` keeps its quantized tensors on their grid while it trains.
    ``augment``: fresh augmented crops each step, a held-apart slice and early stopping on it,
    and every block's output matched to the original's beside the KL (``features=1``)."""
    import dynconvert

    return dynconvert.distill(student, bench.teacher(), bench.calib_batches(), seconds=bench.args.distill_seconds,
                              augment=augment, features=1.0 if augment else 0.0, on_log=print)


def build_dynconvert_distilled(size: Fraction, augment: bool = False):
    def build(bench: Bench, stem: Path) -> Built:
        start = "reused" if ("dynconvert", size) in bench.cache else "converted here"
        conv = copy.deepcopy(dyn_calibrated(bench, size))
        log = distill(bench, conv, augment=augment)
        built = dyn_read_back(bench, conv, stem.with_suffix(".dyn"))
        built.extra.update(start=start, distill_seconds=bench.args.distill_seconds)
        if augment:
            built.extra.update({k: log[k] for k in ("steps", "held_apart", "held_first", "held_best")})
        return built

    return build


def build_svd_int8_distilled(size: Fraction):
    def build(bench: Bench, stem: Path) -> Built:
        path = stem.with_suffix(".safetensors")
        key = ("svd", size, True)
        start = "reused" if key in bench.cache else "factorized here"
        if key not in bench.cache:
            build_svd(size, True)(bench, stem.with_name(stem.name + "_start"))
        start_model, ranks = bench.cache[key]
        student = copy.deepcopy(start_model)
        distill(bench, student)
        B.save_svd(path, student, ranks, int8=True)   # re-quantized (attention matrices re-truncated): the bytes stay
        model = B.load_svd(path, bench.family.fresh())
        return Built(path, torch_predictor(model),
                     dict(svd_extra(bench, ranks, size), start=start, distill_seconds=bench.args.distill_seconds))

    return build


def label(size: Fraction) -> str:
    return f"{size.numerator}/{size.denominator}"


def row_specs(budgets: list[Fraction], distill_rows: bool, distill_size: Fraction = DISTILL_SIZE) -> list[RowSpec]:
    rows = [
        RowSpec("fp32 original", "fp32", "fp32", build_fp32),
        RowSpec("int8 per-channel RTN", "int8", "int8 RTN", build_int8),
        RowSpec("int4 per-channel RTN (weight-only)", "int4", "int4 RTN", build_int4),
        RowSpec("int4 GPTQ g~64, every layer", "gptq4", "int4 GPTQ", build_gptq4),
        RowSpec("int4 RTN + block reconstruction", "int4_recon", "int4 + reconstruction", build_int4_recon(False)),
        RowSpec("int4 GPTQ + block reconstruction", "gptq4_recon", "int4 + reconstruction", build_int4_recon(True)),
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
        at = label(distill_size)
        rows += [RowSpec(f"dynconvert @ {at} + distill", "distill", "dynconvert + distill",
                         build_dynconvert_distilled(distill_size), dyn),
                 RowSpec(f"SVD+int8 @ {at} + distill", "distill", "SVD+int8 + distill",
                         build_svd_int8_distilled(distill_size), dyn),
                 RowSpec(f"dynconvert @ {at} + distill (augmented, blocks matched, held-apart stop)", "distill_aug",
                         "dynconvert + distill", build_dynconvert_distilled(distill_size, augment=True), dyn)]
    return rows


