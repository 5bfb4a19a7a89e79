"""The candidates of one budget unit: what each costs in bytes, how it is fitted to the layer's
outputs, which are worth measuring in the network, and how the chosen one is put in the model
and stored.

Kinds (``allocation.Candidate.kind``):

- ``fp32``: kept; ``fp16``: stored as fp16 (half the bytes: a sensitive layer's step up from
  int8 at half fp32's price); ``int8``: one symmetric scale per output channel (GPTQ);
- ``int6``, ``int5``, ``int4``, ``int3``, ``int2``: group-wise grids (``quant``: fp16 scales, one per ``group`` inputs
  of a row, ``group == n`` being one per channel), rounded by GPTQ with the groups in the loop;
- ``dyn``: dynamics states (sql2, int8 states) in place of the weight;
- ``int4+dyn``, ``int3+dyn``, ``int2+dyn``: a group-wise weight plus states fitted to what its
  rounding lost, in the activation-whitened space (``corrected.py``; LQER/EoRA's idea with
  states as the low-rank term). Its bytes are both parts'.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from .allocation import Candidate
from ..dynamics.conversion import LayerStats
from ..dynamics.corrected import CorrectedConv2d, CorrectedLinear
from ..dynamics.fit import svd_rel_error
from ..dynamics.layers import dense_kind, make_dynamic
from ..dynamics.modules import DynSpec, set_submodule, sql2_lowrank
from .outputs import STATE_KEEP, corrected_target, fit_states, gptq_quantize, row_scales
from .quant import dequantize, fake_quant_grouped, grouped_bytes, pick_group, quantize, stored_bytes

STATE_DIM = 16
"""d of quantized states: one fp32 scale per state vector costs 4 bytes per d int8 values."""
DYN_CANDIDATES = 5
"""Dynamics candidates per layer: H from 1 to where states cost 0.9 x int4, spaced geometrically."""
GROUPED_BITS = (6, 5, 4, 3, 2)
"""The group-wise grids offered: int5 and int6 are the steps between int4 and int8 (at 1/6 of the
bytes, about 5.3 bits a weight, the allocation otherwise mixes int8 and int4 layers)."""
CORRECTED_BITS = (4, 3, 2)
"""The grids offered with a states correction (above int4 the rounding leaves little to correct)."""
CORRECTION_H = 1
"""States of a correction: measured on Lite2, H=1 removes 5-25% of a GPTQ residual's output
error for about the bytes of one more bit, which removes 70-75% (more H: proportionally less)."""
HULL_MARGIN = 1.5
"""A candidate is measured in the network only when its layer output error is within this factor
of the lower convex hull of (bytes, layer error) of its unit's candidates: the Lagrangian
allocation only picks hull points, and the network error follows the layer's up to this slack."""


def state_bytes(spec: DynSpec, m: int, n: int) -> int:
    """int8 states with one fp32 scale per (group, state vector), fp32 couplings and offset."""
    vectors = spec.groups * (m + n)
    return stored_bytes(vectors * spec.dim, 8, vectors) + 4 * (spec.groups + 1)


def group_for(n: int, group: int | None) -> int:
    """The group size used for a row of ``n`` inputs: ``group`` where it divides ``n``, else one
    scale per channel (the stated fallback); ``None``: the divisor of n nearest 64 in [32, 128]."""
    if group is None:
        return pick_group(n)
    return group if group > 0 and n % group == 0 else n


def correctable(layer: nn.Module) -> bool:
    """Layers a state correction can run beside: Linear, and Conv2d with groups 1."""
    return type(layer) is nn.Linear or (isinstance(layer, nn.Conv2d) and layer.groups == 1)


