"""Network-level truth: top-1 agreement of a converted network with its original on probe inputs.

Per-layer errors do not say whether a network still predicts what the original did (a real
EfficientNet-Lite2 at ratio 0.25 keeps "close to SVD" layer errors and answers one class for every
photo), so every conversion ends with this check (issue 22) and ``--keep`` searches with it.
Probe inputs, best first: calibration images held apart from the fitting ones; calibration images
the fit saw; inputs synthesized from the model's BatchNorm statistics (synth.py); standard-normal
inputs. The kind is recorded with the figure, since agreement on synthetic inputs is only an
estimate of agreement on real images (docs/budget.md has the measured relation).
Cost: one forward pass of the probe through each network, plus the synthesis when there are no
images (``PROBE_STEPS`` steps, a fraction of a fitting set's).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..errors import DynError
from .synth import bn_synthetic_batches, has_batchnorm, synthesis_size

PROBE_IMAGES = 32
"""Synthesized probe inputs (a held-apart image probe takes what the calibration set can spare)."""
PROBE_STEPS = 200
"""Synthesis steps of a probe set (a fitting set takes 500, synth.py), for a network of up to
``REFERENCE_MACS``; fewer for a larger one (``affordable_steps``)."""
REFERENCE_MACS = 50e6
"""Multiply-accumulates per image at which synthesis takes its full steps: EfficientNet-Lite2 at
64 x 64 (48M). ResNet-50 there is 336M: 7x the steps' cost, so it takes 1/7 of the steps."""
PROBE_SEED = 1
"""Not the fitting set's seed (0): a probe is never the inputs the fit saw."""
LOW = 0.5
"""Below this agreement the conversion prints a warning: the network's predictions are lost."""
BATCH, BATCH_MACS = 32, 5e11
"""Probe images per forward pass: ``BATCH``, fewer where a pass of that many would cost over
``BATCH_MACS`` multiply-accumulates (ViT-L/16: 8 a pass; 32 held 0.73 GB of activations)."""

HELD_APART = "calibration images held apart from the fit"
SEEN = "calibration images (also used by the fit)"
SYNTHETIC = "synthetic (BatchNorm statistics)"
NORMAL = "standard-normal (no images, no BatchNorm to synthesize from)"


@dataclass
class Probe:
    inputs: torch.Tensor
    kind: str
    reference: torch.Tensor | None = None  # the original's top-1 on ``inputs``
    batch: int = BATCH

    def start(self, original: nn.Module) -> "Probe":
        """Record the original's answers (before it is converted in place); a one-line error when
        the network does not run on the probe inputs."""
        try:
            self.batch = max(1, min(BATCH, int(BATCH_MACS // max(forward_macs(original, self.inputs.shape[1:]), 1))))
            self.reference = top1(original, self.inputs, self.batch)
        except Exception as e:  # a shape mismatch deep in a user's forward: say what to change
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            shape = "x".join(str(n) for n in self.inputs.shape[1:])
            raise DynError(f"the model does not run on inputs of size {shape} ({first}); "
                           "pass the input size it takes with --input-size C,H,W") from None
        return self

    def agreement(self, model: nn.Module) -> float:
        return float((top1(model, self.inputs, self.batch) == self.reference).float().mean())

    def entry(self, agreement: float) -> dict:
        """What the .dyn metadata and ``report --json`` carry as ``network``."""
        return {"agreement": round(agreement, 4), "images": len(self.inputs), "inputs": self.kind}


@torch.no_grad()
def top1(model: nn.Module, x: torch.Tensor, batch: int = BATCH) -> torch.Tensor:
    """The argmax over dim 1 of every output (per position for dense outputs), in batches."""
    was = model.training
    model.eval()
    try:
        out = []
        for i in range(0, len(x), batch):
            y = model(x[i:i + batch])
            y = y[0] if isinstance(y, (tuple, list)) else y
            out.append(y.reshape(y.shape[0], y.shape[1], -1).argmax(1) if y.dim() > 1 else y.reshape(-1, 1))
        return torch.cat(out)
    finally:
        model.train(was)


def image_probe(batches, kind: str, limit: int = 64) -> Probe:
    x = torch.cat([b[0] if isinstance(b, (tuple, list)) else b for b in batches])
    return Probe(x[:limit], kind)


@torch.no_grad()
def forward_macs(model: nn.Module, input_size) -> int:
    """Multiply-accumulates of the Conv2d/Linear layers for one input (one forward pass)."""
    total = [0]

    def count(m, args, out):
        if isinstance(m, nn.MultiheadAttention):  # its projections are not called as modules: q, k, v and out
            total[0] += out[0].numel() * 4 * m.embed_dim
            return
        per = m.in_features if isinstance(m, nn.Linear) else m.in_channels // m.groups * math.prod(m.kernel_size)
        total[0] += out.numel() * per

    hooks = [m.register_forward_hook(count) for m in model.modules()
             if isinstance(m, (nn.Conv2d, nn.Linear, nn.MultiheadAttention))]
    was = model.training
    try:
        model.eval()(torch.zeros(1, *input_size))
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    return total[0]


def affordable_steps(steps: int, model: nn.Module, input_size) -> int:
    """``steps`` for a network up to ``REFERENCE_MACS`` per input, proportionally fewer above it
    (never below a tenth): synthesis costs images x steps x 3 forward passes, and a conversion
    of a large network must not spend many minutes on it."""
    macs = max(forward_macs(model, input_size), 1)
    return max(steps // 10, min(steps, round(steps * REFERENCE_MACS / macs)))


def synthetic_probe(model: nn.Module, input_size, *, images: int | None = None, steps: int | None = None,
                    on_progress=None) -> Probe:
    """Inputs synthesized from ``model``'s BatchNorm statistics, else standard-normal ones."""
    images = images or PROBE_IMAGES
    if has_batchnorm(model):
        size = synthesis_size(model, input_size)
        steps = steps or affordable_steps(PROBE_STEPS, model, size)
        step = (lambda s, n, loss: on_progress("synthesizing probe inputs", s, n)) if on_progress else None
        x = torch.cat(bn_synthetic_batches(model, images=images, input_size=size, steps=steps, seed=PROBE_SEED,
                                           on_step=step))
        return Probe(x, SYNTHETIC)
    gen = torch.Generator().manual_seed(PROBE_SEED)
    return Probe(torch.randn((images, *input_size), generator=gen), NORMAL)


def warning(entry: dict) -> str | None:
    """One line for an agreement below ``LOW``, naming what measured best on real networks."""
    if entry["agreement"] >= LOW:
        return None
    return (f"warning: the converted network agrees with the original on only {entry['agreement']:.0%} of the "
            f"{entry['images']} probe inputs: its predictions are largely lost. What kept real pretrained networks "
            "(docs/budget.md): the default `convert` (--keep, no mode flag), or --size 1/4 with --calib DIR; "
            "states at a fixed --ratio need `finetune` on your data afterwards")

def network_agreement(original: nn.Module, converted: nn.Module, calib, input_size, on_progress, on_note) -> dict | None:
    """Top-1 agreement of ``converted`` with ``original`` on probe inputs: ``calib`` (images the fit also
    saw) when given, else synthesized ones; None (and a note) when the original cannot run them."""
    checking = image_probe(calib, SEEN) if calib else synthetic_probe(original, input_size, on_progress=on_progress)
    try:
        checking.start(original)
    except DynError as e:  # the states route needs no forward pass: the file is fine, the check is not possible
        if on_note:
            on_note(f"network agreement not measured: {e}")
        return None
    return checking.entry(checking.agreement(converted))
