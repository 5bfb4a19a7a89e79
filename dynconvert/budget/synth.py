"""Data-free calibration inputs synthesized from the network's own BatchNorm statistics.

ZeroQ (Cai et al., CVPR 2020) and Sony MCT's data generation: every BatchNorm2d layer remembers
the per-channel mean and variance of its input over the training set (``running_mean`` /
``running_var``). Starting from Gaussian noise, optimize the *pixels* of a batch with Adam so that
the batch's per-channel statistics at every BatchNorm input match those running statistics. The
result is a set of inputs that drive every layer roughly the way real training data did, so a
conversion with no images at all can still fit layer outputs (``convert(..., calib=batches)``).

Loss (per batch), summed over the BatchNorm layers ``l`` and averaged over their channels ``c``::

    (mean_c - running_mean_c)^2 / (running_var_c + eps)  +  (log std_c - log sqrt(running_var_c))^2

i.e. the mean error in units of the running standard deviation plus the log-ratio of standard
deviations. This "relative" form weighs every layer and channel alike whatever its scale, unlike
ZeroQ's absolute ``||mean - running_mean|| + ||std - sqrt(running_var)||`` (``synthesize(...,
relative=False)``), where layers with large activations weigh most; on EfficientNet-Lite2 the two
scored alike, so the scale-free one is the default.
A small total-variation prior (weight ``TV_WEIGHT``) keeps the pixels image-like; the Gaussian
start already has the per-channel mean 0 / std 1 of mean/std-normalized images and the first
BatchNorm keeps the first layer's statistics where the data normalization put them.

Defaults and cost, measured on EfficientNet-Lite2 with one CPU thread (``python -m
benchmarks.data_free``): one Adam step (forward plus backward) costs about 0.011 s per 64x64
image, 0.05 s per 128x128 and 0.11 s per 260x260, so a run costs about
``images * steps * (that)``. The loss keeps falling well past 100 steps and what the images are
worth follows it: 32 images at 64x64 gave whitened-SVD calibration no better than no data after
200 steps (lr 0.1), and clearly better after 500 (lr 0.2; 183 s); 128x128 at 100 steps (231 s)
was no better than 64x64 at 200. Hence ``images=32`` (the moments of per-layer input vectors
need few images: each gives H*W vectors), ``steps=500``, Adam lr 0.2 cosine-decayed. The relative
loss and ZeroQ's absolute one scored alike; a stronger total-variation prior (0.02) did not help.
BatchNorm statistics are per channel, so a fully convolutional network (global average pooling
before its classifier, as EfficientNet and torchvision's ResNets/MobileNets) is best calibrated
with small inputs: pass ``input_size=(3, 64, 64)``; at the default 224x224 a run takes about
eight times as long. A network with a Linear layer on flattened features needs its own size.

    batches = bn_synthetic_batches(model, input_size=(3, 64, 64))   # ~3 min for EfficientNet-Lite2
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..errors import DynError

TV_WEIGHT = 1e-3   # total-variation prior, relative to the BN-statistics loss
LR = 0.2           # Adam step on pixels of a N(0, 1) start; cosine-decayed to LR / 100
EPS = 1e-5


def has_batchnorm(model: nn.Module) -> bool:
    return bool(_bn_layers(model))


@torch.no_grad()
def synthesis_size(model: nn.Module, input_size, small: int = 64) -> tuple[int, int, int]:
    """``small`` x ``small`` when the network runs there and gives outputs of the same shape as at
    ``input_size`` (fully convolutional: BatchNorm statistics are per channel, and small inputs
    are eight times cheaper to synthesize); otherwise ``input_size`` itself."""
    c, h, w = input_size
    if h <= small and w <= small:
        return tuple(input_size)
    was = model.training
    model.eval()
    try:
        full = model(torch.zeros(1, c, h, w)).shape
        reduced = model(torch.zeros(1, c, small, small)).shape
    except Exception:  # a Linear on flattened features rejects other sizes: synthesize at the real one
        return tuple(input_size)
    finally:
        model.train(was)
    return (c, small, small) if full == reduced else tuple(input_size)


def _bn_layers(model: nn.Module) -> list[nn.BatchNorm2d]:
    return [m for m in model.modules()
            if isinstance(m, nn.BatchNorm2d) and m.running_mean is not None and m.running_var is not None]


def bn_stat_loss(stats, bns, *, relative: bool = True) -> torch.Tensor:
    """The BN-statistics loss for one batch: ``stats`` holds (mean, var) of each BN's input, in the
    order of ``bns``."""
    total = 0.0
    for (mean, var), bn in zip(stats, bns):
        rm = bn.running_mean.detach().to(mean.dtype)
        rv = bn.running_var.detach().to(mean.dtype).clamp_min(0)
        if relative:
            term = ((mean - rm) ** 2 / (rv + EPS)).mean() + (0.5 * torch.log((var + EPS) / (rv + EPS))).pow(2).mean()
        else:
            term = torch.linalg.vector_norm(mean - rm) + torch.linalg.vector_norm((var + EPS).sqrt() - (rv + EPS).sqrt())
        total = total + term
    return total


def _tv(x: torch.Tensor) -> torch.Tensor:
    return (x[..., 1:, :] - x[..., :-1, :]).pow(2).mean() + (x[..., :, 1:] - x[..., :, :-1]).pow(2).mean()


class _Recorder:
    """Forward hooks on the BN layers collecting each one's input (mean, var) per channel."""

    def __init__(self, bns):
        self.stats: list = [None] * len(bns)
        self.handles = [bn.register_forward_hook(self._hook(i)) for i, bn in enumerate(bns)]

    def _hook(self, i):
        def fn(module, args, output):
            x = args[0]
            if x.dim() != 4:
                return
            var, mean = torch.var_mean(x, dim=(0, 2, 3), unbiased=False)
            self.stats[i] = (mean, var)
        return fn

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles = []


