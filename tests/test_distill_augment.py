"""Distillation on an augmented stream with a held-apart slice (train/distill.py)."""

import copy

import torch
import torch.nn as nn

from dynconvert.train.distill import distill


def test_augmented_distillation_keeps_the_best_on_held_apart_images():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(48, 3, 8, 8)
    out = distill(student, teacher, [x[:24], x[24:]], seconds=None, steps=30, lr=1e-2, augment=True, check_every=5)
    assert out["steps"] == 30 and out["held_apart"] == 6
    assert out["held_best"] < out["held_first"]
    assert not any(p.requires_grad for p in student.parameters())
    again = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in again.parameters():
            p.add_(0.3 * torch.randn_like(p))
    plain = distill(again, teacher, [x], seconds=None, steps=3)
    assert "held_apart" not in plain


def test_block_output_matching_pulls_the_blocks_toward_the_teachers():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()),
                            nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()),
                            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    noisy = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in noisy.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(32, 3, 8, 8)

    def first_block_error(student):
        with torch.no_grad():
            return float(((student[0](x) - teacher[0](x)) ** 2).mean() / (teacher[0](x) ** 2).mean())

    kl_only, matched = copy.deepcopy(noisy), copy.deepcopy(noisy)
    distill(kl_only, teacher, [x], seconds=None, steps=40, lr=1e-2)
    distill(matched, teacher, [x], seconds=None, steps=40, lr=1e-2, features=1.0)
    assert first_block_error(matched) < 0.5 * first_block_error(noisy)
    assert first_block_error(matched) < first_block_error(kl_only)
    assert not any(m._forward_hooks for net in (teacher, matched) for m in net.modules())  # the taps are gone
