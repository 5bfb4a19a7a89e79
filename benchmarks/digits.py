"""The digits pieces the benchmarks share: sklearn's handwritten digits with a fixed held-out split, the
small CNN trained on them, and the small ViT (16x16 RGB inputs) trained on the same split.

Offline and quick: the digits ship with scikit-learn, and both models train in seconds to a minute.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

DIGITS_VIT_WIDTH = 128  # the hidden width of the small ViT that benchmarks.real_model and onnx_latency train


def digits_tensors():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=32, mode="bilinear", align_corners=False)
    y = torch.tensor(d.target)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(y), generator=g)
    test, train = perm[:360], perm[360:]
    return (x[train], y[train]), (x[test], y[test])


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 4 * 4, 128), nn.ReLU(), nn.Linear(128, 10),
    )


def train_cnn(epochs: int, seed: int = 0) -> tuple[nn.Module, float]:
    """Train to convergence (training loss flat); returns the model and its held-out accuracy."""
    torch.manual_seed(seed)
    (xtr, ytr), (xte, yte) = digits_tensors()
    model = small_cnn()
    opt = torch.optim.Adam(model.parameters(), 2e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    for _ in range(epochs):
        perm = torch.randperm(len(ytr))
        for i in range(0, len(ytr), 64):
            idx = perm[i : i + 64]
            loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    model.eval()
    with torch.no_grad():
        acc = (model(xte).argmax(1) == yte).float().mean().item()
    return model, acc


def small_vit(hidden: int = 64) -> torch.nn.Module:
    """The small ViT trained on digits (16x16 RGB inputs, 4x4 patches, 2 blocks)."""
    from torchvision.models import VisionTransformer

    return VisionTransformer(image_size=16, patch_size=4, num_layers=2, num_heads=4, hidden_dim=hidden,
                             mlp_dim=2 * hidden, num_classes=10)


def vit_digits_tensors():
    """The digits split above (same held-out 360), as the ViT's 3 x 16 x 16 inputs."""

    def rgb16(x):
        return torch.nn.functional.interpolate(x, size=16, mode="area").repeat(1, 3, 1, 1)

    (xtr, ytr), (xte, yte) = digits_tensors()
    return (rgb16(xtr), ytr), (rgb16(xte), yte)


def tiny_trained_vit(epochs: int = 30, seed: int = 0, hidden: int = 64):
    """A small ViT trained on the digits' training split; returns it and its held-out accuracy."""
    torch.manual_seed(seed)
    (x, y), (xte, yte) = vit_digits_tensors()
    net = small_vit(hidden)
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    for _ in range(epochs):
        for i in torch.randperm(len(x)).split(64):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x[i]), y[i]).backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        acc = (net(xte).argmax(1) == yte).float().mean().item()
    return net, acc
