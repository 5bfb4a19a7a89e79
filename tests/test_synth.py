"""Data-free calibration inputs from BatchNorm statistics (dynconvert.budget.synth)."""

import pytest
import torch
import torch.nn as nn

from dynconvert.errors import DynError
from dynconvert.budget.synth import bn_loss_of, bn_synthetic_batches



def tiny_bn_net(seed: int = 0) -> nn.Module:
    """Conv-BN-ReLU x2, global pooling, Linear, random init; the BN running statistics are set to
    known values: those of a hidden "data" distribution (per-channel shifted, scaled, smoothed
    noise), so that matching them is possible and N(0, 1) inputs do not."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8, momentum=None), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, stride=2, bias=False), nn.BatchNorm2d(8, momentum=None), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )
    g = torch.Generator().manual_seed(seed + 1)
    shift = torch.tensor([1.0, -0.5, 0.3]).view(1, 3, 1, 1)
    scale = torch.tensor([0.5, 2.0, 1.0]).view(1, 3, 1, 1)
    data = nn.functional.avg_pool2d(torch.randn(64, 3, 18, 18, generator=g), 3, 1) * 3 * scale + shift
    model.train()
    with torch.no_grad():
        model(data)            # momentum=None: running stats = this batch's statistics
    return model.eval()


def test_reduces_bn_loss_against_gaussian_start():
    model = tiny_bn_net()
    start = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    (batch,) = bn_synthetic_batches(model, images=8, input_size=(3, 16, 16), batch_size=8, steps=100)
    before, after = bn_loss_of(model, start), bn_loss_of(model, batch)
    assert after < 0.1 * before, (before, after)
    # the statistics themselves: each BN's input mean/std near its running values
    seen = {}
    hooks = [bn.register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(i, a[0])) for i, bn in
             enumerate((model[1], model[4]))]
    with torch.no_grad():
        model(batch)
    for h in hooks:
        h.remove()
    for i, bn in enumerate((model[1], model[4])):
        x = seen[i]
        std = bn.running_var.sqrt()
        assert ((x.mean((0, 2, 3)) - bn.running_mean).abs() / std).max() < 0.25
        assert (x.std((0, 2, 3), unbiased=False) / std).log().abs().max() < 0.25


def test_shapes_count_and_progress():
    model = tiny_bn_net()
    calls = []
    batches = bn_synthetic_batches(model, images=10, input_size=(3, 12, 14), batch_size=4, steps=3,
                                   on_step=lambda s, t, loss: calls.append((s, t, loss)))
    assert [tuple(b.shape) for b in batches] == [(4, 3, 12, 14), (4, 3, 12, 14), (2, 3, 12, 14)]
    assert all(b.dtype == torch.float32 and not b.requires_grad and torch.isfinite(b).all() for b in batches)
    assert [c[:2] for c in calls] == [(s, 9) for s in range(1, 10)]
    assert all(isinstance(c[2], float) for c in calls)


def test_deterministic_for_a_seed():
    model = tiny_bn_net()
    kw = dict(images=6, input_size=(3, 12, 12), batch_size=3, steps=5)
    a = bn_synthetic_batches(model, seed=3, **kw)
    b = bn_synthetic_batches(model, seed=3, **kw)
    c = bn_synthetic_batches(model, seed=4, **kw)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])


def test_model_left_unchanged():
    model = tiny_bn_net()
    model.train()                       # a training-mode model comes back in training mode
    model[0].weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    bn_synthetic_batches(model, images=4, input_size=(3, 12, 12), batch_size=4, steps=5)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)   # running stats not updated either
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    assert all(m.training for m in model.modules())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_hooks_removed_on_error():
    model = tiny_bn_net()

    def boom(step, total, loss):
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError):
        bn_synthetic_batches(model, images=2, input_size=(3, 12, 12), batch_size=2, steps=5, on_step=boom)
    assert all(not m._forward_hooks for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    assert not model.training


def test_no_batchnorm_is_a_clear_error():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 10 * 10, 2))
    with pytest.raises(DynError, match="no BatchNorm layers.*--calib"):
        bn_synthetic_batches(model, images=2, input_size=(3, 12, 12), steps=1)


def test_bad_arguments_are_clear_errors():
    model = tiny_bn_net()
    with pytest.raises(DynError, match="images >= 1"):
        bn_synthetic_batches(model, images=0, input_size=(3, 12, 12))
    with pytest.raises(DynError, match="input_size"):
        bn_synthetic_batches(model, images=1, input_size=(12, 12))
