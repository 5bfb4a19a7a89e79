"""How much of the candidate measurement (pipeline.measure) a network can afford.

Measuring a candidate runs the network from its layer's block on (suffix.py). For EfficientNet-Lite2,
ResNet-50 or ViT-B/16 every candidate near the hull is measured that way, on 16 images. ViT-L/16 is
61.6 GMAC per 224 x 224 image, and its 97 units with 8 weight-space candidates each would take
about an hour on two cores. Above ``MEASURE_MACS`` of measurement compute, ``plan`` switches to the
*predicted* measurement: per unit only the int4 candidate (and any states candidate) runs in the
network; it gives the unit's sensitivity (network error per unit of layer output error), and the
other grids' network errors are that sensitivity times their layer output errors. The images it
runs on are cut to what ``PREDICTED_MACS`` pays for (at least ``MIN_IMAGES``: a ViT image is ~200
tokens), and the input moments are then collected on those same images a few layers at a time
(``ChunkedMoments``): all of ViT-L/16's at once take 1.6 GB, more than its weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..dynamics.calibration import Moments, collect_moments
from ..io.allocator import release_freed

MEASURE_MACS = 1e14
"""Multiply-accumulates of a full measurement above which it is predicted. ViT-B/16 at 224 with 64
photos at --size 1/4 is 7e13 (measured in full, 27 min on 2 cores); ViT-L/16 with no images, 4e14."""
PREDICTED_MACS = 1.2e13
"""What the predicted measurement's network passes may cost (ViT-L/16: 4 images; its whole measurement
took 303 s on 2 idle cores)."""
MIN_IMAGES = 2
MOMENT_BYTES = 64 * 2**20
"""Float32 input moments collected at once by ``ChunkedMoments`` (ViT-L/16: one encoder block's, 76 MB, is
two chunks); one batch of images, so nothing is summed in float64 (``collect_moments(wide=False)``)."""
SUFFIX_SHARE = 0.5
"""The average part of the network a measurement runs (from the layer's block on)."""


@dataclass
class Plan:
    images: int  # images each network measurement runs on
    predicted: bool  # only int4 (and states) measured in the network, the other grids predicted
    macs: int  # multiply-accumulates of one forward pass of one image

    def entry(self) -> dict:
        return dict(images=self.images, predicted=self.predicted, gmacs_per_image=round(self.macs / 1e9, 2))


def plan(macs: int, units: int, images: int, candidates: int) -> Plan:
    """The measurement of a network of ``macs`` per image and ``units`` units offering ``candidates``
    candidates in all (fp32 aside), ``images`` measurement images wanted."""
    if candidates * images * macs * SUFFIX_SHARE <= MEASURE_MACS:
        return Plan(images, False, macs)
    fit = int(PREDICTED_MACS / max(units * macs * SUFFIX_SHARE, 1))
    return Plan(max(MIN_IMAGES, min(images, fit)), True, macs)


class ChunkedMoments:
    """``moments[name]`` for the layers of ``units`` (pipeline.Unit, in execution order), collected on
    the measurement images a chunk of units at a time when first asked for, the chunk before dropped.
    Each chunk's forward pass starts at its first block from the outputs ``suffix`` recorded on the
    same images, and stops after its last layer: about one pass over the images in all."""

    def __init__(self, model: nn.Module, units: list, images: torch.Tensor, suffix, cap: int = MOMENT_BYTES):
        self.model, self.units, self.images, self.suffix, self.cap = model, units, images, suffix, cap
        self.where = {p.name: i for i, u in enumerate(units) for p in u.parts}
        self.held: dict[str, Moments] = {}

    def __getitem__(self, name: str) -> Moments:
        if name not in self.held:
            self._collect(self.where[name])
        return self.held[name]

    def _collect(self, first: int) -> None:
        chunk, size = [], 0
        for u in self.units[first:]:
            bytes_u = 4 * sum(n * n for n in {p.n for p in u.parts})  # q, k and v share one input
            if chunk and size + bytes_u > self.cap:
                break
            chunk.append(u)
            size += bytes_u
        names = [p.name for u in chunk for p in u.parts]
        self.held = {}  # the chunk before is not needed again: units are measured in execution order
        release_freed()
        with self.suffix.from_layer([p.name for p in chunk[0].parts]):
            self.held = collect_moments(names, [self.images], self.model, stop_after=names[-1], wide=False)
