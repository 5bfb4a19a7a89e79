"""Calibration images that generalize: a held-apart slice, and augmented copies of the rest.

A reconstruction or a distillation fitted to a few hundred crops of a handful of photos learns
those crops. Two defences, both on tensors already preprocessed the network's way (N, C, H, W):

- ``held_apart``: a slice of the images the fit never sees, to measure on (every k-th image, so
  that consecutive crops of one photo do not all land on one side);
- ``augment``: new images drawn from the given ones: random resized crops (a fraction of the
  area, aspect 3/4..4/3, resized back to H x W), horizontal flips, brightness/contrast jitter
  (per image, applied in the normalized space: a scale and a per-channel shift), and pasting a
  rectangle of another image (CutMix), so that no two images carry the same content.

BatchNorm-synthesized images joining the photos did not help distillation on other photos
(docs/budget.md, Distillation), so nothing here mixes them in.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import DynError

HELD_FRACTION = 1 / 8
"""The share of calibration images held apart (at most ``HELD_MOST``)."""
HELD_MOST = 32
HELD_LEAST_FIT = 16
"""No slice is held apart when fewer than this many images would be left to fit on."""


def held_apart(images: torch.Tensor, fraction: float = HELD_FRACTION) -> tuple[torch.Tensor, torch.Tensor]:
    """(fitting images, held-apart images); the second is empty when there are too few images."""
    n = len(images)
    k = min(HELD_MOST, int(n * fraction))
    if k < 2 or n - k < HELD_LEAST_FIT:
        return images, images[:0]
    step = n / k
    held = torch.zeros(n, dtype=torch.bool)
    held[[min(n - 1, int((i + 1) * step) - 1) for i in range(k)]] = True
    return images[~held], images[held]


def _uniform(gen: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=gen))


def _index(gen: torch.Generator, n: int) -> int:
    return int(torch.randint(n, (1,), generator=gen))


def augment(images: torch.Tensor, count: int, *, seed: int = 0, gen: torch.Generator | None = None,
            scale: tuple[float, float] = (0.25, 1.0), flip: float = 0.5, jitter: float = 0.2,
            mix: float = 0.25) -> torch.Tensor:
    """``count`` new images drawn from ``images`` (N, C, H, W); deterministic for a seed (or
    drawn from ``gen``). ``scale``: the crop's share of the area; ``jitter``: brightness/contrast
    and per-channel shift amplitude; ``mix``: the chance of pasting a quarter of another image."""
    if images.ndim != 4 or len(images) == 0:
        raise DynError("augmentation needs a batch of images (N, C, H, W) with at least one image")
    gen = gen or torch.Generator().manual_seed(seed)
    n, c, h, w = images.shape
    out = torch.empty(count, c, h, w, dtype=images.dtype)
    for i in range(count):
        area = _uniform(gen, *scale) * h * w
        aspect = math.exp(_uniform(gen, math.log(3 / 4), math.log(4 / 3)))
        ch = max(1, min(h, round(math.sqrt(area / aspect))))
        cw = max(1, min(w, round(math.sqrt(area * aspect))))
        top, left = _index(gen, h - ch + 1), _index(gen, w - cw + 1)
        x = images[_index(gen, n), :, top:top + ch, left:left + cw].unsqueeze(0).float()
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)[0]
        if _uniform(gen, 0, 1) < flip:
            x = x.flip(-1)
        if jitter:
            x = x * (1 + _uniform(gen, -jitter, jitter)) + jitter * (2 * torch.rand(c, 1, 1, generator=gen) - 1)
        if mix and _uniform(gen, 0, 1) < mix:
            ph, pw = max(1, h // 2), max(1, w // 2)
            t2, l2 = _index(gen, h - ph + 1), _index(gen, w - pw + 1)
            x[:, t2:t2 + ph, l2:l2 + pw] = images[_index(gen, n), :, t2:t2 + ph, l2:l2 + pw]
        out[i] = x.to(images.dtype)
    return out


FEW_IMAGES = 16
"""Below this many calibration images a budgeted conversion adds augmented crops of them."""


def few_images_fallback(batches: list[torch.Tensor], on_note=None) -> list[torch.Tensor]:
    """A stated fallback for image batches holding fewer than FEW_IMAGES images: augmented crops
    of the images there are are added (a transformer's token inputs are left as they are)."""
    count = sum(len(b) for b in batches)
    if count >= FEW_IMAGES or batches[0].ndim != 4:
        return batches
    extra = augment(torch.cat(batches), 2 * FEW_IMAGES - count, seed=0)
    if on_note:
        on_note(f"only {count} calibration image{'s' if count > 1 else ''}: adding {len(extra)} augmented crops of "
                "them (random resized crops, flips, colour jitter); what is held apart to check the fit comes "
                f"from the same image{'s' if count > 1 else ''}: pass {FEW_IMAGES}+ images for a real check")
    return batches + [extra.to(batches[0].dtype)]
