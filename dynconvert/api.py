"""The Python API: what the CLI and users call.

    import dynconvert
    result = dynconvert.convert(model, ratio=0.25)       # converted nn.Module + per-layer stats
    dynconvert.save(result, "model.dyn")
    model = dynconvert.load("model.dyn")                 # a ready nn.Module

Longer than 350 lines: the two entry points (``convert`` for modules, ``convert_checkpoint`` for
files) and their per-mode branches; each branch is short and they share the argument checks.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch.nn as nn

from .dynfile import resume as rs
from .budget.pipeline import convert_to_budget, model_bytes
from .io.checkpoint import Source, load_model, source_of
from .dynamics.conversion import ConvertCallbacks, ConvertOptions, LayerStats, Skipped, convert_model, matches, plan
from .io.data import calibration_batches, check_input_size, probe_forward
from .dynfile.format import promised_bytes, write_dyn
from .errors import DynError
from .deploy.export import export_onnx, export_pth, export_safetensors
from .io.safetensors_io import OverBudget
from .io.fileio import check_output_path, sha256_file
from .dynamics.fit import FitResult
from .dynamics.layers import find_targets, layer_config
from .dynfile.rebuild import load, read_meta, verify
from .deploy.report import build_report
from .budget.augment import few_images_fallback
from .budget.reconstruct import RECONSTRUCT_ITERS, reconstruct_iters  # noqa: F401 (RECONSTRUCT_ITERS: benchmarks)
from .budget.keep import convert_to_keep
from .budget.probe import network_agreement
from .budget.synth import bn_synthetic_batches, has_batchnorm, synthesis_size
from .dynamics.workers import WorkerDied


# what users call; the exports, the report and the reader live in their own modules
__all__ = ["Conversion", "convert", "save", "load", "read_meta", "verify", "convert_checkpoint", "dyn_metadata",
           "build_report", "export_onnx", "export_pth", "export_safetensors"]

@dataclass
class Conversion:
    """A converted model and what the conversion measured."""

    model: nn.Module
    layers: list[LayerStats]
    skipped: list[Skipped]
    options: ConvertOptions
    source: Source = field(default_factory=lambda: Source("module"))
    source_sha256: str | None = None
    source_bytes: int | None = None
    input_size: tuple[int, int, int] = (3, 224, 224)
    quantized: dict[str, dict] = field(default_factory=dict)
    """State-dict tensor name -> {"bits": 4|8, "keep": [dims with their own scale]}: tensors the
    .dyn stores as integers (held in memory on their integer grid, see quant.py)."""
    budget: dict | None = None
    """How a byte budget was split (``--size``/``--target-bytes``): see budget.py."""
    network: dict | None = None
    """Top-1 agreement with the original on probe inputs: {"agreement", "images", "inputs"} (budget/probe.py)."""
    keep: dict | None = None
    """What ``--keep`` searched: target, probe kind, reached agreement, trials, time split (budget/keep.py)."""


def convert(
    model: nn.Module,
    *,
    options: ConvertOptions | None = None,
    callbacks: ConvertCallbacks | None = None,
    done: dict[str, FitResult] | None = None,
    source: Source | None = None,
    input_size: tuple[int, int, int] = (3, 224, 224),
    calib=None,
    size: float | None = None,
    target_bytes: int | None = None,
    data_free: bool = False,
    synthetic_images: int = 32,
    keep: float | None = None,
    probe: bool = False,
    reconstruct: int | None = None,
    on_progress=None,
    on_note=None,
    reserve: int = 0,
    saved=None,
    **overrides,
) -> Conversion:
    """Convert ``model``'s Linear/Conv2d layers in place; keyword overrides set ConvertOptions fields.

    ``calib``: optional iterable of input batches; each layer is then fitted to its outputs on
    them after its weights (calibrated conversion).

    ``size`` (a fraction of the model's fp32 bytes) or ``target_bytes``: compress to that many
    bytes on disk instead of a uniform ratio, every layer's representation chosen by measured
    sensitivity and fitted to the original's outputs (budget.py). Without ``calib`` (or with
    ``data_free=True``) the inputs are synthesized from the model's BatchNorm statistics.
    ``keep`` (0 < keep <= 1): instead, the smallest file whose top-1 agreement with the original on
    probe inputs is at least ``keep`` (budget/keep.py): ``calib`` is split into fitting images and
    held-apart probe images; without it both are synthesized.
    ``probe``: also measure the result's top-1 agreement with the original (``Conversion.network``;
    always done with ``keep``): on ``calib``, else on inputs synthesized from BatchNorm statistics,
    else on standard-normal inputs. ``reconstruct``: steps per block of the block-wise
    reconstruction that follows a budgeted fit (budget/reconstruct.py); 0 turns it off; None:
    ``RECONSTRUCT_ITERS`` with calibration images, 0 on synthetic inputs. ``reserve``: bytes of the
    budget kept free beyond the header estimate (``save`` refuses a file over its budget).
    ``saved``: a dynfile.resume.BudgetCheckpoint a ``size``/``target_bytes`` conversion saves its
    synthesized inputs and measured layers to, and resumes from (``convert_checkpoint`` passes one).
    ``on_progress(phase, done, total)`` follows the long phases.
    """
    opts = replace(options or ConvertOptions())
    unknown = [k for k in overrides if k not in opts.to_dict()]
    if unknown:
        raise TypeError(f"convert() got an unknown option {unknown[0]!r}")
    opts = replace(opts, **overrides)
    _check_include(model, opts.include)
    source = source or source_of(model)  # before any layer is replaced
    if keep is not None:
        return _convert_keep(model, opts, keep, calib, size, target_bytes, data_free, synthetic_images, source,
                             tuple(input_size), "ratio" in overrides, on_progress, on_note, reconstruct)
    original = None
    if probe:  # the original is kept for the probe, which runs after the conversion (errors come first)
        calib = None if calib is None else list(calib)  # read twice: by the fit and by the probe
        original = copy.deepcopy(model).eval()
    conv = _convert_mode(model, opts, callbacks, done, source, input_size, calib, size, target_bytes, data_free,
                         synthetic_images, "ratio" in overrides, on_progress, on_note, reconstruct, reserve, saved)
    if original is not None:
        conv.network = network_agreement(original, conv.model, calib, input_size, on_progress, on_note)
    return conv




def _convert_mode(model, opts, callbacks, done, source, input_size, calib, size, target_bytes, data_free,
                  synthetic_images, ratio_given, on_progress, on_note, reconstruct=None, reserve=0, saved=None) -> Conversion:
    if size is None and target_bytes is None:
        if data_free:
            raise DynError("data-free conversion needs a byte budget (--size or --target-bytes)")
        model, layers, skipped = convert_model(model, opts, callbacks, done, calib=calib)
        return Conversion(model.eval(), layers, skipped, opts, source, input_size=tuple(input_size))
    return _convert_to_budget(model, opts, size, target_bytes, calib, data_free, synthetic_images, source,
                              tuple(input_size), ratio_given, on_progress, on_note, reconstruct, reserve, saved)


def _convert_keep(model, opts, keep, calib, size, target_bytes, data_free, synthetic_images, source, input_size,
                  ratio_given, on_progress, on_note, reconstruct=None) -> Conversion:
    if size is not None or target_bytes is not None or ratio_given:
        raise DynError("--keep and --size/--target-bytes/--ratio each choose how small the file gets; give one of them")
    if not 0 < keep <= 1:
        raise DynError(f"--keep {keep} must be in (0, 1]: the top-1 agreement with the original to keep (e.g. 0.95)")
    if calib is not None and data_free:
        raise DynError("--data-free and --calib exclude each other: data-free synthesizes its own inputs")
    batches = None
    if calib is not None:
        batches = [b[0] if isinstance(b, (tuple, list)) else b for b in calib]
        if not batches or sum(len(b) for b in batches) == 0:
            raise DynError("the calibration data gave no images; pass a folder with readable images")
    res = convert_to_keep(model, keep, batches, input_size=input_size, include=opts.include, exclude=opts.exclude,
                          min_params=opts.min_params, group=opts.quant_group, synthetic_images=synthetic_images,
                          on_progress=on_progress,
                          on_note=on_note, reconstruct_iters=reconstruct_iters(reconstruct, batches is not None))
    return Conversion(model.eval(), res.budget.layers, res.budget.skipped, opts, source, input_size=input_size,
                      quantized=res.budget.quantized, budget=res.budget.summary, network=res.network, keep=res.keep)


def _check_include(model: nn.Module, patterns: list[str]) -> None:
    """Every --include pattern names at least one weight a layer kind finds (``layers.find_targets``,
    as ``plan`` and the budget's ``find_units`` do): a typo must not convert nothing."""
    names = [n for n, _, _ in find_targets(model)]
    for p in patterns:
        if not any(matches(n, [p]) for n in names):
            some = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
            raise DynError(f"--include {p!r} matches no Linear/Conv2d layer or attention projection of "
                           f"{type(model).__name__} (its layers: {some})")


def _convert_to_budget(model, opts, size, target_bytes, calib, data_free, synthetic_images, source, input_size,
                       ratio_given, on_progress, on_note, reconstruct=None, reserve=0, saved=None) -> Conversion:
    if size is not None and target_bytes is not None:
        raise DynError("give --size or --target-bytes, not both")
    if ratio_given:
        raise DynError("--size/--target-bytes and --ratio both set how small layers get; give one of them")
    if size is not None and not 0 < size < 1:
        raise DynError(f"--size {size} must be between 0 and 1 (a fraction of the original's bytes)")
    target = int(size * model_bytes(model)) if size is not None else int(target_bytes)
    if calib is not None and data_free:
        raise DynError("--data-free and --calib exclude each other: data-free synthesizes its own inputs")
    if calib is None:
        probe_forward(model, input_size)  # the synthesized inputs have this size
        if not has_batchnorm(model):
            raise DynError(f"{type(model).__name__} has no BatchNorm layers, so data-free calibration cannot synthesize "
                           "inputs; pass calibration images (--calib DIR)")

        def batches():
            if saved is not None and saved.inputs() is not None:
                return saved.inputs()
            if on_note:
                on_note("no calibration images: synthesizing inputs from the model's BatchNorm statistics (data-free)")
            step = (lambda s, n, loss: on_progress("synthesizing inputs", s, n)) if on_progress else None
            made = bn_synthetic_batches(model, images=synthetic_images, input_size=synthesis_size(model, input_size),
                                        on_step=step)
            if saved is not None:
                saved.save_inputs(made)
            return made

        mode = "synthetic (BatchNorm statistics)"
    else:
        batches = [b[0] if isinstance(b, (tuple, list)) else b for b in calib]
        if not batches or sum(len(b) for b in batches) == 0:
            raise DynError("the calibration data gave no images; pass a folder with readable images")
        batches = few_images_fallback(batches, on_note)
        mode = "images"
    iters = reconstruct_iters(reconstruct, mode == "images")
    result = convert_to_budget(model, target, batches, calibration=mode, include=opts.include, exclude=opts.exclude,
                               min_params=opts.min_params, group=opts.quant_group, reconstruct_iters=iters,
                               on_progress=on_progress, on_note=on_note, reserve=reserve, saved=saved)
    fallback = result.summary.get("per_channel_fallback")
    if fallback and on_note:
        on_note(f"--quant-group {opts.quant_group} does not divide the row length of {len(fallback)} layer(s) "
                f"({', '.join(fallback[:3])}{', ...' if len(fallback) > 3 else ''}): they use one scale per output channel")
    conv = Conversion(model.eval(), result.layers, result.skipped, opts, source,
                      input_size=input_size, quantized=result.quantized, budget=result.summary)
    return conv



def dyn_metadata(conv: Conversion) -> dict:
    layers = {}
    for s in conv.layers:
        kind, config = layer_config(conv.model.get_submodule(s.name))
        entry = dict(s.__dict__)
        entry.update(kind=kind, config=config)
        layers[s.name] = entry
    return {
        "source": conv.source.to_dict(),
        "source_sha256": conv.source_sha256,
        "source_bytes": conv.source_bytes,
        "input_size": list(conv.input_size),
        "options": conv.options.to_dict(),
        "layers": layers,
        "skipped": [s.__dict__ for s in conv.skipped],
        "budget": conv.budget,
    } | {k: v for k, v in (("network", conv.network), ("keep", conv.keep)) if v is not None}


def save(conv: Conversion, path: str | Path) -> None:
    """Write the conversion as a .dyn file (atomically). A budgeted one is measured once written and
    refused (OverBudget, nothing written) when over its budget."""
    write_dyn(path, conv.model.state_dict(), dyn_metadata(conv), quantized=conv.quantized,
              max_bytes=promised_bytes(conv.budget, conv.keep))


def convert_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    options: ConvertOptions,
    *,
    arch: str | None = None,
    model: str | None = None,
    trust_pickle: bool = False,
    force: bool = False,
    resume: bool = False,
    input_size: tuple[int, int, int] = (3, 224, 224),
    callbacks: ConvertCallbacks | None = None,
    on_note=print,
    calib: str | None = None,
    calib_images: int | None = None,
    size: float | None = None,
    target_bytes: int | None = None,
    data_free: bool = False,
    keep: float | None = None,
    reconstruct: int | None = None,
    on_progress=None,
) -> Conversion:
    """Checkpoint file -> .dyn file: what ``dynconvert convert`` does. Every mode ends with the
    network-level probe (``Conversion.network``, budget/probe.py); ``keep`` searches (budget/keep.py).

    ``calib``: a ``--data`` source ('digits', an image folder, ...) for calibrated conversion.
    Each finished layer's fit (with ``size``/``target_bytes``: the synthesized inputs and each
    layer's measured candidates) is saved in ``<out>.partial/`` (see resume.py); ``resume=True``
    reuses what an interrupted run saved there. Without ``resume`` an existing partial folder is
    refused unless ``force`` (which discards it).
    """
    out = check_output_path(out, force)
    options.validate()
    budgeted = size is not None or target_bytes is not None or keep is not None
    if keep is not None and resume:
        raise DynError("--resume is not available with --keep (its search keeps every candidate's fit in memory); "
                       "rerun the conversion, or resume a --size one")
    if calib_images is not None and calib_images < 1:
        raise DynError(f"--calib-images must be at least 1, got {calib_images}")
    calib_images = calib_images or (256 if budgeted else 512)
    folder = rs.partial_dir(out)
    if folder.exists() and not resume and not rs.saved(folder):
        rs.remove(folder)  # left empty by a run that failed before its first layer: nothing to keep
    if folder.exists() and not resume:
        if not force:
            raise DynError(f"{folder} holds the finished layers of an interrupted conversion; pass --resume to reuse "
                           "them, or --force to start over")
        rs.remove(folder)
    input_size = check_input_size(tuple(input_size))
    loaded = load_model(checkpoint, arch=arch, model=model, trust_pickle=trust_pickle)
    for note in loaded.notes:
        on_note(note)
    probe_forward(loaded.model, input_size)  # before any image is read or layer fitted
    batches = None
    if calib is not None:
        batches = calibration_batches(calib, loaded.source.to_dict(), input_size, calib_images)
        on_note(f"calibrating on {sum(len(b) for b in batches)} images from {calib}")
    source_sha256 = sha256_file(checkpoint)
    if budgeted:
        return _convert_checkpoint_budgeted(checkpoint, out, options, folder, source_sha256, loaded, batches,
                                            dict(arch=arch, model=model, trust_pickle=trust_pickle),
                                            dict(calib=calib, calib_images=calib_images, size=size, target_bytes=target_bytes,
                                                 data_free=data_free, keep=keep, reconstruct=reconstruct),
                                            input_size, resume, on_note, on_progress)
    # saved fits are reusable only under the same options, source and calibration set
    print_ = rs.fingerprint(options, source_sha256, dict(loaded.source.to_dict(), calib=calib, calib_images=calib_images))
    done: dict[str, FitResult] = {}
    if resume and folder.is_dir():
        done = rs.load_fits(folder, print_)
        rs.check_fits(done, plan(loaded.model, options)[0], folder)
        on_note(f"resumed {len(done)} finished layers from {folder}")
    elif resume:
        on_note(f"nothing to resume ({folder} does not exist); converting every layer")
    saving = rs.Checkpointing(callbacks, folder, print_, done)
    try:
        conv = convert(loaded.model, options=options, callbacks=saving, done=done, source=loaded.source,
                       input_size=input_size, calib=batches, probe=True, on_progress=on_progress, on_note=on_note)
    except BaseException as e:
        kept = rs.saved(folder)
        if not kept:
            rs.remove(folder)  # e.g. a full disk before the first layer was saved: nothing to resume from
        elif isinstance(e, WorkerDied):  # the rerun it suggests must not be refused for the kept layers
            layers = f"{kept} finished layer" + ("s" if kept > 1 else "")
            raise WorkerDied(f"{e}; add --resume to reuse the {layers} kept in {folder}") from None
        raise
    conv.source_sha256 = source_sha256
    conv.source_bytes = Path(checkpoint).stat().st_size
    save(conv, out)
    rs.remove(folder)
    return conv


