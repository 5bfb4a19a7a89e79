"""Whole ResNet-50 conversion time at the resnet50 recipe (issue 2, item 2).

Saves a torchvision ResNet-50 state dict (random init: nothing can be downloaded here) and times
`dynconvert convert resnet50.pth --recipe resnet50 --out r50.dyn` end to end in a subprocess,
exactly as a user runs it, then checks the file loads and prints the figures.

    python -m benchmarks.convert_resnet50 [--steps N] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=None, help="override the recipe's fitting steps")
    ap.add_argument("--keep", type=Path, default=None, help="keep resnet50.pth and r50.dyn in this folder")
    args = ap.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="dynconvert-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    ckpt, out = work / "resnet50.pth", work / "r50.dyn"
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet50().state_dict(), ckpt)
    cmd = [sys.executable, "-m", "dynconvert", "convert", str(ckpt), "--recipe", "resnet50", "--out", str(out), "--force"]
    if args.steps is not None:
        cmd += ["--steps", str(args.steps)]
    print("$", " ".join(cmd[2:]), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent)))
    seconds = time.perf_counter() - t0

    from dynconvert.dynfile import read_dyn

    _, meta = read_dyn(out)
    layers = meta["layers"].values()
    dense = sum(v["dense_params"] for v in layers)
    state = sum(v["state_params"] for v in layers)
    result = dict(
        seconds=round(seconds, 1), cpu_threads=torch.get_num_threads(), converted_layers=len(meta["layers"]),
        max_layer_ratio=round(max(v["state_params"] / v["dense_params"] for v in layers), 4),
        converted_params_dense=dense, converted_params_states=state,
        mean_rel_error=round(sum(v["rel_error"] for v in layers) / len(layers), 4),
        mean_svd_rel_error=round(sum(v["svd_rel_error"] for v in layers) / len(layers), 4),
        steps=meta["options"]["steps"],
    )
    print(json.dumps(result))
    print(f"ResNet-50 conversion at the resnet50 recipe: {seconds / 60:.1f} min (target <= 10 min)")


if __name__ == "__main__":
    main()