def unit_candidates(unit, min_params: int, group: int | None = None) -> list[Candidate]:
    """Every candidate of ``unit`` (pipeline.Unit) with its exact bytes in a .dyn."""
    parts = unit.parts

    def per_channel(bits):
        return sum(stored_bytes(p.m * p.n, bits, p.m) for p in parts)

    def grouped(bits, g):  # g == 0: per channel
        return sum(grouped_bytes(p.m, p.n, bits, group_for(p.n, g or p.n)) for p in parts)

    g = group_for(parts[0].n, group)
    g = 0 if g == parts[0].n else g
    out = [Candidate("fp32", 4 * unit.numel), Candidate("fp16", 2 * unit.numel), Candidate("int8", per_channel(8))]
    out += [Candidate(f"int{b}", grouped(b, g), group=g) for b in GROUPED_BITS]
    if g:  # per channel costs 2 bytes a row instead of one per group: offered beside it
        out.append(Candidate("int4", grouped(4, 0), group=0))
    if unit.convertible is None and min(p.m * p.n for p in parts) >= min_params:
        # H from 1 up to where states would cost as much as int4, spaced geometrically
        most = math.floor(0.9 * per_channel(4) / sum((p.m + p.n) * (STATE_DIM + 4) for p in parts))
        hs = sorted({max(1, round(most ** (k / (DYN_CANDIDATES - 1)))) for k in range(DYN_CANDIDATES)}) if most >= 1 else []
        for h in hs:
            spec = DynSpec(h, STATE_DIM, "sql2", "linear")
            out.append(Candidate("dyn", sum(state_bytes(spec, p.m, p.n) for p in parts), spec))
        if len(parts) == 1 and correctable(parts[0].layer) and 2 * STATE_DIM * CORRECTION_H <= min(parts[0].m, parts[0].n):
            spec = DynSpec(CORRECTION_H, STATE_DIM, "sql2", "linear")
            extra = state_bytes(spec, parts[0].m, parts[0].n)
            out += [Candidate(f"int{b}+dyn", grouped(b, g) + extra, spec, group=g) for b in CORRECTED_BITS]
    return out


def bits_of(cand: Candidate) -> int | None:
    return int(cand.kind[3]) if cand.kind.startswith("int") else None


# ---------------------------------------------------------------- fitting one candidate


@dataclass
class Fitted:
    weight: torch.Tensor | None = None  # dense (m, n) on its integer grid
    scale: torch.Tensor | None = None  # that grid's scales: (m, 1) per channel, (m, n // G) grouped
    group: int | None = None  # G of a group-wise grid (None: the int8 per-channel grid)
    states: object = None  # FitResult for "dyn" and the corrections

    def dense(self) -> torch.Tensor:
        """The (m, n) weight this fit stands for."""
        if self.states is None:
            return self.weight
        f = self.states
        low = sql2_lowrank(f.states_out, f.states_in, f.coupling, f.offset)
        return low if self.weight is None else self.weight + low


def fit_candidate(cand: Candidate, target: torch.Tensor, c: torch.Tensor | None, state_steps: int,
                  gptq: bool = True) -> Fitted:
    """``cand`` fitted to ``target`` (m x n) for inputs of second moment ``c`` (GPTQ's rounding and
    the states' fit use it); ``gptq`` False: grids rounded to nearest, which ``c`` does not steer."""
    if cand.kind == "fp32":
        return Fitted(weight=target)
    if cand.kind == "dyn":
        return Fitted(states=fit_states(target, c, cand.spec, bits=8, steps=state_steps))
    if cand.kind == "fp16" or not gptq:  # nearest rounding: what synthetic inputs cannot mislead
        fitted = rounded(cand, target)
    elif cand.kind == "int8":
        return Fitted(*gptq_quantize(target, c, 8))
    else:
        g = group_for(target.shape[1], cand.group or target.shape[1])
        fitted = Fitted(*gptq_quantize(target, c, bits_of(cand), group=g), group=g)
    if cand.kind.endswith("+dyn"):  # states hold what the rounding lost, weighted by the inputs
        fitted.states = fit_states(target - fitted.weight, c, cand.spec, bits=8, steps=state_steps)
    return fitted


def rounded(cand: Candidate, target: torch.Tensor, scale: torch.Tensor | None = None) -> Fitted:
    """``cand``'s grid (fp16, int8 per channel, a group-wise grid) rounded to nearest; with ``scale``
    (a fit's own), those scales instead of searching them again (a trial's re-rounding, table.py)."""
    if cand.kind == "fp16":
        return Fitted(weight=target.half().to(target.dtype))
    if cand.kind == "int8":
        scale = row_scales(target, 8) if scale is None else scale
        return Fitted(weight=dequantize(*quantize(target, 8, (0,), scale)), scale=scale)
    g = group_for(target.shape[1], cand.group or target.shape[1])
    w, scale = fake_quant_grouped(target, bits_of(cand), g, scale)
    return Fitted(weight=w, scale=scale, group=g)