def _convert_checkpoint_budgeted(checkpoint, out, options, folder, source_sha256, loaded, batches, how_loaded: dict,
                                 mode: dict, input_size, resume, on_note, on_progress) -> Conversion:
    """convert_checkpoint for --size/--target-bytes/--keep: the measured layers (and synthesized
    inputs) are saved in ``folder`` as they finish (not with --keep), so a killed run resumes; a file
    over its budget is converted once more with the overshoot kept free (the measurements reused)."""
    saved = None
    if mode["keep"] is None:
        saved = rs.BudgetCheckpoint(folder, rs.fingerprint(options, source_sha256, dict(loaded.source.to_dict(), **mode)),
                                    resume)
        if resume and (saved.units or saved.inputs() is not None):
            inputs = " and the synthesized inputs" if saved.inputs() is not None else ""
            on_note(f"resumed {len(saved.units)} measured layers{inputs} from {folder}")
        elif resume:
            on_note(f"nothing to resume ({folder} holds nothing); converting from the start")
    reserve = 0
    while True:
        try:
            conv = convert(loaded.model, options=options, source=loaded.source, input_size=input_size, calib=batches,
                           size=mode["size"], target_bytes=mode["target_bytes"], data_free=mode["data_free"],
                           keep=mode["keep"], probe=True, reconstruct=mode["reconstruct"], on_progress=on_progress,
                           on_note=on_note, reserve=reserve, saved=saved)
        except BaseException:
            if not rs.saved(folder):
                rs.remove(folder)  # nothing measured yet: nothing to resume from
            raise
        conv.source_sha256 = source_sha256
        conv.source_bytes = Path(checkpoint).stat().st_size
        start = time.perf_counter()
        try:
            save(conv, out)
        except OverBudget as e:
            if reserve:  # tightened once already
                raise
            reserve = e.size - e.limit + 1024  # the header took more than estimated: fit again with less room
            on_note(f"the file came out {e.size - e.limit:,} bytes over the budget; converting again with "
                    f"{reserve:,} bytes less for the layers")
            loaded = load_model(checkpoint, **how_loaded)
            continue
        rs.remove(folder)
        if conv.keep is not None:  # printed, not stored: the file is written by then
            conv.keep["seconds"]["writing"] = round(time.perf_counter() - start, 1)
        return conv
