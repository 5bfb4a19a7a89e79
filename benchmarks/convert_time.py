"""Whole-model conversion time and memory, on idle cores and under load (issues 11 and 13).

Saves a torchvision state dict (random init: nothing can be downloaded here) and times
`dynconvert convert MODEL.pth --out MODEL.dyn` end to end in a subprocess, exactly as a user runs
it: ResNet-50 at the resnet50 recipe, ViT-B/16 at default settings. Once as the machine is, then
(ResNet-50) again while one CPU-bound busy-loop process (started here) holds a core. Prints the
times, their ratio, the load average around each run (other users of the machine count too), the
peak memory (the largest single process, and the whole process tree: the converting process plus
its fitting workers, sampled every 0.2 s), and checks both files are the same bytes.

    python -m benchmarks.convert_time [--model resnet50|vit_b_16] [--steps N] [--threads N] [--keep DIR] [--no-load]

convert's default ``--threads`` follows ``OMP_NUM_THREADS`` when it is set (as a user's would):
leave it unset to time the default of one worker per core.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision

ROOT = Path(__file__).resolve().parent.parent
MODELS = {
    # model: (extra convert arguments, target seconds on idle cores, whether the issue asks for the busy-loop run)
    "resnet50": (["--recipe", "resnet50"], 180, True),
    "vit_b_16": ([], 300, False),
}


def _tree_rss(root: int) -> int:
    """Resident bytes of ``root`` and every process below it (0 for any that just ended)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def timed_convert(ckpt: Path, out: Path, extra: list[str], args) -> dict:
    cmd = [sys.executable, "-m", "dynconvert", "convert", str(ckpt), *extra, "--out", str(out), "--force"]
    if args.steps is not None:
        cmd += ["--steps", str(args.steps)]
    if args.threads is not None:
        cmd += ["--threads", str(args.threads)]
    print("$", " ".join(["dynconvert", *cmd[3:]]), flush=True)
    load = [round(v, 2) for v in os.getloadavg()]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    peak_tree = 0
    while proc.poll() is None:
        peak_tree = max(peak_tree, _tree_rss(proc.pid))
        time.sleep(0.2)
    seconds = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(f"error: the conversion exited with {proc.returncode}")
    return dict(seconds=round(seconds, 1), loadavg_before=load, loadavg_after=[round(v, 2) for v in os.getloadavg()],
                peak_tree_mb=round(peak_tree / 1e6), peak_process_mb=round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1e3))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(MODELS), default="resnet50")
    ap.add_argument("--steps", type=int, default=None, help="override the fitting steps")
    ap.add_argument("--threads", type=int, default=None, help="convert --threads (default: the CLI's)")
    ap.add_argument("--keep", type=Path, default=None, help="keep the .pth and the .dyn files in this folder")
    ap.add_argument("--no-load", action="store_true", help="skip the run beside a busy-loop process")
    args = ap.parse_args()
    extra, target, under_load = MODELS[args.model]
    if os.environ.get("OMP_NUM_THREADS") and args.threads is None:
        print(f"note: OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} sets convert's default --threads; "
              "unset it to time the default of one worker per core", flush=True)
    work = args.keep or Path(tempfile.mkdtemp(prefix="dynconvert-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    ckpt = work / f"{args.model}.pth"
    torch.manual_seed(0)
    torch.save(getattr(torchvision.models, args.model)().state_dict(), ckpt)

    idle = timed_convert(ckpt, work / f"{args.model}.dyn", extra, args)
    print(f"as the machine is: {idle['seconds']:.0f} s (load average before {idle['loadavg_before']}), "
          f"peak memory {idle['peak_tree_mb']} MB for the process tree", flush=True)
    loaded = None
    if under_load and not args.no_load:
        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            loaded = timed_convert(ckpt, work / f"{args.model}_load.dyn", extra, args)
        finally:
            busy.kill()
            busy.wait()
        print(f"beside one busy-loop process: {loaded['seconds']:.0f} s", flush=True)

    from dynconvert.dynfile.format import read_dyn

    _, meta = read_dyn(work / f"{args.model}.dyn")
    layers = meta["layers"].values()
    result = dict(
        model=args.model, idle=idle, under_load=loaded, cpu_count=os.cpu_count(), converted_layers=len(meta["layers"]),
        max_layer_ratio=round(max(v["state_params"] / v["dense_params"] for v in layers), 4),
        mean_rel_error=round(sum(v["rel_error"] for v in layers) / len(layers), 4),
        mean_svd_rel_error=round(sum(v["svd_rel_error"] for v in layers) / len(layers), 4),
        steps=meta["options"]["steps"],
    )
    if loaded:
        result["load_ratio"] = round(loaded["seconds"] / idle["seconds"], 2)
        result["same_bytes"] = (work / f"{args.model}.dyn").read_bytes() == (work / f"{args.model}_load.dyn").read_bytes()
    print(json.dumps(result))
    line = f"{args.model}: {idle['seconds']:.0f} s (target <= {target} s on idle cores), {len(meta['layers'])} layers"
    if loaded:
        line += f"; {loaded['seconds']:.0f} s beside a busy loop = {result['load_ratio']:.2f}x (target <= 2x)"
    print(line)


if __name__ == "__main__":
    main()
