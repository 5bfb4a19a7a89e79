"""Whole-model conversion time and memory, on idle cores and under load (issues 11 and 13).

Saves a torchvision state dict (random init: nothing can be downloaded here) and times
`dynconvert convert MODEL.pth --out MODEL.dyn` end to end in a subprocess, exactly as a user runs
it: ResNet-50 at the resnet50 recipe, ViT-B/16 at default settings. Once as the machine is, then
(ResNet-50) again while one CPU-bound busy-loop process (started here) holds a core. Prints the
times, their ratio, the load average around each run (other users of the machine count too), the
peak memory (the largest single process, and the whole process tree: the converting process plus
its fitting workers, sampled every 0.2 s), and checks both files are the same bytes.

    python -m benchmarks.convert_time [--model resnet50|vit_b_16|vit_l_16|vit_h_14] [--steps N] [--threads N]
                                      [--keep DIR] [--no-load] [--size 1/4 --calib-photos 64]

``--size F --calib-photos N``: the budgeted route at the model's real resolution (issue 20 item 3),
``convert --size F --calib DIR`` on N random crops of the bundled photos (benchmarks/photos.py)
written as PNG files. The ViTs' heads are drawn from N(0, 0.02) (torchvision leaves them zero,
which makes every output the same).

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
    "vit_l_16": ([], 720, False),
    "vit_h_14": ([], None, False),
}


def fresh_model(name: str) -> torch.nn.Module:
    """A random-init torchvision model; a ViT's head N(0, 0.02) instead of torchvision's zeros."""
    model = getattr(torchvision.models, name)()
    if name.startswith("vit_"):
        torch.nn.init.normal_(model.heads.head.weight, std=0.02)
    return model


def write_photo_crops(folder: Path, n: int, size: int) -> None:
    """``n`` random crops of the calibration photos as PNG files (what `--calib DIR` reads)."""
    from PIL import Image

    from benchmarks.photos import IMAGENET_MEAN, IMAGENET_STD, photo_crops

    folder.mkdir(parents=True, exist_ok=True)
    crops = photo_crops("calib", n, size=size, seed=0)
    crops = crops * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    for i, c in enumerate(crops):
        pixels = (c.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        Image.fromarray(pixels).save(folder / f"crop{i:04d}.png")


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
    ap.add_argument("--size", default=None, help="convert --size FRACTION (the budgeted route) instead of the default")
    ap.add_argument("--calib-photos", type=int, default=0, help="with --size: N photo crops at the model's resolution as --calib")
    args = ap.parse_args()
    if args.calib_photos and not args.size:
        ap.error("--calib-photos goes with --size (the default convert calibrates on no images)")
    extra, target, under_load = MODELS[args.model]
    if args.size:
        extra, target, under_load = ["--size", args.size], (1800 if args.model == "vit_b_16" else None), False
    if os.environ.get("OMP_NUM_THREADS") and args.threads is None:
        print(f"note: OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} sets convert's default --threads; "
              "unset it to time the default of one worker per core", flush=True)
    work = args.keep or Path(tempfile.mkdtemp(prefix="dynconvert-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    ckpt = work / f"{args.model}.pth"
    torch.manual_seed(0)
    torch.save(fresh_model(args.model).state_dict(), ckpt)
    if args.size and args.calib_photos:
        write_photo_crops(work / "calib", args.calib_photos, 224)  # every model here takes 224 x 224
        extra += ["--calib", str(work / "calib"), "--calib-images", str(args.calib_photos)]

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
    layers = list(meta["layers"].values())  # the layers that became states (a budget may choose none)
    result = dict(
        model=args.model, args=extra, idle=idle, under_load=loaded, cpu_count=os.cpu_count(), fp32_bytes=ckpt.stat().st_size,
        dyn_bytes=(work / f"{args.model}.dyn").stat().st_size, converted_layers=len(layers),
        steps=meta["options"].get("steps"),
    )
    result["peak_tree_x_fp32"] = round(idle["peak_tree_mb"] * 1e6 / result["fp32_bytes"], 2)
    if layers:
        result.update(max_layer_ratio=round(max(v["state_params"] / v["dense_params"] for v in layers), 4),
                      mean_rel_error=round(sum(v["rel_error"] for v in layers) / len(layers), 4),
                      mean_svd_rel_error=round(sum(v["svd_rel_error"] for v in layers) / len(layers), 4))
    if loaded:
        result["load_ratio"] = round(loaded["seconds"] / idle["seconds"], 2)
        result["same_bytes"] = (work / f"{args.model}.dyn").read_bytes() == (work / f"{args.model}_load.dyn").read_bytes()
    print(json.dumps(result))
    line = (f"{args.model} {' '.join(extra[:2]) or 'default'}: {idle['seconds']:.0f} s"
            + (f" (target <= {target} s on idle cores)" if target else "")
            + f", peak {idle['peak_tree_mb']} MB = {result['peak_tree_x_fp32']}x the fp32 bytes, {len(layers)} state layers")
    if loaded:
        line += f"; {loaded['seconds']:.0f} s beside a busy loop = {result['load_ratio']:.2f}x (target <= 2x)"
    print(line)


if __name__ == "__main__":
    main()
