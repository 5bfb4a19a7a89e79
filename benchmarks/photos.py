"""Real photographs that ship offline, split by photo, and random crops of them.

The photos bundled with scikit-image and scikit-learn's two sample images. They are split BY PHOTO
into a calibration set and an evaluation set (a fixed, explicit assignment: no photo in both; the
stereo pair of the motorcycle counts as one photo). Crops are random-resized-crop style (area scale
0.08-1, aspect 3/4-4/3, horizontal flip with p=0.5), resized to a square and normalized with the
ImageNet mean/std; the same seed gives the same crops.

    from benchmarks.photos import photo_crops
    calib = photo_crops("calib", 256, size=260, seed=0)   # 256 x 3 x 260 x 260
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _skimage(name: str):
    def load():
        from skimage import data

        return getattr(data, name)()

    return load


def _motorcycle(side: int):
    def load():
        from skimage import data

        return data.stereo_motorcycle()[side]

    return load


def _sklearn(name: str):
    def load():
        from sklearn.datasets import load_sample_image

        return load_sample_image(name)

    return load


# Each split: name -> loader. Grayscale photographs are converted to RGB by channel replication.
# Left out: skimage's `cat` (the same file as `chelsea`), textures (brick, grass, gravel), text
# (page, text), synthetic images (color, logo, phantom, chessboard) and the motion-blurred clock.
SPLITS = {
    "calib": {
        "astronaut": _skimage("astronaut"),
        "coffee": _skimage("coffee"),
        "motorcycle_left": _motorcycle(0),   # the stereo pair: both views stay on this side
        "motorcycle_right": _motorcycle(1),
        "immunohistochemistry": _skimage("immunohistochemistry"),
        "china": _sklearn("china.jpg"),
        "camera": _skimage("camera"),
    },
    "eval": {
        "chelsea": _skimage("chelsea"),
        "rocket": _skimage("rocket"),
        "hubble_deep_field": _skimage("hubble_deep_field"),
        "retina": _skimage("retina"),
        "flower": _sklearn("flower.jpg"),
        "coins": _skimage("coins"),
        "moon": _skimage("moon"),
    },
}
assert not set(SPLITS["calib"]) & set(SPLITS["eval"]), "a photo in both splits"


def load_photos(split: str) -> dict[str, torch.Tensor]:
    """name -> float tensor 3 x H x W in [0, 1]."""
    out = {}
    for name, load in SPLITS[split].items():
        img = np.asarray(load())
        if img.ndim == 2:
            img = np.repeat(img[:, :, None], 3, axis=2)
        img = img[:, :, :3]
        out[name] = torch.from_numpy(np.array(img, copy=True)).permute(2, 0, 1).float() / 255.0
    return out


def random_resized_box(h: int, w: int, rng: np.random.Generator, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """(top, left, height, width) as torchvision's RandomResizedCrop draws it (fallback: central crop)."""
    area = h * w
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        cw = int(round(math.sqrt(target * aspect)))
        ch = int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw
    side = min(h, w)
    return (h - side) // 2, (w - side) // 2, side, side


def photo_crops(split: str, n: int, *, size: int, seed: int = 0, scale=(0.08, 1.0)) -> torch.Tensor:
    """n normalized crops (n x 3 x size x size), spread evenly over the split's photos (crop i from photo i mod P)."""
    photos = list(load_photos(split).values())
    rng = np.random.default_rng(seed)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    out = torch.empty(n, 3, size, size)
    for i in range(n):
        img = photos[i % len(photos)]
        top, left, ch, cw = random_resized_box(img.shape[1], img.shape[2], rng, scale)
        crop = img[:, top : top + ch, left : left + cw].unsqueeze(0)
        crop = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]
        if rng.random() < 0.5:
            crop = crop.flip(-1)
        out[i] = (crop.clamp(0, 1) - mean) / std
    return out


def photo_names(split: str) -> list[str]:
    return list(SPLITS[split])
