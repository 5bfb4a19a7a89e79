"""Calibrated vs weight-only conversion, before any fine-tuning (issue 4, item 3).

Trains the small digits CNN of benchmarks/fit_quality.py, converts two copies at the same budget,
one fitted to weights only and one also to its layers' outputs on 512 training images
(`convert --calib`), and prints held-out accuracies and the per-layer output errors.

    python -m benchmarks.calibration [--ratio 0.1] [--steps 300] [--calib-steps 300]
"""

from __future__ import annotations

import argparse
import copy
import json

import torch

import dynconvert
from dynconvert.dynamics.conversion import input_moments
from dynconvert.dynamics.fit import input_whitener, output_rel_error
from benchmarks.digits import digits_tensors, train_cnn


def accuracy(model, x, y) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def output_error(original, converted, name, calib) -> float:
    """Output error of a weight-only fitted layer on the calibration inputs (as calibrated fits report it)."""
    layer = original.get_submodule(name)
    moment = input_moments(original, {name: layer}, calib)[name]
    w = layer.weight.detach().reshape(layer.weight.shape[0], -1)
    return output_rel_error(w, converted.get_submodule(name).weight_matrix().detach(), input_whitener(moment))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ratio", type=float, default=0.1)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--calib-steps", type=int, default=300)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--min-params", type=int, default=2000, help="the 128x10 classifier (1,280 weights) stays dense")
    args = ap.parse_args()
    torch.set_num_threads(2)
    model, acc = train_cnn(args.epochs)
    original = copy.deepcopy(model)
    (xtr, _), (xte, yte) = digits_tensors()
    calib = [xtr[i : i + 128] for i in range(0, 512, 128)]
    common = dict(ratio=args.ratio, steps=args.steps, min_params=args.min_params)
    plain = dynconvert.convert(copy.deepcopy(model), **common)
    calibrated = dynconvert.convert(copy.deepcopy(model), calib=calib, calib_steps=args.calib_steps, **common)
    res = dict(
        original_accuracy=acc,
        weight_only_accuracy=accuracy(plain.model, xte, yte),
        calibrated_accuracy=accuracy(calibrated.model, xte, yte),
        layers=[dict(name=c.name, weight_err_plain=round(p.rel_error, 4), weight_err_calib=round(c.rel_error, 4),
                     output_err_plain=round(output_error(original, plain.model, c.name, calib), 4),
                     output_err_calib=round(c.output_rel_error, 4), output_err_svd=round(c.svd_output_rel_error, 4))
                for p, c in zip(plain.layers, calibrated.layers)],
    )
    print(f"original {res['original_accuracy']:.4f}  weight-only {res['weight_only_accuracy']:.4f}  "
          f"calibrated {res['calibrated_accuracy']:.4f}  (held-out digits, ratio {args.ratio}, no fine-tuning)")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
