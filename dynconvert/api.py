"""The Python API: what the CLI and users call.

    import dynconvert
    result = dynconvert.convert(model, ratio=0.25)       # converted nn.Module + per-layer stats
    dynconvert.save(result, "model.dyn")
    model = dynconvert.load("model.dyn")                 # a ready nn.Module
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from .checkpoint import Source, load_weights, rebuild
from .convert import ConvertCallbacks, ConvertOptions, LayerStats, Skipped, convert_model, set_submodule
from .dynamics import DynSpec, dynamic_from_meta, layer_config
from .dynfile import read_dyn, write_dyn
from .errors import DynError
from .fit import FitResult


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


def convert(
    model: nn.Module,
    *,
    options: ConvertOptions | None = None,
    callbacks: ConvertCallbacks | None = None,
    done: dict[str, FitResult] | None = None,
    source: Source | None = None,
    input_size: tuple[int, int, int] = (3, 224, 224),
    calib=None,
    **overrides,
) -> Conversion:
    """Convert ``model``'s Linear/Conv2d layers in place; keyword overrides set ConvertOptions fields.

    ``calib``: optional iterable of input batches; each layer is then fitted to its outputs on
    them after its weights (calibrated conversion).
    """
    opts = options or ConvertOptions()
    for key, value in overrides.items():
        if not hasattr(opts, key):
            raise TypeError(f"convert() got an unknown option {key!r}")
        setattr(opts, key, value)
    model, layers, skipped = convert_model(model, opts, callbacks, done, calib=calib)
    return Conversion(model.eval(), layers, skipped, opts, source or Source("module"), input_size=tuple(input_size))


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
    }


def save(conv: Conversion, path: str | Path) -> None:
    """Write the conversion as a .dyn file (atomically)."""
    write_dyn(path, conv.model.state_dict(), dyn_metadata(conv))


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
    except (KeyError, TypeError):
        raise DynError(f"{path}: metadata 'source' is malformed (corrupt file)") from None
    net = rebuild(source, model=model, factory=factory)
    for name, info in meta["layers"].items():
        try:
            old = net.get_submodule(name)
        except AttributeError:
            raise DynError(f"{path}: converted layer {name!r} does not exist in the rebuilt model") from None
        try:
            new = dynamic_from_meta(info["kind"], info["config"], DynSpec.from_dict(info["spec"]))
        except (KeyError, TypeError, ValueError) as e:
            raise DynError(f"{path}: layer {name!r} has invalid metadata ({e})") from None
        if tuple(old.weight.shape) != tuple(new.weight_shape):
            raise DynError(f"{path}: layer {name!r} has shape {tuple(new.weight_shape)} but the model's is {tuple(old.weight.shape)}")
        set_submodule(net, name, new)
    load_weights(net, tensors, f"the model rebuilt from {path}")
    return net.eval()


def convert_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    options: ConvertOptions,
    *,
    arch: str | None = None,
    model: str | None = None,
    trust_pickle: bool = False,
    force: bool = False,
    input_size: tuple[int, int, int] = (3, 224, 224),
    callbacks: ConvertCallbacks | None = None,
    on_note=print,
    calib: str | None = None,
    calib_images: int = 512,
) -> Conversion:
    """Checkpoint file -> .dyn file: what ``dynconvert convert`` does.

    ``calib``: a ``--data`` source ('digits', an image folder, ...) for calibrated conversion.
    """
    from .checkpoint import load_model
    from .fileio import check_output_path, sha256_file

    out = check_output_path(out, force)
    loaded = load_model(checkpoint, arch=arch, model=model, trust_pickle=trust_pickle)
    for note in loaded.notes:
        on_note(note)
    batches = None
    if calib is not None:
        from .data import calibration_batches

        batches = calibration_batches(calib, loaded.source.to_dict(), input_size, calib_images)
        on_note(f"calibrating on {sum(len(b) for b in batches)} images from {calib}")
    conv = convert(loaded.model, options=options, callbacks=callbacks, source=loaded.source, input_size=input_size, calib=batches)
    conv.source_sha256 = sha256_file(checkpoint)
    conv.source_bytes = Path(checkpoint).stat().st_size
    save(conv, out)
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
