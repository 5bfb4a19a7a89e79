"""Rows of the real-model benchmark for the weight-only int4 baselines: GPTQ of every layer
(group-wise, as dynconvert's int4 candidate) and int4 of every layer followed by the block-wise
reconstruction that ``--size`` runs (budget/reconstruct.py)."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn as nn

from benchmarks.real_built import Built, dyn_read_back, progress_printer
from benchmarks.real_families import Bench, torch_predictor


def build_gptq4(bench: Bench, stem: Path) -> Built:
    """int4 GPTQ of every Conv2d/Linear (depthwise too) on the calibration crops, the grid of
    dynconvert's int4 candidate (one fp16 scale per ~64 inputs, ``quant.pick_group``), layers
    rounded in execution order in 8 stages, each on the inputs of the network rounded so far
    (GPTQ's protocol); norms and biases fp32 as in the int4 RTN row."""
    import dynconvert
    from dynconvert.api import Conversion
    from dynconvert.budget.outputs import collect_moments, execution_order, gptq_quantize
    from dynconvert.budget.pipeline import find_units
    from dynconvert.budget.quant import pick_group
    from dynconvert.dynamics.conversion import ConvertOptions

    model, original = copy.deepcopy(bench.family.original), bench.family.original
    units, _ = find_units(model)
    names = execution_order(model, [u.name for u in units], bench.family.calib[:1])
    layers = {u.name: u.parts[0].layer for u in units}
    batches, quantized, per_stage = bench.calib_batches(), {}, -(-len(names) // 8)
    for s in range(0, len(names), per_stage):
        stage = names[s:s + per_stage]
        moments = collect_moments(stage, batches, model, original, stop_after=stage[-1])
        for name in stage:
            w = layers[name].weight
            g = pick_group(w[0].numel())
            q, scale = gptq_quantize(original.get_submodule(name).weight.detach().reshape(w.shape[0], -1),
                                     moments[name].own, 4, group=g)
            with torch.no_grad():
                w.copy_(q.reshape(w.shape))
            quantized[f"{name}.weight"] = {"bits": 4, "group": g, "scale": scale}
    conv = Conversion(model, [], [], ConvertOptions(), quantized=quantized)
    path = stem.with_suffix(".dyn")
    dynconvert.save(conv, path)
    return Built(path, torch_predictor(dynconvert.load(path, model=bench.family.fresh())), dict(gptq4_layers=len(names)))


def int4_everywhere(bench: Bench, gptq: bool):
    """(model, quantized) with every Conv2d/Linear weight at int4, one scale per output channel:
    round-to-nearest at max |w| / 7, or GPTQ on the calibration crops' input moments (clipping searched)."""
    from dynconvert.budget.outputs import collect_moments, gptq_quantize
    from dynconvert.budget.quant import fake_quant, scales_for

    model = copy.deepcopy(bench.family.original)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    moments = collect_moments(list(layers), bench.calib_batches(), model) if gptq else {}
    quantized = {}
    with torch.no_grad():
        for name, layer in layers.items():
            w = layer.weight
            if gptq:
                q, scale = gptq_quantize(w.reshape(len(w), -1), moments[name].own, 4)
                w.copy_(q.reshape(w.shape))
            else:
                scale = scales_for(w, 4, (0,)).reshape(len(w), 1)
                w.copy_(fake_quant(w, 4, (0,)))
            quantized[f"{name}.weight"] = {"bits": 4, "keep": [0], "scale": scale}
    return model, quantized


def build_int4_recon(gptq: bool):
    """int4 of every layer (RTN or GPTQ), then block-wise reconstruction on the calibration crops
    (budget/reconstruct.py, the same stage ``--size`` runs): a baseline at int4's bytes."""
    def build(bench: Bench, stem: Path) -> Built:
        import dynconvert
        from dynconvert.api import Conversion, RECONSTRUCT_ITERS
        from dynconvert.budget.reconstruct import reconstruct_after_fit
        from dynconvert.dynamics.conversion import ConvertOptions

        model, quantized = int4_everywhere(bench, gptq)
        summary = reconstruct_after_fit(model, bench.family.original, bench.calib_batches(), quantized,
                                        iters=RECONSTRUCT_ITERS, on_progress=progress_printer("reconstruction"))
        conv = Conversion(model, [], [], ConvertOptions(), quantized=quantized)
        built = dyn_read_back(bench, conv, stem.with_suffix(".dyn"))
        built.extra.update(reconstruction=summary)
        return built

    return build
