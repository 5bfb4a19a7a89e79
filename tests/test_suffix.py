"""Candidate measurement runs the network from the changed layer's block on (budget/suffix.py):
the same errors as full passes, with the blocks upstream not computed."""

from contextlib import nullcontext

import torch
import torch.nn as nn
import torchvision

from dynconvert.budget import pipeline
from dynconvert.budget.suffix import Suffix


def small_resnet() -> nn.Module:
    """Residual blocks in an nn.Sequential, as torchvision's ResNets have them (narrower: GPTQ of
    a 4608-wide layer is slow for a test)."""
    from torchvision.models.resnet import BasicBlock

    torch.manual_seed(0)
    down = nn.Sequential(nn.Conv2d(16, 32, 1, stride=2, bias=False), nn.BatchNorm2d(32))
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                         BasicBlock(16, 16), BasicBlock(16, 16), BasicBlock(16, 32, stride=2, downsample=down),
                         BasicBlock(32, 32), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()


def small_vit() -> nn.Module:
    torch.manual_seed(0)
    vit = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32,
                                               mlp_dim=64, num_classes=10).eval()
    nn.init.normal_(vit.heads.head.weight, std=0.02)
    return vit


def measured(model: nn.Module, images: torch.Tensor, full: bool, monkeypatch) -> dict:
    if full:
        monkeypatch.setattr(Suffix, "from_layer", lambda self, layers: nullcontext())
    setup = pipeline.prepare(model, min_params=500)
    table = pipeline.measure(setup, list(images.split(16)), calibration="images")
    monkeypatch.undo()
    return {u: [(c.label, e) for c, e in opts] for u, opts in table.options.items()}


def test_measured_errors_are_those_of_full_passes(monkeypatch):
    """Every candidate's network error, bit for bit, on a CNN with residual blocks and a ViT
    (a transformer's q/k/v unit included)."""
    for build, size in ((small_resnet, 32), (small_vit, 32)):
        images = torch.randn(64, 3, size, size, generator=torch.Generator().manual_seed(1))
        fast, slow = measured(build(), images, False, monkeypatch), measured(build(), images, True, monkeypatch)
        assert fast.keys() == slow.keys() and len(fast) > 5
        assert fast == slow, build.__name__


def test_blocks_before_the_layer_are_not_computed():
    model = small_resnet()
    images = torch.randn(4, 3, 32, 32)
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    suffix = Suffix(model, names, images)
    assert suffix.order == ["0", "3", "4", "5", "6", "9"]  # the stem conv, four blocks, the classifier
    calls = []
    hooks = [model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: calls.append(n))
             for n in ("3.conv1", "5.conv1", "6.conv1", "9")]
    with torch.no_grad(), suffix.from_layer(["6.conv2"]):
        out = model(images)
    assert calls == ["6.conv1", "9"]  # the blocks before 6 answered from the record
    assert torch.equal(out, suffix.reference)
    calls.clear()
    with torch.no_grad():
        model(images)  # stubs removed afterwards
    assert calls == ["3.conv1", "5.conv1", "6.conv1", "9"]
    for h in hooks:
        h.remove()
