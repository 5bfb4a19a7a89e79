"""One byte budget for the whole network, split between layers by measured sensitivity.

``convert_to_budget`` is what ``dynconvert convert --size 1/8`` (or ``--target-bytes``) runs;
``--keep`` (keep.py) runs the same steps with a search between 2 and 3:

1. **Candidates** (candidates.py). Every Linear/Conv2d weight can stay fp32, become int8 (one
   scale per output channel), int4/int3/int2 with one fp16 scale per ~64 inputs (GPTQ, quant.py),
   dynamics states (sql2, int8 states) at a few H*d, or a quantized weight plus a states
   correction (dynamics/corrected.py). Each has an exact byte cost. An nn.MultiheadAttention's q,
   k and v projections are one unit (one packed tensor, one precision), its out_proj a Linear.
2. **Measure** (``prepare`` + ``measure`` -> table.Table). On the calibration inputs (images, or
   synthetic ones from BatchNorm statistics), each candidate is fitted to its layer's outputs,
   put in place alone, and the network's output error is measured.
3. **Allocate** (``Table.allocation``): the multiple-choice knapsack of allocation.py.
4. **Fit sequentially** (``fit_allocation``): in execution order, each chosen layer fitted to the
   *original* network's outputs from the inputs of the network *compressed so far*, then the
   block-wise reconstruction (reconstruct.py) when there are images.

The result records every layer's choice, its bytes, its measured error and the alternatives.
Longer than 350 lines: the three steps share the unit/candidate types and the result rows;
splitting them further would scatter one data flow over files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from .affordable import ChunkedMoments, plan
from .allocation import Candidate, allocate, why
from ..dynamics.attention import QKV, packed, proj_targets
from ..dynamics.calibration import Moments, collect_moments, output_error, used_in_order
from .candidates import (  # noqa: F401 (STATE_DIM, DYN_CANDIDATES, Fitted, state_bytes: public names of the stage)
    DYN_CANDIDATES, STATE_DIM, Fitted, fit_candidate, install, state_bytes, unit_candidates, worth_measuring,
)
from ..dynamics.conversion import LayerStats, Skipped, matches, uncovered_skips
from ..dynamics.layers import find_targets
from ..dynamics.modules import DynConv2d, dense_matrix
from ..errors import DynError
from .originals import keep_originals
from .probe import forward_macs
from .reconstruct import reconstruct_after_fit
from .suffix import Suffix
from .table import Setup, Table, kept_fit, unkept

SENSITIVITY_IMAGES = 16
"""Images the network error of each candidate is measured on (held apart from the fitting ones
when there are enough)."""
CHEAPEST_SHARE = 1 / 2
"""With a byte budget of a fraction f of the original, a candidate costing under f * CHEAPEST_SHARE
of its unit's fp32 bytes is not measured (unless the budget needs such candidates to fit): no
allocation measured took one (Lite2: the cheapest choice at 1/8 was int2 of the classifier at
0.56 f, at 1/6 int4 at 0.75 f, at 1/4 int4 + states at 0.57 f), and on a large network each one
measured is a pass through the rest of it (ViT-B/16 at 1/4: the states, int3, int2 and their
corrections are 9 of a unit's 17 candidates; at f/3 it was 5 or 6, and the conversion 1,845 s)."""
HEADER_BYTES_PER_LAYER = 850
"""The .dyn's JSON metadata per budgeted layer (its allocation row, with its best states and
correction candidates, and statistics)."""
HEADER_BYTES_PER_TENSOR = 160
"""The safetensors header entry and the metadata's storage entry of one stored tensor."""
NAME_CHARS = 32
"""The name length the two constants above hold; each character beyond it is written again in every
entry that names the tensor or layer (long names once put a file 15% over its budget)."""


def long_names(small: list[str], units: list["Unit"], min_params: int) -> int:
    """Header bytes the constants miss for names longer than NAME_CHARS: a small tensor's name is in
    its safetensors entry and its fp16 entry; a part's in up to 6 tensor entries, 2 storage entries,
    its layer entry (twice) and the allocation row when it becomes states, 4 times when quantized."""
    extra = lambda name: max(0, len(name) - NAME_CHARS)
    return (sum(2 * extra(k) for k in small)
            + sum((11 if any(c.kind == "dyn" for c in u.candidates(min_params)) else 4) * extra(p.name)
                  for u in units for p in u.parts))


@dataclass
class Part:
    """One weight matrix of a unit, fitted on its own inputs."""

    name: str  # the name its converted layer takes: a Linear/Conv2d's own, or an MHA's "<mha>.q_proj"
    layer: nn.Module  # the dense layer: nn.Linear, nn.Conv2d, or attention.ProjTarget
    m: int
    n: int


@dataclass
class Unit:
    """One decision of the budget: a Linear/Conv2d weight, or the q, k and v projections of an
    nn.MultiheadAttention together (packed, they are one tensor, stored at one precision)."""

    name: str
    parts: list[Part]
    stored: list[str]  # the state-dict keys of the dense weights: one per part, or one packed tensor
    convertible: str | None  # why states are not an option, or None

    @property
    def numel(self) -> int:
        return sum(p.m * p.n for p in self.parts)

    @property
    def shape(self) -> list[int]:
        """(m, n) of the unit's matrix (q, k and v stacked); [weights] when their n differ."""
        if len({p.n for p in self.parts}) == 1:
            return [sum(p.m for p in self.parts), self.parts[0].n]
        return [self.numel]

    def candidates(self, min_params: int, group: int | None = None) -> list[Candidate]:
        return unit_candidates(self, min_params, group)


def find_units(model: nn.Module, include=(), exclude=()) -> tuple[list[Unit], list[Skipped]]:
    """Every weight a layer kind finds (``layers.find_targets``, as ``plan`` does): a Linear/Conv2d
    weight (depthwise ones too: they can still be int8/int4), and the q, k and v projections of
    every nn.MultiheadAttention as one unit (its out_proj is a Linear)."""
    units, skipped, mhas = [], [], set()
    for name, kind, layer in find_targets(model):
        if kind.name == "mha_proj":
            mha_name = name.rpartition(".")[0]
            if mha_name in mhas:  # its q, k and v came together with its first projection
                continue
            mhas.add(mha_name)
            mha = model.get_submodule(mha_name)
            targets = proj_targets(mha_name, mha)
            names = [n for n, _ in targets]
            if len(targets) != len(QKV) or (include and not any(matches(n, include) for n in names)):
                continue
            if any(matches(n, exclude) for n in names):  # one packed tensor: decided together
                skipped += [Skipped(n, "excluded by pattern (q, k and v are budgeted together)") for n in names]
                continue
            stored = [f"{mha_name}.in_proj_weight"] if packed(mha) else [f"{n}_weight" for n in names]
            units.append(Unit(f"{mha_name}.{{q,k,v}}_proj", [Part(n, t, *t.weight.shape) for n, t in targets], stored, None))
            continue
        if not isinstance(getattr(layer, "weight", None), torch.Tensor):
            continue
        if include and not matches(name, include):
            continue
        if matches(name, exclude):
            skipped.append(Skipped(name, "excluded by pattern"))
            continue
        m, n = dense_matrix(layer).shape
        why_not = DynConv2d.convertible(layer) if isinstance(layer, nn.Conv2d) else None
        units.append(Unit(name, [Part(name, layer, m, n)], [f"{name}.weight"], why_not))
    if not units:
        raise DynError("no Linear or Conv2d layer to compress (check --include/--exclude)")
    return units, skipped + uncovered_skips(model, include, exclude)


def model_bytes(model: nn.Module) -> int:
    """Bytes of the model's state dict at its own dtypes: the fp32 original a size is a fraction of."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


# ---------------------------------------------------------------- measured network error


@torch.no_grad()
def measure_candidates(model: nn.Module, units: list[Unit], moments: dict[str, Moments] | None, images: torch.Tensor,
                       min_params: int, on_progress=None, gptq: bool = True, group: int | None = None,
                       notes: dict | None = None, fits: dict | None = None, saved=None, share: float = 0.0,
                       predict: bool = False) -> tuple[dict[str, list[tuple[Candidate, float]]], dict[str, float]]:
    """Every candidate of every layer, fitted to that layer's outputs and put in place *alone*;
    the network runs on ``images`` (from the layer's block on: suffix.py) and its output error
    (mean squared change of the outputs over their mean square) is that candidate's cost.
    Measured, not predicted: a low-rank error and a rounding error of the same size move a
    network very differently. A candidate whose layer
    output error is far above its unit's (bytes, error) hull is not run (``worth_measuring``).

    Returns (per layer: [(candidate, network error)], per layer: sensitivity = network error per
    unit of relative layer-output error of its int4 candidate, shown by ``report``); ``notes``
    (optional) receives per layer every candidate's label, bytes, layer and network error; ``fits``,
    when given, every measured fit (unit -> index in its options -> one per part) for ``Table.trial``.
    ``saved`` (dynfile.resume.BudgetCheckpoint, optional): each unit's measurement is saved as it
    finishes, and a unit an interrupted run measured is read back instead of measured again (each
    unit is measured alone on the original network, so the result is the same). ``share``: candidates
    costing less than this fraction of their unit's fp32 bytes are not offered (``CHEAPEST_SHARE``).
    ``predict`` (affordable.py): only the int4 and states candidates run in the network, the other
    grids' network errors are the int4's sensitivity times their layer errors (rows say ``predicted``);
    ``moments`` None: collected on ``images`` a few layers at a time (``affordable.ChunkedMoments``)."""
    if saved is not None and fits is not None:
        raise ValueError("saved measurements keep no fits: a --keep search cannot resume")
    suffix = Suffix(model, [p.name for u in units for p in u.parts], images)  # runs the reference pass
    reference = suffix.reference
    scale = reference.pow(2).mean().clamp_min(1e-30)
    if moments is None:  # the predicted measurement's: collected on these images, a chunk at a time
        moments = ChunkedMoments(model, units, images, suffix)
    options, sensitivity = {}, {}

    def network_error(weights, dense, names) -> float:
        for w, d in zip(weights, dense):
            w.data.copy_(d.reshape(w.shape))
        with suffix.from_layer(names):  # the blocks upstream are unchanged
            return float((model(images) - reference).pow(2).mean() / scale)
    for i, u in enumerate(units):
        record = saved.measured(u.name) if saved is not None else None
        if record is not None:
            # by label from the saved rows: a retry's reserve can move the floor, and with it the list offered now
            by_label = {c.label: c for c in u.candidates(min_params, group)}
            if any(row["choice"] not in by_label for row in record["rows"]):
                raise DynError(f"saved measurements of layer {u.name!r} name candidates this version does not "
                               "have; delete the .partial folder to start over")
            options[u.name] = [(by_label[record["rows"][k]["choice"]], err) for k, err in record["run"]]
            if record["sensitivity"] is not None:
                sensitivity[u.name] = record["sensitivity"]
            if notes is not None:
                notes[u.name] = record["rows"]
            if on_progress:
                on_progress("measuring candidates", i + 1, len(units))
            continue
        weights = [p.layer.weight for p in u.parts]  # an MHA projection's: a view of the packed tensor
        originals = [w.detach().clone() for w in weights]
        matrices = [o.reshape(p.m, p.n) for o, p in zip(originals, u.parts)]
        cs = [moments[p.name].own for p in u.parts]
        layer_scale = max(sum(output_error(w, torch.zeros_like(w), c) for w, c in zip(matrices, cs)), 1e-30)
        cands = offered(u, min_params, group, gptq, share)
        kept, layer_errs = [], []  # one candidate's dense weight at a time: ViT-L/16's fc2 is 16 MB a candidate
        for c in cands:
            fs = [None if c.kind == "fp32" else fit_candidate(c, w, m, 0, gptq) for w, m in zip(matrices, cs)]
            ds = [w if f is None else f.dense() for w, f in zip(matrices, fs)]
            layer_errs.append(sum(output_error(w, d, m) for w, d, m in zip(matrices, ds, cs)) / layer_scale)
            kept.append([None if f is None else kept_fit(f, d, gptq) for f, d in zip(fs, ds)])
        del cs  # a chunk's moments go with the chunk (affordable.ChunkedMoments)
        keep = worth_measuring([(c.bytes, e) for c, e in zip(cands, layer_errs)])

        def dense(k):
            return [w if f is None else unkept(f, cands[k], w) for w, f in zip(matrices, kept[k])]
        names = [p.name for p in u.parts]
        first_int4 = next((k for k, c in enumerate(cands) if c.kind == "int4"), None)
        guess = predict and first_int4 is not None  # a floor above int4's bytes: every candidate is measured
        measured, rows, run_at = [], [], []
        try:
            if guess:  # the int4 candidate first: its sensitivity predicts the other grids
                sensitivity[u.name] = network_error(weights, dense(first_int4), names) / max(layer_errs[first_int4], 1e-30)
            for k, (cand, layer_err, run) in enumerate(zip(cands, layer_errs, keep)):
                err, guessed = None, False
                if cand.kind == "fp32":
                    err = 0.0
                elif (run or k == first_int4) and guess and cand.spec is None:  # the int4's is measured
                    err, guessed = sensitivity[u.name] * layer_err, k != first_int4
                elif run:
                    err = network_error(weights, dense(k), names)
                    if cand.kind == "int4" and u.name not in sensitivity:
                        sensitivity[u.name] = err / max(layer_err, 1e-30)
                if err is not None:
                    if fits is not None and cand.kind != "fp32":
                        fits.setdefault(u.name, {})[len(measured)] = kept[k]
                    measured.append((cand, err))
                    run_at.append([k, err])
                rows.append(dict(choice=cand.label, kind=cand.kind, bytes=cand.bytes, layer_error=layer_err, network_error=err,
                                 **({"predicted": True} if guessed else {})))
        finally:
            for w, o in zip(weights, originals):
                w.data.copy_(o)
        options[u.name] = measured
        if notes is not None:
            notes[u.name] = rows
        if saved is not None:
            saved.save_measured(i, u.name, dict(run=run_at, rows=rows, sensitivity=sensitivity.get(u.name)))
        if on_progress:
            on_progress("measuring candidates", i + 1, len(units))
    return options, sensitivity


def offered(unit: Unit, min_params: int, group: int | None, trusted: bool, share: float = 0.0) -> list[Candidate]:
    """The candidates measured for ``unit``: those costing at least ``share`` of its fp32 bytes (all
    of them when fewer than two do). On synthetic or random inputs (not ``trusted``) only the
    weight-space ones: states and state corrections are fitted to the layer's outputs on the same
    few inputs their network error is then measured on, so that error flatters them; on
    EfficientNet-Lite2 (docs/budget.md) the allocations that took them agreed worse with the
    original on real photos than those without, at the same bytes."""
    cands = unit.candidates(min_params, group)
    cands = cands if trusted else [c for c in cands if c.spec is None]
    above = [c for c in cands if c.bytes >= share * 4 * unit.numel]
    return above if len(above) > 1 else cands


# ---------------------------------------------------------------- the whole conversion, in three steps


@dataclass
class BudgetResult:
    layers: list[LayerStats]
    skipped: list[Skipped]
    quantized: dict[str, dict]
    summary: dict


def prepare(model: nn.Module, *, include=(), exclude=(), min_params: int = 10_000, reserve: int = 0,
            group: int | None = None, spill: bool = False) -> Setup:
    """The units of ``model`` and the bytes outside them; the model is not changed yet. ``reserve``:
    bytes kept free beyond the header estimate (a retry after a file came out over the budget);
    ``group``: inputs per scale of the group-wise grids (None: ``quant.pick_group`` per layer);
    ``spill``: nothing will run the original forward (no images), so a large network's original
    weights may go to a temporary file instead of a second copy in memory (originals.py)."""
    if group is not None and (type(group) is not int or group <= 0):
        raise DynError(f"--quant-group {group!r} must be a positive number of inputs per scale (e.g. 64)")
    model.eval()
    original_bytes = model_bytes(model)
    units, skipped = find_units(model, include, exclude)
    originals = keep_originals(model, [p.name for u in units for p in u.parts], spill)
    # everything that is not a budgeted weight (norms, biases) is stored as fp16: at 1/8 of an
    # EfficientNet-Lite2 it would otherwise take 15% of the budget
    weights = {k for u in units for k in u.stored}
    small = {k: t for k, t in model.state_dict().items() if k not in weights}
    halves = {k for k, t in small.items() if t.is_floating_point() and t.dtype != torch.float16}
    count = sum(len(u.parts) for u in units)
    fixed = (sum(t.numel() * (2 if k in halves else t.element_size()) for k, t in small.items())
             + HEADER_BYTES_PER_TENSOR * (len(small) + 2 * count) + HEADER_BYTES_PER_LAYER * count + 4096
             + long_names(list(small), units, min_params) + reserve)
    return Setup(model, originals.network, units, skipped, small, halves, fixed, original_bytes, min_params, group,
                 originals)


def round_to_fp16(tensors: dict[str, torch.Tensor], keys) -> None:
    """Round ``tensors[k]`` for every k in ``keys`` to fp16 values in place (dtype kept): the norms
    and biases as the .dyn stores them."""
    with torch.no_grad():
        for k in keys:
            tensors[k].copy_(tensors[k].half().to(tensors[k].dtype))


def measure(setup: Setup, calibration_inputs, *, calibration: str, on_progress=None, keep_fits: bool = False,
            saved=None, target_bytes: int | None = None) -> Table:
    """Step 1: every candidate of every unit fitted on the original inputs and measured in the
    network (measure_candidates). Rounds the model's norms and biases to fp16 in place.
    ``keep_fits``: keep the fits for ``Table.trial`` (int8 per row: about 2 bytes per weight).
    ``saved``: a dynfile.resume.BudgetCheckpoint the measurements are saved to and resumed from.
    ``target_bytes``: the one budget the table is for (``--size``; None: any, as ``--keep``
    searches): candidates far cheaper than its share are not measured (``CHEAPEST_SHARE``)."""
    model, units, skipped = setup.model, setup.units, list(setup.skipped)
    round_to_fp16(setup.small, setup.halves)  # the model is only changed once the budget is known to be reachable
    batches = calibration_inputs() if callable(calibration_inputs) else calibration_inputs
    at = {n: i for i, n in enumerate(used_in_order(model, [p.name for u in units for p in u.parts], batches[0][:1]))}
    units = sorted(units, key=lambda u: at.get(u.parts[0].name, len(at)))  # execution order, unreached last
    # a layer whose owner reads its .weight instead of calling it (Swin's qkv; an MHA's
    # projections are tapped through the MHA, see attention.input_taps) shows no inputs: it stays
    # fp32 and is listed; its bytes come out of the room
    unreached = [u for u in units if any(p.name not in at for p in u.parts)]
    for u in unreached:
        skipped.append(Skipped(u.name, "never called as a module (its owner reads .weight), so its outputs cannot "
                                       "be measured: left fp32"))
    units = [u for u in units if u not in unreached]
    if not units:
        raise DynError(f"no layer can be budgeted: {', '.join(u.name for u in unreached[:3])}... must stay fp32")
    fits = {} if keep_fits else None
    notes: dict[str, list[dict]] = {}
    trusted = calibration == "images"
    share = 0.0
    if target_bytes is not None:
        share = CHEAPEST_SHARE * target_bytes / setup.original_bytes
        room = target_bytes - setup.fixed - sum(4 * u.numel for u in unreached)
        if sum(min(c.bytes for c in offered(u, setup.min_params, setup.group, trusted, share)) for u in units) > room:
            share = 0.0  # the budget needs the cheapest candidates somewhere: every one is measured
    everything = torch.cat(list(batches))
    held_apart = len(everything) >= 3 * SENSITIVITY_IMAGES  # measure on images the fits did not see
    how = plan(forward_macs(model, tuple(everything.shape[1:])), len(units), SENSITIVITY_IMAGES,
               sum(len(offered(u, setup.min_params, setup.group, trusted, share)) - 1 for u in units))
    images = everything[-how.images:] if held_apart else everything[:how.images]
    moments = None  # predicted: collected on the images, a few layers at a time (affordable.ChunkedMoments)
    if not how.predicted:
        fitting = everything[:-SENSITIVITY_IMAGES] if held_apart else everything
        moments = collect_moments([p.name for u in units for p in u.parts], fitting.split(32), model)
    options, sensitivity = measure_candidates(model, units, moments, images, setup.min_params, on_progress,
                                              gptq=trusted, group=setup.group, notes=notes, fits=fits,
                                              saved=saved, share=share, predict=how.predicted)
    return Table(model, setup.original, units, skipped, options, sensitivity, setup.fixed, unreached, setup.halves,
                 batches, calibration, setup.original_bytes, fits, notes, setup.group, how.entry(), setup.originals)


def fit_allocation(table: Table, choice: dict[str, int], target_bytes: int, *, stages: int = 8, state_steps: int = 60,
                   reconstruct_iters: int = 0, on_progress=None, on_note=None) -> BudgetResult:
    """Step 3: in execution order, a stage of layers at a time, each chosen candidate fitted again
    on the inputs of the network compressed so far (aiming at the original's outputs), put in
    place in ``table.model``; then ``reconstruct_iters`` steps per block of block-wise
    reconstruction (reconstruct.py; 0: none), ``on_note(text)`` saying what it did per block."""
    progress = on_progress or (lambda *a: None)
    model, original, options, trusted = table.model, table.original, table.options, table.trusted
    chosen = {n: options[n][i][0] for n, i in choice.items()}
    todo = [u for u in table.units if chosen[u.name].kind != "fp32"]
    per_stage = max(1, math.ceil(len(todo) / max(stages, 1)))
    layers, rows = [], []
    quantized: dict[str, dict] = {k: {"bits": 16} for k in table.halves}
    done = 0
    for s in range(0, len(todo), per_stage):
        stage = todo[s:s + per_stage]
        paired = {}  # rounding to nearest (synthetic or random inputs) needs no inputs: the pass is skipped
        if trusted or any(chosen[u.name].spec is not None for u in stage):
            paired = collect_moments([p.name for u in stage for p in u.parts], table.batches, model, original,
                                     stop_after=stage[-1].parts[-1].name)
        for u in stage:
            layers += install(model, table.originals, u, chosen[u.name], paired, trusted=trusted, state_steps=state_steps,
                              calibration=table.calibration, quantized=quantized)
            done += 1
            progress("fitting", done, len(todo))
    predicted_total = 0.0
    for u in table.units:
        cand, err = options[u.name][choice[u.name]]
        predicted_total += err
        rows.append(dict(
            name=u.name, shape=u.shape, choice=cand.label, kind=cand.kind, bytes=cand.bytes,
            fp32_bytes=4 * u.numel, sensitivity=table.sensitivity.get(u.name, 0.0), predicted_error=err,
            why=why(options[u.name], choice[u.name]),
            states_possible=u.convertible is None, per_channel=cand.group == 0,
            **best_states((table.notes or {}).get(u.name, [])),
        ))
    summary = dict(
        target_bytes=target_bytes, original_bytes=table.original_bytes, fixed_bytes=table.fixed,
        planned_bytes=table.fixed + sum(r["bytes"] for r in rows), calibration=table.calibration,
        calibration_images=int(sum(len(b) for b in table.batches)), predicted_error=predicted_total,
        stages=math.ceil(len(todo) / per_stage) if todo else 0, layers=rows, kinds=kind_counts(rows),
        reconstruction=None, measurement=table.measurement,
    )
    if table.group is not None:  # the stated fallback: rows that group does not divide keep one scale per channel
        summary["per_channel_fallback"] = [u.name for u in table.units if any(p.n % table.group for p in u.parts)]
    result = BudgetResult(layers, table.skipped, quantized, summary)
    reconstruct_fitted(table, result, reconstruct_iters, on_progress=on_progress, on_note=on_note)
    return result


def reconstruct_fitted(table: Table, result: BudgetResult, iters: int, *, on_progress=None, on_note=None) -> None:
    """Block-wise reconstruction of the network ``fit_allocation`` fitted, towards the original's
    block outputs (reconstruct.py; ``iters`` 0: none), recorded in ``result.summary``."""
    fitted = any(r["kind"] != "fp32" for r in result.summary["layers"])
    result.summary["reconstruction"] = reconstruct_after_fit(
        table.model, table.original, table.batches, result.quantized, iters=iters if fitted else 0, augmented=0,
        on_progress=on_progress or (lambda *a: None), on_note=on_note)


def convert_to_budget(
    model: nn.Module,
    target_bytes: int,
    calibration_inputs,
    *,
    calibration: str,
    include=(),
    exclude=(),
    min_params: int = 10_000,
    stages: int = 8,
    state_steps: int = 60,
    group: int | None = None,
    reconstruct_iters: int = 0,
    on_progress=None,
    reserve: int = 0,
    on_note=None,
    saved=None,
) -> BudgetResult:
    """Compress ``model`` in place to at most ``target_bytes`` in its .dyn file (see module doc):
    ``prepare`` and ``measure`` (step 1), ``Table.allocation`` (2), ``fit_allocation`` (3).

    ``calibration_inputs``: a list of input batches, or a function returning one (called only once
    the budget is known to be reachable: synthesizing inputs takes a while).
    ``calibration`` says where they come from (recorded: "images", "synthetic (BatchNorm
    statistics)"). ``reconstruct_iters``: steps per block of the block-wise reconstruction after the
    sequential fit (reconstruct.py; 0: none). ``on_progress(phase, done, total)`` reports progress,
    ``on_note(text)`` what the reconstruction did per block. ``reserve``: bytes kept free beyond the
    header estimate (a retry after a file came out over the budget). ``saved``: a
    dynfile.resume.BudgetCheckpoint the measurements are saved to and resumed from.
    """
    setup = prepare(model, include=include, exclude=exclude, min_params=min_params, reserve=reserve, group=group)
    setup.check(target_bytes)
    table = measure(setup, calibration_inputs, calibration=calibration, on_progress=on_progress, saved=saved,
                    target_bytes=target_bytes)
    choice = table.allocation(target_bytes)
    return fit_allocation(table, choice, target_bytes, stages=stages, state_steps=state_steps,
                          reconstruct_iters=reconstruct_iters, on_progress=on_progress, on_note=on_note)


def kind_counts(rows: list[dict]) -> dict[str, int]:
    """How many units chose each kind (states, state corrections, each grid), for the report."""
    counts: dict[str, int] = {}
    for r in rows:
        key = r["kind"] + (" per-channel" if r.get("per_channel") else "")
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def best_states(rows: list[dict]) -> dict:
    """The best-measured states and state-correction candidates of a unit ([label, bytes, layer
    error, network error (None: not run, far off the hull)]): why they were not chosen, or were."""
    out = {}
    for key, test in (("best_states", lambda k: k == "dyn"), ("best_correction", lambda k: k.endswith("+dyn"))):
        found = [r for r in rows if test(r["kind"])]
        if found:
            r = min(found, key=lambda r: (r["network_error"] is None, r["network_error"] or 0.0, r["layer_error"]))
            out[key] = [r["choice"], r["bytes"], float(f"{r['layer_error']:.3g}"),
                        None if r["network_error"] is None else float(f"{r['network_error']:.3g}")]
    return out


def choice_lines(summary: dict) -> list[str]:
    """What a budget chose, in words: layers per kind, and how states and state corrections fared
    (measured on how many layers, chosen on how many, the closest miss and its measured errors)."""
    rows = summary.get("layers", [])
    lines = ["layers per choice: " + ", ".join(f"{n} {k}" for k, n in (summary.get("kinds") or kind_counts(rows)).items())]
    for key, what, test in (("best_states", "states", lambda k: k == "dyn"),
                            ("best_correction", "state corrections (intK + states)", lambda k: k.endswith("+dyn"))):
        offered = [r for r in rows if r.get(key)]
        if not offered:
            continue
        run = [r for r in offered if r[key][3] is not None]
        chosen = [r for r in rows if test(r["kind"])]
        text = f"{what}: offered on {len(offered)} layers, measured in the network on {len(run)}, chosen on {len(chosen)}"
        missed = [r for r in run if not test(r["kind"])]
        if missed:
            r = min(missed, key=lambda r: r[key][3] - r["predicted_error"])
            label, nbytes, layer_err, net_err = r[key]
            text += (f"; closest miss {r['name']}: {label} ({nbytes:,} B) network error {net_err:.3g} "
                     f"(layer {layer_err:.3g}) vs the chosen {r['choice']} ({r['bytes']:,} B) {r['predicted_error']:.3g}")
        lines.append(text)
    return lines
