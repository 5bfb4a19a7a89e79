"""Recover accuracy with no labels: distill a converted CNN from its original on unlabeled images.

A LeNet-5 CNN is trained on scikit-learn's digits (32x32), converted at ratio 0.25, then its
states are fine-tuned using only the original as teacher and the training images written as a
flat folder of PNG files without labels. Accuracies are on the held-out test split.

    python benchmarks/distill_unlabeled.py [--epochs 30] [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from PIL import Image  # noqa: E402

import dynconvert  # noqa: E402
from dynconvert.io.checkpoint import Source  # noqa: E402
from dynconvert.io.data import digits, preprocess_for  # noqa: E402
from dynconvert.cli.demo import FACTORY, INPUT_SIZE, lenet5, threads, train_original  # noqa: E402
from dynconvert.train.evaluation import evaluate  # noqa: E402
from dynconvert.train.finetune import FinetuneOptions, finetune_file  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=30, help="distillation epochs")
    ap.add_argument("--ratio", type=float, default=0.25)
    ap.add_argument("--metric", default="sql2", help="state metric (l1, l2, sql2)")
    ap.add_argument("--out-dir", type=Path, default=None)
    args = ap.parse_args()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, threads(1):
        out = args.out_dir or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        pre = preprocess_for({"kind": "factory"}, INPUT_SIZE)
        data = digits(pre)

        original = lenet5()
        train_original(original, data.train, 30, 0)
        torch.save(original.state_dict(), out / "cnn.pth")
        acc_orig = evaluate(original, data.val)["top1"]

        # the training images as a folder of unlabeled PNGs (undo the normalization, 8-bit grey)
        folder = out / "unlabeled"
        folder.mkdir(exist_ok=True)
        pixels = (data.train.tensors[0] * pre.std[0] + pre.mean[0]).clamp(0, 1).mul(255).round().to(torch.uint8)
        for i, img in enumerate(pixels[:, 0]):
            Image.fromarray(img.numpy(), mode="L").save(folder / f"{i:04d}.png")

        conv = dynconvert.convert(original, ratio=args.ratio, min_params=1000, metric=args.metric,
                                  source=Source("factory", factory=FACTORY), input_size=INPUT_SIZE)
        dynconvert.save(conv, out / "cnn.dyn")
        acc_conv = evaluate(conv.model, data.val)["top1"]

        opts = FinetuneOptions(epochs=args.epochs, optimizer="adam", lr=1e-2, train="states+bias",
                               augment=False, stop_tol=0, checkpoint_every=10**9)
        finetune_file(out / "cnn.dyn", out / "cnn-kd.dyn", str(folder), opts, teacher=out / "cnn.pth",
                      factory=FACTORY, force=True)
        acc_kd = evaluate(dynconvert.load(out / "cnn-kd.dyn", factory=FACTORY), data.val)["top1"]
        dense = sum(s.dense_params for s in conv.layers)
        state = sum(s.state_params for s in conv.layers)
        result = {
            "converted_layers": [s.name for s in conv.layers], "ratio": args.ratio,
            "converted_layer_compression": dense / state, "unlabeled_images": len(pixels),
            "test_images": len(data.val), "original_accuracy": acc_orig, "converted_accuracy": acc_conv,
            "distilled_accuracy": acc_kd, "gap_points": (acc_orig - acc_kd) * 100,
            "seconds": time.perf_counter() - start,
        }
    print(f"original {acc_orig:.4f}  converted (ratio {args.ratio}) {acc_conv:.4f}  "
          f"after distillation on {len(pixels)} unlabeled images {acc_kd:.4f}  (gap {result['gap_points']:.2f} points)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
