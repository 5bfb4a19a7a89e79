"""The Python API: what the CLI and users call.

    import dynconvert
    result = dynconvert.convert(model, ratio=0.25)       # converted nn.Module + per-layer stats
    dynconvert.save(result, "model.dyn")
    model = dynconvert.load("model.dyn")                 # a ready nn.Module
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn as nn

from .checkpoint import Source, build_torchvision, check_weights, load_weights, rebuild
from .convert import ConvertCallbacks, ConvertOptions, LayerStats, Skipped, convert_model, set_submodule
from .dynamics import DynSpec
from .dynfile import read_dyn, write_dyn
from .errors import DynError
from .fit import FitResult
from .layers import dense_target, dynamic_from_meta, layer_config


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
    on_progress=None,
    on_note=None,
    **overrides,
) -> Conversion:
    """Convert ``model``'s Linear/Conv2d layers in place; keyword overrides set ConvertOptions fields.

    ``calib``: optional iterable of input batches; each layer is then fitted to its outputs on
    them after its weights (calibrated conversion).

    ``size`` (a fraction of the model's fp32 bytes) or ``target_bytes``: compress to that many
    bytes on disk instead of a uniform ratio, every layer's representation chosen by measured
    sensitivity and fitted to the original's outputs (budget.py). Without ``calib`` (or with
    ``data_free=True``) the inputs are synthesized from the model's BatchNorm statistics.
    ``on_progress(phase, done, total)`` follows the long phases.
    """
    opts = replace(options or ConvertOptions())
    unknown = [k for k in overrides if k not in opts.to_dict()]
    if unknown:
        raise TypeError(f"convert() got an unknown option {unknown[0]!r}")
    opts = replace(opts, **overrides)
    if size is None and target_bytes is None:
        if data_free:
            raise DynError("data-free conversion needs a byte budget (--size or --target-bytes)")
        model, layers, skipped = convert_model(model, opts, callbacks, done, calib=calib)
        return Conversion(model.eval(), layers, skipped, opts, source or Source("module"), input_size=tuple(input_size))
    return _convert_to_budget(model, opts, size, target_bytes, calib, data_free, synthetic_images, source,
                              tuple(input_size), "ratio" in overrides, on_progress, on_note)


def _convert_to_budget(model, opts, size, target_bytes, calib, data_free, synthetic_images, source, input_size,
                       ratio_given, on_progress, on_note) -> Conversion:
    from .budget import convert_to_budget, model_bytes

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
        from .synth import bn_synthetic_batches, has_batchnorm, synthesis_size

        if not has_batchnorm(model):
            raise DynError(f"{type(model).__name__} has no BatchNorm layers, so data-free calibration cannot synthesize "
                           "inputs; pass calibration images (--calib DIR)")

        def batches():
            if on_note:
                on_note("no calibration images: synthesizing inputs from the model's BatchNorm statistics (data-free)")
            step = (lambda s, n, loss: on_progress("synthesizing inputs", s, n)) if on_progress else None
            return bn_synthetic_batches(model, images=synthetic_images, input_size=synthesis_size(model, input_size),
                                        on_step=step)

        mode = "synthetic (BatchNorm statistics)"
    else:
        batches = [b[0] if isinstance(b, (tuple, list)) else b for b in calib]
        if not batches or sum(len(b) for b in batches) == 0:
            raise DynError("the calibration data gave no images; pass a folder with readable images")
        mode = "images"
    result = convert_to_budget(model, target, batches, calibration=mode, include=opts.include, exclude=opts.exclude,
                               min_params=opts.min_params, on_progress=on_progress)
    conv = Conversion(model.eval(), result.layers, result.skipped, opts, source or Source("module"),
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
    }


def save(conv: Conversion, path: str | Path) -> None:
    """Write the conversion as a .dyn file (atomically)."""
    write_dyn(path, conv.model.state_dict(), dyn_metadata(conv), quantized=conv.quantized)


def read_meta(path: str | Path) -> dict:
    return read_dyn(path)[1]


def load(
    path: str | Path,
    *,
    model: nn.Module | None = None,
    factory: str | None = None,
    verify: bool = True,
    weight_free: bool = False,
    on_note=None,
) -> nn.Module:
    """A ready nn.Module (eval mode) from a .dyn file.

    ``model``: an instance of the original architecture (needed for files converted from a
    pickled module). ``factory``: the ``pkg.module:factory`` the file was converted with; a
    factory is never imported on the file's word alone. ``weight_free``: run converted layers
    from their states (``weightfree.to_weight_free``, inference only); layers whose metric/kernel
    has no weight-free path stay materialized and ``on_note`` (e.g. ``print``) is told which.
    """
    tensors, meta = read_dyn(path, verify=verify)
    net = build_from(tensors, meta, model=model, factory=factory, path=path)
    if weight_free:
        from .weightfree import to_weight_free

        net, kept = to_weight_free(net)
        for name, reason in kept:
            if on_note:
                on_note(f"{name}: runs materialized ({reason})")
    return net


def build_from(tensors: dict[str, torch.Tensor], meta: dict, *, model=None, factory=None, path="file") -> nn.Module:
    try:
        source = Source.from_dict(meta["source"])
    except (KeyError, TypeError, AttributeError):
        raise DynError(f"{path}: metadata 'source' is malformed (corrupt file)") from None
    if model is None and source.kind == "torchvision":
        n = source.num_classes
        if not isinstance(source.arch, str) or not (n is None or (type(n) is int and n >= 1)):
            raise DynError(f"{path}: metadata 'source' is malformed (corrupt file)")
        # Rehearse on the meta device first: a file's metadata cannot make us allocate a model
        # bigger than the tensors the file really holds.
        _assemble(build_torchvision(source.arch, n, device="meta"), tensors, meta, path)
    return _assemble(rebuild(source, model=model, factory=factory), tensors, meta, path).eval()


def _assemble(net: nn.Module, tensors: dict[str, torch.Tensor], meta: dict, path) -> nn.Module:
    """Swap in the recorded converted layers and load the tensors; every shape is checked first."""
    real = not any(p.is_meta for p in net.parameters())
    for name, info in meta["layers"].items():
        try:
            old = dense_target(net, name)
        except AttributeError:
            raise DynError(f"{path}: converted layer {name!r} does not exist in the rebuilt model") from None
        try:
            with torch.device("meta"):  # shapes from the metadata are checked before anything is allocated
                new = dynamic_from_meta(info["kind"], info["config"], DynSpec.from_dict(info["spec"]))
        except (KeyError, TypeError, ValueError, OverflowError, AttributeError, RuntimeError) as e:
            raise DynError(f"{path}: layer {name!r} has invalid metadata ({e})") from None
        want = tuple(getattr(old, "weight", torch.empty(0)).shape)
        if want != tuple(new.weight_shape):
            raise DynError(f"{path}: layer {name!r} has shape {tuple(new.weight_shape)} but the model's is {want}")
        if real:
            new = dynamic_from_meta(info["kind"], info["config"], DynSpec.from_dict(info["spec"]))
        set_submodule(net, name, new)
    (load_weights if real else check_weights)(net, tensors, f"the model rebuilt from {path}")
    return net


def verify(path: str | Path, *, factory: str | None = None) -> dict:
    """Check a .dyn completely: header, metadata, layer shapes, checksum, finite states, and (when
    the architecture can be rebuilt without running code from elsewhere) that the tensors fit it.

    Returns a summary; raises DynError naming the first problem.
    """
    tensors, meta = read_dyn(path, verify=True)
    for name, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise DynError(f"{path}: tensor {name} contains NaN or Inf")
    source = meta["source"]
    rebuilt = None
    if source.get("kind") == "torchvision" or (source.get("kind") == "factory" and factory is not None):
        build_from(tensors, meta, factory=factory, path=path)
        rebuilt = source.get("arch") or source.get("factory")
    return {
        "format_version": meta["format_version"],
        "layers": len(meta["layers"]),
        "tensors": len(tensors),
        "tensors_sha256": meta["tensors_sha256"],
        "rebuilt": rebuilt,
        "source": source,
    }


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
    on_progress=None,
) -> Conversion:
    """Checkpoint file -> .dyn file: what ``dynconvert convert`` does.

    ``calib``: a ``--data`` source ('digits', an image folder, ...) for calibrated conversion.
    Each finished layer's fit is saved in ``<out>.partial/`` (see resume.py); ``resume=True`` reuses
    the fits an interrupted run saved there. Without ``resume`` an existing partial folder is
    refused unless ``force`` (which discards it).
    """
    from . import resume as rs
    from .checkpoint import load_model
    from .convert import plan
    from .fileio import check_output_path, sha256_file

    out = check_output_path(out, force)
    options.validate()
    budgeted = size is not None or target_bytes is not None
    if budgeted and resume:
        raise DynError("--resume is not available with --size/--target-bytes; rerun the conversion")
    calib_images = calib_images or (256 if budgeted else 512)
    folder = rs.partial_dir(out)
    if folder.exists() and not resume:
        if not force:
            raise DynError(f"{folder} holds the finished layers of an interrupted conversion; pass --resume to reuse "
                           "them, or --force to start over")
        rs.remove(folder)
    loaded = load_model(checkpoint, arch=arch, model=model, trust_pickle=trust_pickle)
    for note in loaded.notes:
        on_note(note)
    batches = None
    if calib is not None:
        from .data import calibration_batches

        batches = calibration_batches(calib, loaded.source.to_dict(), input_size, calib_images)
        on_note(f"calibrating on {sum(len(b) for b in batches)} images from {calib}")
    source_sha256 = sha256_file(checkpoint)
    if budgeted:
        conv = convert(loaded.model, options=options, source=loaded.source, input_size=input_size, calib=batches,
                       size=size, target_bytes=target_bytes, data_free=data_free, on_progress=on_progress,
                       on_note=on_note)
        conv.source_sha256 = source_sha256
        conv.source_bytes = Path(checkpoint).stat().st_size
        save(conv, out)
        return conv
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
    conv = convert(loaded.model, options=options, callbacks=saving, done=done, source=loaded.source, input_size=input_size,
                   calib=batches)
    conv.source_sha256 = source_sha256
    conv.source_bytes = Path(checkpoint).stat().st_size
    save(conv, out)
    rs.remove(folder)
    return conv


# Exports and the report live in export.py / report.py (they build on this module); these are the
# API names users call.


def build_report(source, **kwargs) -> dict:
    """The report dictionary of a .dyn path (see docs/report.md); kwargs as report.build_report."""
    from .report import build_report as run

    return run(source, **kwargs)


def export_onnx(source, out, **kwargs):
    """Materialized ONNX graph, verified in ONNX Runtime; kwargs as export.export_onnx."""
    from .export import export_onnx as run

    return run(source, out, **kwargs)


def export_pth(source, out, **kwargs):
    """Plain state dict the original architecture loads; kwargs as export.export_pth."""
    from .export import export_pth as run

    return run(source, out, **kwargs)


def export_safetensors(source, out, **kwargs):
    """Compact .dyn with states at another precision; kwargs as export.export_safetensors."""
    from .export import export_safetensors as run

    return run(source, out, **kwargs)