@torch.no_grad()
def bn_loss_of(model: nn.Module, batch: torch.Tensor, *, relative: bool = True) -> float:
    """The BN-statistics loss of ``batch`` on ``model`` (eval mode; the model is left as it was)."""
    bns = _bn_layers(model)
    if not bns:
        raise DynError(f"{type(model).__name__} has no BatchNorm layers, so there are no statistics to compare against")
    rec = _Recorder(bns)
    was = {m: m.training for m in model.modules()}
    try:
        model.eval()
        model(batch)
        return float(bn_stat_loss([s for s in rec.stats if s is not None],
                                  [b for b, s in zip(bns, rec.stats) if s is not None], relative=relative))
    finally:
        rec.remove()
        for m, t in was.items():
            m.training = t


STEPS = 500
"""Adam steps of a data-free conversion's synthesized calibration inputs (the tests take fewer)."""


def bn_synthetic_batches(model: nn.Module, *, images: int = 32, input_size=(3, 224, 224), batch_size: int = 32,
                         steps: int | None = None, seed: int = 0, on_step=None) -> list[torch.Tensor]:
    """Input batches (float N x C x H x W, ``images`` in all) whose per-channel statistics at every
    BatchNorm2d input match that layer's running mean / variance.

    Each batch starts from N(0, 1) noise (``seed``: the same seed gives the same batches) and takes
    ``steps`` (default ``STEPS``) Adam steps on the loss of the module docstring. ``on_step(step,
    total, loss)`` is called after every step, ``step`` counting 1..total over all batches. The
    model is run in eval mode and is left as it was: training flags, ``requires_grad`` flags and
    parameters restored, no gradients on its parameters, every hook removed (also on error).
    """
    steps = STEPS if steps is None else steps
    return synthesize(model, images=images, input_size=input_size, batch_size=batch_size, steps=steps, seed=seed,
                      on_step=on_step)


def synthesize(model: nn.Module, *, images: int, input_size, batch_size: int, steps: int, seed: int = 0,
               on_step=None, relative: bool = True, tv_weight: float = TV_WEIGHT, lr: float = LR) -> list[torch.Tensor]:
    """``bn_synthetic_batches`` with the loss form, prior weight and step size open (for benchmarks)."""
    bns = _bn_layers(model)
    if not bns:
        raise DynError(f"{type(model).__name__} has no BatchNorm layers, so data-free calibration cannot synthesize "
                       "inputs; pass calibration images (--calib DIR) instead")
    if images < 1 or batch_size < 1 or steps < 0:
        raise DynError(f"data-free calibration needs images >= 1, batch_size >= 1 and steps >= 0 "
                       f"(got {images}, {batch_size}, {steps}); pass positive values")
    size = tuple(int(s) for s in input_size)
    if len(size) != 3 or min(size) < 1:
        raise DynError(f"input_size must be (channels, height, width), got {tuple(input_size)}; pass e.g. (3, 224, 224)")
    try:
        first = next(model.parameters())
        device = first.device
        dtype = first.dtype if first.is_floating_point() else torch.float32
    except StopIteration:
        device, dtype = torch.device("cpu"), torch.float32

    training = {m: m.training for m in model.modules()}
    grad_flags = [(p, p.requires_grad) for p in model.parameters()]
    rec = _Recorder(bns)
    sizes = [min(batch_size, images - i) for i in range(0, images, batch_size)]
    total = len(sizes) * steps
    gen = torch.Generator().manual_seed(seed)
    batches: list[torch.Tensor] = []
    done = 0
    try:
        model.eval()
        for p, _ in grad_flags:
            p.requires_grad_(False)
        for n in sizes:
            x = torch.randn((n, *size), generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)
            x.requires_grad_(True)
            opt = torch.optim.Adam([x], lr=lr)
            for step in range(steps):
                for g in opt.param_groups:   # cosine decay to lr / 100
                    g["lr"] = lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * step / max(steps, 1))))
                rec.stats = [None] * len(bns)
                opt.zero_grad(set_to_none=True)
                model(x)
                live = [(s, b) for s, b in zip(rec.stats, bns) if s is not None]
                if not live:
                    raise DynError(f"no BatchNorm layer of {type(model).__name__} saw a 4-D input of size {size}; "
                                   "pass the input_size the model takes")
                loss = bn_stat_loss([s for s, _ in live], [b for _, b in live], relative=relative)
                if tv_weight:
                    loss = loss + tv_weight * len(live) * _tv(x)
                if not torch.isfinite(loss):
                    raise DynError(f"data-free calibration diverged (loss {loss.item()}) at step {step + 1}; "
                                   "pass fewer steps or check the model's BatchNorm statistics")
                loss.backward()
                opt.step()
                done += 1
                if on_step is not None:
                    on_step(done, total, float(loss.detach()))
            batches.append(x.detach().clone())
            del x, opt
    finally:
        rec.remove()
        rec.stats = []
        for p, flag in grad_flags:
            p.requires_grad_(flag)
            # no gradient may leak onto the model (none is created: requires_grad was off)
        for m, t in training.items():
            m.training = t
    return batches
