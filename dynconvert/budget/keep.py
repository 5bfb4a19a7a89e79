"""``--keep A``: the smallest file whose top-1 agreement with the original on probe inputs is at
least A (the quality target users state, as Intel Neural Compressor's ``tolerable_loss`` or
AIMET's ``allowed_accuracy_drop``), instead of a byte budget.

The candidate tables are measured once (pipeline.measure); then the budget axis is searched:
each trial allocates a budget (allocation.allocate, milliseconds), puts the measured fits in
place (``Table.trial``: fitted on the original's inputs, not yet refitted in sequence) and runs
the probe once. 1/8 and 1/4 of the original's bytes are always tried (the honest trade-off: what
a smaller file would cost), then bisection between the largest failing and the smallest passing
budget, at most ``MAX_TRIALS`` trials. Only the chosen budget is fitted in sequence
(pipeline.fit_allocation), and its agreement measured again. When the fitted network misses the
target there, it is fitted once more, from the weights as they were, at a budget 25% larger
(``MAX_REFITS``, ``refit_budget``), unless it fell short by at most ``REFIT_SLACK``. The
block-wise reconstruction (most of a fit's time on images) runs once, on the last fit, and the
agreement after it is the figure recorded.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn as nn

from ..errors import DynError
from ..io.allocator import release_freed
from .pipeline import (BudgetResult, Table, find_units, fit_allocation, measure, prepare, reconstruct_fitted,
                       round_to_fp16)
from .probe import HELD_APART, SYNTHETIC, Probe, affordable_steps, synthetic_probe
from .synth import bn_synthetic_batches, synthesis_size

DEFAULT_KEEP = 0.95
"""The quality target of a `convert` with no mode flag (docs/budget.md: the table that chose it)."""
MAX_TRIALS = 10
ANCHORS = (1 / 8, 1 / 4)
"""Budgets (fractions of the original's bytes) every search tries: the trade-off users see."""
CLOSE = 1.02
"""Bisection stops when the smallest passing budget is within 2% of the largest failing one."""
NEAR_FP32 = 0.5
"""A target met only above this fraction of the fp32 bytes is said so in one line."""
MIN_PROBE, MAX_PROBE = 16, 64
"""Calibration images held apart for the probe: a quarter of them, at least 16 (else the probe is
synthetic), at most 64."""
FIT_STEPS = 500
"""Synthesis steps of the fitting set (synth.py's default), scaled down for large networks."""
NORMAL_CALIBRATION = "standard-normal (no images, no BatchNorm to synthesize from)"
MAX_REFITS = 1
"""When the fitted network misses the target on the probe, it is fitted again this many times at a
larger budget (a trial measures the fits in place alone; the sequential fit and the reconstruction
can land a few probe images lower, and the smallest passing trial is the luckiest of several)."""
CEILING_GAP = 0.03
"""A target above what every layer at its dearest reaches on the probe (the format's fp16 norms and
biases can flip a probe image: Lite2, 64 probe images, 63 agree), by at most this much, aims at that
ceiling instead: the smallest file that reaches it, not the fp32-sized file. Further above, the
largest file is written with a warning (a network that fragile wants a look, not a guess)."""
REFIT_SLACK = 0.03
"""A fitted network this close below the target is not fitted again. On a probe of 64 images it is
two images, which two fits of one budget differ by (Lite2: 0.922 as a trial, 0.875 fitted in
sequence), and a refit at ``REFIT_STEP`` lands about 0.04-0.06 higher, overshooting by more than
the miss (Lite2 --keep 0.9: a miss of 0.025 refitted to 0.941 on photos; not refitted, the
reconstruction took the probe to 0.953 and the photos to 0.912). When the network stays short,
the file says the target was not met, with the reading."""
REFIT_STEP = 1.25
"""A refit's budget, as a multiple of the missed one. On Lite2 the fitted network at 0.154x fell
0.07 short on photos, and agreement there rises about 0.09 per 0.1x of the fp32 bytes: 1.1x would
not have covered it."""


@dataclass
class Trial:
    budget: int  # the byte budget allocated
    bytes: int  # the planned file bytes of its allocation
    agreement: float  # top-1 agreement of the trial network on the probe


def parse_keep(text: str) -> float:
    """``0.95`` or ``95%`` -> 0.95; anything outside (0, 1] is a one-line error naming --keep."""
    t = str(text).strip()
    try:
        value = float(t[:-1]) / 100 if t.endswith("%") else float(t)
    except ValueError:
        raise DynError(f"--keep {text!r}: give the top-1 agreement with the original to keep, a number in (0, 1] "
                       "such as 0.95") from None
    if not 0 < value <= 1:
        raise DynError(f"--keep {text!r} must be in (0, 1]: the fraction of probe images on which the converted "
                       "network must answer as the original does (e.g. 0.95)")
    return value


def search(table: Table, probe: Probe, keep: float, *, max_trials: int = MAX_TRIALS,
           on_trial=None) -> tuple[int, list[Trial], float]:
    """(the chosen byte budget, every trial in the order run, the agreement aimed at). The chosen
    budget is the smallest tried whose trial met ``keep``; if none did, the largest (every layer at
    its dearest), or, when that one falls short of ``keep`` by at most CEILING_GAP, the smallest
    whose trial reaches what the largest reached (then aimed at instead of ``keep``)."""
    smallest, largest = table.smallest, search_largest(table)
    trials: list[Trial] = []
    agreement: dict[int, float] = {}
    aim = keep

    def run(budget: int) -> None:
        choice = table.allocation(budget)
        with table.trial(choice) as model:
            a = probe.agreement(model)
        trials.append(Trial(budget, table.planned_bytes(choice), a))
        agreement[budget] = a
        if on_trial:
            on_trial(trials[-1])

    def bracket() -> tuple[int | None, int | None]:
        """(the largest failing budget below the smallest passing one, the smallest passing one)."""
        passed = {b: a >= aim for b, a in agreement.items()}
        ok = min((b for b, p in passed.items() if p), default=None)
        fail = max((b for b, p in passed.items() if not p and ok is not None and b < ok), default=None)
        return fail, ok

    for f in sorted(ANCHORS, reverse=True):
        b = int(f * table.original_bytes)
        if smallest <= b < largest:
            run(b)
    if max(agreement.values(), default=0.0) < aim:
        run(largest)
        if keep - CEILING_GAP <= agreement[largest] < keep:
            aim = agreement[largest]
    fail, ok = bracket()
    if ok is not None and fail is None and smallest < ok:
        run(smallest)
        fail, ok = bracket()
    while ok is not None and fail is not None and ok / fail > CLOSE and len(trials) < max_trials:
        run(int(math.sqrt(ok * fail)))
        fail, ok = bracket()
    return (ok if ok is not None else largest), trials, aim


def tradeoff_line(keep: float, chosen: int, original_bytes: int, trials: list[dict]) -> str | None:
    """When the target holds only near the fp32 size, what 1/4 and 1/8 would have cost
    (``trials``: as ``trials_dicts`` gives them)."""
    if chosen <= NEAR_FP32 * original_bytes:
        return None
    at = {round(t["budget"] / original_bytes, 3): t["agreement"] for t in trials}
    parts = [f"at {name} of the bytes the trials reached {at[round(f, 3)]:.3f}"
             for name, f in (("1/4", 1 / 4), ("1/8", 1 / 8)) if round(f, 3) in at]
    return (f"the target {keep:g} is met only at {chosen / original_bytes:.2f}x the fp32 bytes"
            + (f"; {', '.join(parts)}" if parts else "") + ": a smaller file costs that much agreement")


def trials_dicts(trials: list[Trial], original_bytes: int) -> list[dict]:
    return [dict(asdict(t), fraction=round(t.budget / original_bytes, 4), agreement=round(t.agreement, 4)) for t in trials]


@dataclass
class KeepResult:
    budget: BudgetResult
    network: dict  # probe.entry of the final network
    keep: dict  # target, probe kind, reached agreement, the trials, the time split


def split_probe(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(fitting images, held-apart probe images or None when there are too few to spare)."""
    n = min(MAX_PROBE, len(images) // 4)
    if n < MIN_PROBE:
        return images, None
    return images[:-n], images[-n:]


def convert_to_keep(model: nn.Module, keep: float, calib: list[torch.Tensor] | None, *, input_size,
                    include=(), exclude=(), min_params: int = 10_000, group: int | None = None,
                    synthetic_images: int = 32,
                    reconstruct_iters: int = 0, on_progress=None, on_note=None, on_trial=None) -> KeepResult:
    """Compress ``model`` in place to the smallest allocation whose probe agreement is >= ``keep``
    (``reconstruct_iters``: block-wise reconstruction after the final fit, pipeline.fit_allocation)."""
    note = on_note or (lambda text: None)
    clock = time.perf_counter
    start = clock()
    # no images and no reconstruction: nothing runs the original forward, and a large one's weights
    # go to a file (originals.py)
    setup = prepare(model, include=include, exclude=exclude, min_params=min_params, group=group,
                    spill=calib is None and not reconstruct_iters)
    original = setup.original if setup.original is not None else model  # the same, until measure changes it
    if calib is not None:
        images = torch.cat(calib)
        fitting, held = split_probe(images)
        if held is None:
            probe = synthetic_probe(original, input_size, on_progress=on_progress)
            note(f"{len(images)} calibration images are too few to hold {MIN_PROBE} apart for the probe (that needs "
                 f"{4 * MIN_PROBE}): the target is checked on {probe.kind} inputs instead")
        else:
            probe = Probe(held, HELD_APART)
            finer = (f" (a probe of {len(held)} measures agreement in steps of {1 / len(held):.3f}: {4 * MAX_PROBE} or "
                     f"more images hold {MAX_PROBE} apart, a finer check)") if len(held) < MAX_PROBE else ""
            note(f"{len(fitting)} calibration images for fitting, {len(held)} held apart to check the target on{finer}")
        batches, mode = list(fitting.split(64)), "images"
    else:
        probe = synthetic_probe(original, input_size, on_progress=on_progress)
        if probe.kind == SYNTHETIC:
            note("no calibration images: synthesizing inputs from the model's BatchNorm statistics (data-free); "
                 "the target is checked on synthetic inputs, not on real images (--calib DIR checks it on yours)")
            size = synthesis_size(model, input_size)
            step = (lambda s, n, loss: on_progress("synthesizing inputs", s, n)) if on_progress else None
            batches = bn_synthetic_batches(model, images=synthetic_images, input_size=size, on_step=step,
                                           steps=affordable_steps(FIT_STEPS, model, size))
            mode = "synthetic (BatchNorm statistics)"
        else:
            note("no calibration images and no BatchNorm statistics to synthesize inputs from: measuring on "
                 "standard-normal inputs, a rough guide only; pass --calib DIR for a target checked on real images")
            gen = torch.Generator().manual_seed(0)
            batches, mode = [torch.randn((synthetic_images, *input_size), generator=gen)], NORMAL_CALIBRATION
    probe.start(original)
    inputs_s = clock() - start
    table = measure(setup, batches, calibration=mode, on_progress=on_progress, keep_fits=True)
    release_freed()  # the measurement's moments and candidates: the trials allocate other sizes
    measured = clock()
    budget, trials, aim = search(table, probe, keep, on_trial=on_trial)
    searched = clock()
    if aim < keep:
        note(f"no budget reaches {keep:g} on the {len(probe.inputs)} probe images: every layer at its dearest reached "
             f"{aim:.3f} (fp16 norms and biases can flip a probe image), so the target is that: the smallest file "
             "that reaches it")
    table.fits = None  # the trials' fits are not needed any more
    release_freed()
    missed, close = [], None
    while True:  # the reconstruction comes once, after the last fit: it is most of a fit's time
        result = fit_allocation(table, table.allocation(budget), budget, on_progress=on_progress, on_note=on_note)
        reached = probe.agreement(table.model)
        larger = refit_budget(budget, search_largest(table)) if reached < aim else None
        if larger is None or len(missed) >= MAX_REFITS:
            break
        if reached >= aim - REFIT_SLACK:
            close = dict(reached=round(reached, 4), slack=REFIT_SLACK)
            note(f"the fitted network agrees {reached:.3f} with the original on the probe, within {REFIT_SLACK:g} "
                 f"below the target {round(aim, 4):g}: not fitted again (a refit at {REFIT_STEP:g}x the bytes lands "
                 "further above the target than this is below it)")
            break
        missed.append(dict(budget=budget, fraction=round(budget / table.original_bytes, 4), reached=round(reached, 4)))
        note(f"the fitted network agrees {reached:.3f} with the original on the probe, below the target {round(aim, 4):g}: "
             f"fitting again at {larger / table.original_bytes:.3f}x the fp32 bytes (was {budget / table.original_bytes:.3f}x)")
        table = restored(table, model, include, exclude)
        budget = larger
    fitted = clock()
    if reconstruct_iters:
        reconstruct_fitted(table, result, reconstruct_iters, on_progress=on_progress, on_note=on_note)
        reached = probe.agreement(table.model)
    done = clock()
    info = dict(target=keep, probe=probe.kind, probe_images=len(probe.inputs), reached=round(reached, 4),
                met=reached >= keep, **({"ceiling": round(aim, 4)} if aim < keep else {}),
                budget_bytes=budget, fraction=round(budget / table.original_bytes, 4),
                trials=trials_dicts(trials, table.original_bytes), refits=missed,
                **({"close": close} if close else {}),
                seconds=dict(inputs=round(inputs_s, 1), candidates=round(measured - start - inputs_s, 1),
                             search=round(searched - measured, 1), fitting=round(fitted - searched, 1),
                             reconstruction=round(done - fitted, 1)))
    return KeepResult(result, probe.entry(reached), info)


def search_largest(table: Table) -> int:
    """The budget of every layer at its dearest candidate: what the search tries last."""
    return table.fixed + sum(4 * u.numel for u in table.unreached) + sum(
        max(c.bytes for c, _ in table.options[u.name]) for u in table.units)


def refit_budget(missed: int, largest: int) -> int | None:
    """Where to fit again after the network fitted at ``missed`` fell short: ``REFIT_STEP`` x larger
    (at most ``largest``); None when ``missed`` is already the largest. Not the next passing trial:
    that can lie far above (Lite2 --keep 0.95: 0.25x after a miss at 0.154x, more bytes than
    --keep 0.99 chose), and a lower target must never cost more bytes."""
    return None if missed >= largest else min(largest, int(REFIT_STEP * missed))


def restored(table: Table, model: nn.Module, include, exclude) -> Table:
    """``table`` for a fresh fit: ``model``'s submodules put back as they were before the first fit
    (copies of the original's, norms and biases rounded to fp16 as ``measure`` left them; the
    object the caller holds stays the same) and the units found again on them. Copied only when a
    refit needs it: no second copy of the network on every run. Spilled weights (no images: every
    layer was rounded in place, none replaced) are read back into the same layers."""
    if table.original is None:
        table.originals.restore(model)
        return table
    for name, child in table.original.named_children():
        setattr(model, name, copy.deepcopy(child))
    round_to_fp16(model.state_dict(), table.halves)
    by_name = {u.name: u for u in find_units(model, include, exclude)[0]}
    return replace(table, model=model, units=[by_name[u.name] for u in table.units])
