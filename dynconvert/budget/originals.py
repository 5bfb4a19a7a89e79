"""The original's weights, as the budget pipeline reads them back (``Table.trial`` restores and
re-rounds them, the sequential fit fits to them, a ``--keep`` refit starts from them again).

``InMemory``: the untouched original network (a deep copy): what every route with calibration
images needs, since the sequential fit and the block reconstruction run it forward.
``Spilled``: the budgeted weights written once to a temporary file and read back one matrix at a
time. A conversion rounding to nearest (no images: no forward pass of the original is needed) of a
network over ``SPILL_BYTES`` then holds one copy of its weights, not two: ViT-L/16's second copy
is 1.22 GB, beside 0.75 GB for the interpreter, torch and torchvision.
"""

from __future__ import annotations

import copy
import tempfile

import torch
import torch.nn as nn

from ..dynamics.layers import dense_target
from ..dynamics.modules import dense_matrix

SPILL_BYTES = 2**28
"""A network whose state dict is larger than this (256 MB: ViT-B/16 and up) spills its original
weights when nothing runs the original forward."""


class InMemory:
    def __init__(self, original: nn.Module):
        self.network = original

    def matrix(self, name: str) -> torch.Tensor:
        """The (m, n) original weight of the layer (or MHA projection) ``name``."""
        return dense_matrix(dense_target(self.network, name))


class Spilled:
    def __init__(self, model: nn.Module, names: list[str]):
        """Writes the weight of every layer in ``names`` to an unnamed temporary file."""
        self.network = None  # nothing to run forward
        self.file = tempfile.TemporaryFile()
        self.where: dict[str, tuple[int, tuple[int, int]]] = {}
        for name in names:
            w = dense_matrix(dense_target(model, name)).detach().float().contiguous()
            self.where[name] = (self.file.tell(), tuple(w.shape))
            self.file.write(memoryview(w.numpy()).cast("B"))
        self.file.flush()

    def matrix(self, name: str) -> torch.Tensor:
        offset, shape = self.where[name]
        out = torch.empty(shape)
        self.file.seek(offset)
        self.file.readinto(memoryview(out.numpy()).cast("B"))
        return out

    def restore(self, model: nn.Module) -> None:
        """Every spilled weight written back into ``model`` (its layers are still the dense ones)."""
        with torch.no_grad():
            for name in self.where:
                w = dense_target(model, name).weight
                w.copy_(self.matrix(name).reshape(w.shape))


def keep_originals(model: nn.Module, names: list[str], spill: bool):
    """``Spilled`` when ``spill`` and the model is over ``SPILL_BYTES``, else ``InMemory`` of a copy."""
    if spill and sum(t.numel() * t.element_size() for t in model.state_dict().values()) > SPILL_BYTES:
        return Spilled(model, names)
    return InMemory(copy.deepcopy(model).eval())
