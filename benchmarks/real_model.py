"""File bytes vs agreement with the original, for a real pretrained model, side by side.

For one model family (default: ImageNet-pretrained EfficientNet-Lite2), every row writes a real
file, reads the model back from it and measures, on evaluation crops of photos that are never
used for calibration (benchmarks/photos.py), its top-1 agreement with the original (argmax equal)
and top-5 containment (the original's top-1 within the row's top-5):

    kind        rows
    fp32        the original, a saved state dict (the reference for every ratio)
    int8        int8 per-channel weights of every Conv2d/Linear, round-to-nearest, no data
    int4        the same at int4 (packed in a .dyn): the weight-only point below int8's bytes
    gptq4       int4 GPTQ of every Conv2d/Linear on the calibration crops (sequential, 8 stages),
                one fp16 scale per ~64 inputs as dynconvert's int4 candidate (a .dyn)
    int4_recon  int4 RTN of every layer, then block-wise reconstruction on the calibration crops
    gptq4_recon int4 GPTQ of every layer (calibration crops), then block-wise reconstruction
    ort         the fp32 ONNX export; ONNX Runtime quantize_dynamic (per-channel QInt8) and
                quantize_static (QDQ, per-channel, calibrated on the calibration crops)
    svd         truncated SVD, one rank ratio for every non-depthwise Conv2d/Linear, fp32 factors,
                at each byte budget
    svd_int8    the same with int8 per-row factors, at each byte budget
    dynconvert  dynconvert at each byte budget with calibration crops (block reconstruction on by
                default), and data-free at 1/6
    distill     dynconvert and SVD+int8 at --distill-size (1/8), both after dynconvert.distill with the same
                time budget (SVD factors re-quantized to int8 and saved again); these rows call the
                dynconvert API, so `--skip dynconvert` skips them too
    distill_aug dynconvert at --distill-size after dynconvert.distill(augment=True, features=1): fresh augmented
                crops each step, every block's output matched to the original's beside the KL, a
                held-apart slice and early stopping on it (same time budget)

A row that fails records its error text; the run goes on.

    python -m benchmarks.real_model                          # EfficientNet-Lite2, everything (long: ~1 h on 2 cores)
    python -m benchmarks.real_model --quick --skip dynconvert  # smoke test: a few minutes
    python -m benchmarks.real_model --model resnet18_random --quick
    python -m benchmarks.real_model --model digits_cnn --quick  # also held-out digits accuracy
    python -m benchmarks.real_model --model digits_vit --quick  # a small ViT trained on digits (the same split)
    python -m benchmarks.real_model --model vit_b_16_random --quick --vit-size 112 --skip svd
    python -m benchmarks.real_model --only int8,svd_int8 --budgets 1/8,1/16
    python -m benchmarks.real_model --merge A/efficientnet_lite2/results.json B/efficientnet_lite2/results.json --out DIR
                                    # one table and one plot from runs split over processes (same model and crops)

Outputs under --out/<model>/: results.json (every row, the set-up and the machine), results.png
(top-1 agreement vs bytes), and the files themselves.
"""

from __future__ import annotations

import argparse
import json
import time
from fractions import Fraction
from pathlib import Path

import torch

from benchmarks.real_families import Bench, FAMILIES
from benchmarks.real_measure import fmt_bytes, machine_info, measure, plot, print_table
from benchmarks.real_rows import KINDS, label, row_specs
from dynconvert.io.allocator import keep_freed_memory


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
    ap.add_argument("--distill-size", default="1/8", help="the byte budget the distill rows start from (default 1/8)")
    ap.add_argument("--only", help=f"comma-separated row kinds to run ({', '.join(KINDS)})")
    ap.add_argument("--skip", help="comma-separated row kinds to leave out (`dynconvert` also skips the distill rows)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--digits-epochs", type=int, help="digits_cnn training epochs (default 20; --quick 6); digits_vit: 30")
    ap.add_argument("--vit-size", type=int, default=224, help="vit_b_16_random input pixels (a multiple of 16)")
    ap.add_argument("--out", default="bench-out/real_model")
    ap.add_argument("--merge", nargs="+", type=Path, metavar="RESULTS_JSON",
                    help="no rows run: merge these results.json files (one model, the same crops) into one table and plot")
    args = ap.parse_args(argv)
    quick = args.quick
    args.eval_flag, args.digits_epochs_flag = args.eval, args.digits_epochs
    args.calib = args.calib or (32 if quick else 256)
    args.eval = args.eval or (64 if quick else 512)
    args.digits_epochs = args.digits_epochs or (6 if quick else 20)
    args.budgets = [Fraction(b) for b in (args.budgets or ("1/8" if quick else "1/4,1/8,1/16")).split(",")]
    args.only, args.skip = parse_kinds(args.only), parse_kinds(args.skip)
    args.distill_size = Fraction(args.distill_size)
    return args


def merge(paths: list[Path], out: Path) -> dict:
    """One table and plot from runs of the same model on the same crops (rows split over processes
    to use the cores); a row measured by several runs (the fp32 reference) is kept once."""
    runs = [json.loads(p.read_text()) for p in paths]
    same = {(r["model"], r["args"]["calib"], r["args"]["eval"], r["args"]["seed"]) for r in runs}
    if len(same) > 1:
        raise SystemExit(f"--merge needs runs of one model on the same crops; got (model, calib, eval, seed) {sorted(same)}")
    rows = list({r["name"]: r for run in runs for r in run["rows"]}.values())
    title = (f"{runs[0]['model']}: agreement with the original on {runs[0]['args']['eval']} held-out inputs "
             f"({len(runs)} runs merged)")
    print_table(rows, title, any("accuracy" in r for r in rows))
    out.mkdir(parents=True, exist_ok=True)
    note = plot(rows, out / "results.png", title)
    result = dict(runs[0], rows=rows, merged_from=[str(p) for p in paths], machine=[r["machine"] for r in runs],
                  timing=[r["timing"] for r in runs], plot=None if note else "results.png", plot_note=note)
    (out / "results.json").write_text(json.dumps(result, indent=2))
    print(note or f"wrote {out / 'results.json'} and {out / 'results.png'}")
    return result


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.merge:
        return merge(args.merge, Path(args.out))
    keep_freed_memory()  # as the CLI does (dynconvert/io/allocator.py)
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

    specs = [s for s in row_specs(args.budgets, not args.quick, args.distill_size) if s.selected(args.only, args.skip)]
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
        distill_size=None if args.quick else label(args.distill_size),
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
