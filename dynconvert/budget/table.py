"""What the budget pipeline's steps hand each other (pipeline.py): the ``Setup`` known before any
input is seen, and the measured ``Table`` any number of byte budgets can be allocated from, with
``Table.trial`` to try an allocation in the network (what ``--keep`` searches with, keep.py)."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..dynamics.conversion import Skipped
from ..errors import DynError
from .allocation import Candidate, allocate
from .candidates import rounded


@dataclass
class Table:
    """Step 1's result: every unit's candidates with their measured network errors, and what the
    allocation (step 2) and the sequential fit (step 3) need. Any number of budgets can be
    allocated from one table (``--keep`` searches over them); ``trial`` puts an allocation's
    measured fits in place to try it."""

    model: nn.Module  # compressed in place by fit_allocation; norms and biases already on fp16
    original: nn.Module | None  # the untouched original; None when its weights are spilled (originals.py)
    units: list  # pipeline.Unit, in execution order
    skipped: list[Skipped]
    options: dict[str, list[tuple[Candidate, float]]]
    sensitivity: dict[str, float]
    fixed: int  # bytes of everything outside the budgeted weights (fp16 norms, header)
    unreached: list  # pipeline.Unit: layers that stay fp32 (never called as modules)
    halves: set[str]
    batches: list[torch.Tensor]
    calibration: str
    original_bytes: int
    fits: dict[str, dict[int, list]] | None = None  # unit -> candidate index -> kept fits, for trials
    notes: dict[str, list[dict]] | None = None  # unit -> every candidate's bytes and errors (report)
    group: int | None = None  # inputs per scale of the group-wise grids (None: picked per layer)
    measurement: dict | None = None  # how the candidates were measured (affordable.Plan.entry)
    originals: object = None  # originals.InMemory or originals.Spilled: the original's weights

    @property
    def trusted(self) -> bool:
        # synthetic inputs miss how channels move together (synth.py): GPTQ's error feedback would
        # be steered by that and rounding to nearest is safer; the upstream correction likewise
        return self.calibration == "images"

    @property
    def smallest(self) -> int:
        """The fewest bytes any allocation takes (every layer at its cheapest), header included."""
        return self.fixed + sum(4 * u.numel for u in self.unreached) + sum(
            min(c.bytes for c, _ in self.options[u.name]) for u in self.units)

    def allocation(self, target_bytes: int) -> dict[str, int]:
        """Step 2: the candidate index of every unit for ``target_bytes`` (allocation.allocate)."""
        if target_bytes < self.smallest:
            held = (f"the layers that must stay fp32 ({', '.join(u.name for u in self.unreached[:3])}...) and "
                    if self.unreached else "")
            raise DynError(f"the budget {target_bytes:,} bytes cannot hold {held}every layer at its cheapest measured "
                           f"choice ({self.smallest:,} bytes); ask for a larger --size")
        choice = allocate(self.options, target_bytes - self.fixed - sum(4 * u.numel for u in self.unreached))
        assert choice is not None  # the cheapest choice of every layer fits (checked above)
        return choice

    def planned_bytes(self, choice: dict[str, int]) -> int:
        return self.fixed + sum(self.options[n][i][0].bytes for n, i in choice.items())

    @contextmanager
    def trial(self, choice: dict[str, int]):
        """The network with ``choice``'s measured fits in place (fitted on the original's inputs,
        not refitted in sequence), put back to the original's weights afterwards (trials come
        before the fit, while the model's weights are the original's). Needs
        ``measure(..., keep_fits=True)``."""
        changed = []
        try:
            with torch.no_grad():
                for u in self.units:
                    i = choice[u.name]
                    cand = self.options[u.name][i][0]
                    if cand.kind == "fp32":
                        continue
                    for p, kept in zip(u.parts, self.fits[u.name][i]):
                        w = p.layer.weight
                        changed.append((w, p.name))
                        w.data.copy_(unkept(kept, cand, self._original_matrix(p.name)).reshape(w.shape))
            yield self.model
        finally:
            with torch.no_grad():
                for w, name in changed:
                    w.data.copy_(self._original_matrix(name).reshape(w.shape))

    def _original_matrix(self, name: str) -> torch.Tensor:
        return self.originals.matrix(name)


@dataclass
class Rounded:
    """A grid rounded to nearest, kept for a trial as its scales alone (None for fp16)."""

    scale: torch.Tensor | None


def kept_fit(fitted, dense: torch.Tensor, trusted: bool = True):
    """What a trial needs of one fit, small: states as they are, an integer grid as int8 codes and
    its scales, fp16 as fp16; a grid rounded to nearest (not ``trusted``: no GPTQ) as its scales
    (``Rounded``): a trial rounds the original weight again (a ViT-L/16 conversion that kept them
    in float32 held 8.74 GB, 7.2x its fp32 bytes, before it had measured them all)."""
    if getattr(fitted, "states", None) is not None:  # candidates.Fitted of states
        return fitted
    if not trusted:
        return Rounded(fitted.scale)
    if fitted.scale is not None:  # (m, 1) per channel, (m, n / G) in groups of G
        scale = fitted.scale.repeat_interleave(dense.shape[1] // fitted.scale.shape[1], dim=1)
        return torch.round(dense / scale).to(torch.int8), fitted.scale
    if dense.dtype == torch.float32 and torch.equal(dense.half().float(), dense):
        return dense.half()
    return dense.clone()


def unkept(kept, cand: Candidate, original: torch.Tensor) -> torch.Tensor:
    """The dense weight a kept fit of ``cand`` stands for; ``original``: the weight it was fitted to
    (a ``Rounded`` fit rounds it again on its own scales)."""
    if isinstance(kept, Rounded):
        return rounded(cand, original, kept.scale).weight
    if hasattr(kept, "dense"):  # candidates.Fitted
        return kept.dense()
    if isinstance(kept, tuple):
        codes, scale = kept
        return codes.float() * scale.repeat_interleave(codes.shape[1] // scale.shape[1], dim=1)
    return kept.float()


@dataclass
class Setup:
    """What is known before any input is seen: the units, the fixed bytes, the original."""

    model: nn.Module
    original: nn.Module | None  # None when its weights are spilled (originals.py)
    units: list  # pipeline.Unit, in execution order
    skipped: list[Skipped]
    small: dict[str, torch.Tensor]
    halves: set[str]
    fixed: int
    original_bytes: int
    min_params: int
    group: int | None = None
    originals: object = None  # originals.InMemory or originals.Spilled

    @property
    def smallest(self) -> int:
        return self.fixed + sum(min(c.bytes for c in u.candidates(self.min_params, self.group)) for u in self.units)

    def check(self, target_bytes: int) -> None:
        """A one-line error when ``target_bytes`` cannot be met, before any costly work."""
        if target_bytes >= self.original_bytes:
            raise DynError(f"the budget {target_bytes:,} bytes is not below the original's {self.original_bytes:,} "
                           "bytes; ask for a smaller --size (e.g. 1/4)")
        if self.smallest > target_bytes:
            raise DynError(f"the budget {target_bytes:,} bytes is below the smallest this model can be "
                           f"({self.smallest:,} bytes, --size {self.smallest / self.original_bytes:.4f}, with every "
                           "layer at its cheapest: int2 or states); ask for at least that")