def worth_measuring(costs: list[tuple[int, float]], margin: float = HULL_MARGIN) -> list[bool]:
    """For (bytes, layer output error) of a unit's candidates: whether each lies within ``margin``
    of the lower convex hull (the cheapest is always kept)."""
    pts = sorted(set(costs))
    hull: list[tuple[int, float]] = []
    for p in pts:  # Andrew's monotone chain, lower part, keeping only what lowers the error
        if hull and p[1] >= hull[-1][1]:
            continue
        while len(hull) >= 2 and (hull[-1][0] - hull[-2][0]) * (p[1] - hull[-2][1]) \
                <= (hull[-1][1] - hull[-2][1]) * (p[0] - hull[-2][0]):
            hull.pop()
        hull.append(p)

    def bound(b):
        left = max((h for h in hull if h[0] <= b), default=hull[0])
        right = min((h for h in hull if h[0] >= b), default=hull[-1])
        if right[0] == left[0]:
            return left[1]
        t = (b - left[0]) / (right[0] - left[0])
        return left[1] + t * (right[1] - left[1])

    return [e <= margin * bound(b) + 1e-30 for b, e in costs]


# ---------------------------------------------------------------- the chosen candidate, in place


def install(model: nn.Module, originals, unit, cand: Candidate, paired: dict, *, trusted: bool,
            state_steps: int, calibration: str, quantized: dict) -> list[LayerStats]:
    """Fit ``cand`` for every part of ``unit`` on its moments ``paired`` (inputs of the network
    compressed so far), put it in ``model`` and record how its tensors are stored in ``quantized``;
    returns the statistics of the layers that became converted (states) layers."""
    layers, scales, groups = [], [], []
    for p in unit.parts:
        mom = paired.get(p.name)  # absent for a grid rounded to nearest (not trusted), which needs none
        w = originals.matrix(p.name)
        target = corrected_target(w, mom) if trusted else w
        fitted = fit_candidate(cand, target, None if mom is None else mom.own, state_steps, gptq=trusted)
        if fitted.states is not None:
            spec, f = cand.spec, fitted.states
            if fitted.weight is None:
                new = make_dynamic(p.layer, spec)
            else:
                new = (CorrectedLinear if isinstance(p.layer, nn.Linear) else CorrectedConv2d).from_dense(p.layer, spec)
                new.base.data.copy_(fitted.weight.reshape(new.base.shape))
                quantized[f"{p.name}.base"] = {"bits": bits_of(cand), "group": fitted.group, "scale": fitted.scale}
            new.set_states(f.states_out, f.states_in, f.coupling, f.offset)
            set_submodule(model, p.name, new)
            for t in ("states_out", "states_in"):
                quantized[f"{p.name}.{t}"] = {"bits": 8, "keep": list(STATE_KEEP)}
            layers.append(LayerStats(
                name=p.name, kind=dense_kind(p.layer).name if fitted.weight is None else
                ("linear+q" if isinstance(p.layer, nn.Linear) else "conv2d+q"),
                weight_shape=list(p.layer.weight.shape), matrix_shape=[p.m, p.n], spec=spec.to_dict(),
                dense_params=p.m * p.n, state_params=new.num_state_params(), rel_error=f.rel_error,
                svd_rel_error=svd_rel_error(w, spec.rank_budget), svd_rank=spec.rank_budget,
                steps=state_steps, fit_mode=f"outputs ({calibration}, sequential)" + ("" if fitted.weight is None else
                                                                                     f", correcting {cand.kind[:4]}"),
                output_rel_error=f.output_rel_error,
            ))
        elif cand.kind != "fp32":
            p.layer.weight.data.copy_(fitted.weight.reshape(p.layer.weight.shape))
            scales.append(fitted.scale)
            groups.append(fitted.group)
    if cand.kind == "fp16":
        for key in unit.stored:
            quantized[key] = {"bits": 16}
    elif scales:  # a packed q/k/v tensor: its rows' scales, in order
        grouped = [torch.cat(scales)] if len(unit.stored) == 1 else scales
        for i, (key, scale) in enumerate(zip(unit.stored, grouped)):
            g = groups[i]
            quantized[key] = {"bits": 8, "keep": [0], "scale": scale} if g is None else \
                {"bits": bits_of(cand), "group": g, "scale": scale}
    return layers
