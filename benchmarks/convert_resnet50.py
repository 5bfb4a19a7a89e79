"""Whole ResNet-50 conversion time at the resnet50 recipe, on idle cores and under load (issue 11, item 1).

Saves a torchvision ResNet-50 state dict (random init: nothing can be downloaded here) and times
`dynconvert convert resnet50.pth --recipe resnet50 --out r50.dyn` end to end in a subprocess,
exactly as a user runs it: once as the machine is, then again while one CPU-bound busy-loop
process (started here) holds a core. Prints both times, their ratio and the load average around
each run (other users of the machine count too), and checks both files are the same bytes.

    python -m benchmarks.convert_resnet50 [--steps N] [--threads N] [--keep DIR] [--no-load]
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

ROOT = Path(__file__).resolve().parent.parent


def timed_convert(ckpt: Path, out: Path, args) -> dict:
    cmd = [sys.executable, "-m", "dynconvert", "convert", str(ckpt), "--recipe", "resnet50", "--out", str(out), "--force"]
    if args.steps is not None:
        cmd += ["--steps", str(args.steps)]
    if args.threads is not None:
        cmd += ["--threads", str(args.threads)]
    print("$", " ".join(cmd[2:]), flush=True)
    load = [round(v, 2) for v in os.getloadavg()]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    return dict(seconds=round(time.perf_counter() - t0, 1), loadavg_before=load, loadavg_after=[round(v, 2) for v in os.getloadavg()])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=None, help="override the recipe's fitting steps")
    ap.add_argument("--threads", type=int, default=None, help="convert --threads (default: the CLI's)")
    ap.add_argument("--keep", type=Path, default=None, help="keep resnet50.pth and the .dyn files in this folder")
    ap.add_argument("--no-load", action="store_true", help="skip the run beside a busy-loop process")
    args = ap.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="dynconvert-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    ckpt = work / "resnet50.pth"
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet50().state_dict(), ckpt)

    idle = timed_convert(ckpt, work / "r50.dyn", args)
    print(f"as the machine is: {idle['seconds']:.0f} s (load average before {idle['loadavg_before']})", flush=True)
    loaded = None
    if not args.no_load:
        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            loaded = timed_convert(ckpt, work / "r50_load.dyn", args)
        finally:
            busy.kill()
            busy.wait()
        print(f"beside one busy-loop process: {loaded['seconds']:.0f} s", flush=True)

    from dynconvert.dynfile import read_dyn

    _, meta = read_dyn(work / "r50.dyn")
    layers = meta["layers"].values()
    result = dict(
        idle=idle, under_load=loaded, cpu_count=os.cpu_count(), converted_layers=len(meta["layers"]),
        max_layer_ratio=round(max(v["state_params"] / v["dense_params"] for v in layers), 4),
        mean_rel_error=round(sum(v["rel_error"] for v in layers) / len(layers), 4),
        mean_svd_rel_error=round(sum(v["svd_rel_error"] for v in layers) / len(layers), 4),
        steps=meta["options"]["steps"],
    )
    if loaded:
        result["load_ratio"] = round(loaded["seconds"] / idle["seconds"], 2)
        result["same_bytes"] = (work / "r50.dyn").read_bytes() == (work / "r50_load.dyn").read_bytes()
    print(json.dumps(result))
    line = f"ResNet-50 at the resnet50 recipe: {idle['seconds']:.0f} s (target <= 180 s on idle cores)"
    if loaded:
        line += f"; {loaded['seconds']:.0f} s beside a busy loop = {result['load_ratio']:.2f}x (target <= 2x)"
    print(line)


if __name__ == "__main__":
    main()
