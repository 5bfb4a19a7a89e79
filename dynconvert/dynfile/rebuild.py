"""From a .dyn file back to an nn.Module: the one place .dyn files are read.

A .dyn holds states and metadata, never code, so rebuilding needs the original architecture:

- torchvision (``source.kind == "torchvision"``): rebuilt from the recorded builder name;
- a factory (``--model pkg.mod:fn``): imported only when the caller names the same factory;
- anything else (a pickled module, TorchScript, a module converted in Python): the caller passes
  the original it was converted from (``--original FILE``, whose sha256 must match the one the
  conversion recorded) or an instance of the architecture (``model=``).

Trust rule: a .dyn alone never unpickles or imports anything; the original file is unpickled only
with ``trust_pickle`` (``--trust-pickle``), as everywhere else.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn as nn

from ..io.checkpoint import Source, build_torchvision, check_weights, load_model, load_weights, rebuild
from ..dynamics.modules import DynamicsLayer, DynSpec, set_submodule
from .format import read_dyn
from ..errors import DynError
from ..io.fileio import expect_dyn, sha256_file, sniff
from ..dynamics.layers import dense_target, dynamic_from_meta
from ..dynamics.metrics import weight_free_path
from ..dynamics.weightfree import to_weight_free, vectors_per_call


def open_dyn(path: str | Path, verify: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata) of a .dyn; a checkpoint, ONNX or text file given instead is named for
    what it is (``fileio.expect_dyn``)."""
    expect_dyn(path)
    return read_dyn(path, verify=verify)


def read_meta(path: str | Path) -> dict:
    return open_dyn(path)[1]


def is_dyn(path: str | Path) -> bool:
    """Whether ``path`` is a .dyn (by name, or a .safetensors file carrying dynconvert metadata)."""
    path = Path(path)
    if path.suffix == ".dyn":
        return True
    return path.suffix == ".safetensors" and path.is_file() and sniff(path) == "dyn"  # the header alone


def original_model(original: str | Path, meta: dict, *, factory: str | None = None, trust_pickle: bool = False,
                   path="file") -> nn.Module:
    """The original model a .dyn was converted from, read from ``original`` (the file given to
    ``convert``); its sha256 must be the one recorded at conversion."""
    original = Path(original)
    recorded = meta.get("source_sha256")
    if not original.is_file():
        raise DynError(f"--original {original}: no such file; give the checkpoint {path} was converted from")
    if recorded is not None and sha256_file(original) != recorded:
        raise DynError(f"--original {original} is not the file {path} was converted from (its sha256 differs from the "
                       "one recorded at conversion); give that exact file")
    source = Source.from_dict(meta["source"])
    return load_model(original, arch=source.arch if source.kind == "torchvision" else None,
                      model=factory, trust_pickle=trust_pickle).model


def build_from(tensors: dict[str, torch.Tensor], meta: dict, *, model: nn.Module | None = None,
               factory: str | None = None, original: str | Path | None = None, trust_pickle: bool = False,
               path="file") -> nn.Module:
    """The converted model (eval mode) from a .dyn's tensors and metadata; see the module docstring
    for what each source kind needs."""
    try:
        source = Source.from_dict(meta["source"])
    except (KeyError, TypeError, AttributeError):
        raise DynError(f"{path}: metadata 'source' is malformed (corrupt file)") from None
    if model is None and original is not None:
        model = original_model(original, meta, factory=factory, trust_pickle=trust_pickle, path=path)
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


def load(path: str | Path, *, model: nn.Module | None = None, factory: str | None = None,
         original: str | Path | None = None, trust_pickle: bool = False, verify: bool = True,
         weight_free: bool | str = False, on_note=None) -> nn.Module:
    """A ready nn.Module (eval mode) from a .dyn file: ``dynconvert.load``.

    ``model``: an instance of the original architecture; ``original``: the file the .dyn was
    converted from (with ``trust_pickle`` when it is a pickled module or TorchScript);
    ``factory``: the ``pkg.module:factory`` the file was converted with (a factory is never imported
    on the file's word alone). ``weight_free``: run converted layers from their states
    (``weightfree.to_weight_free``, inference only) where that is faster: True keeps an L1 layer
    materialized where ``fused.layer_path``'s cost model predicts the dense product faster (one
    input at the file's input size: a probe forward counts each layer's vectors per call); "all"
    runs every layer that has a weight-free path from its states. Layers that stay materialized
    (no path for their metric/kernel, or predicted slower) are told to ``on_note`` (e.g. ``print``).
    """
    if weight_free not in (False, True, "all"):
        raise DynError(f"weight_free={weight_free!r}: use False, True (where predicted faster) or 'all'")
    tensors, meta = open_dyn(path, verify=verify)
    net = build_from(tensors, meta, model=model, factory=factory, original=original, trust_pickle=trust_pickle,
                     path=path)
    if weight_free:
        vectors = None
        if weight_free != "all" and any(isinstance(m, DynamicsLayer) and weight_free_path(m.spec.metric, m.spec.kernel) == "l1"
                                        for m in net.modules()):  # only the L1 path has a cost model
            vectors = vectors_per_call(net, tuple(meta.get("input_size") or (3, 224, 224)))
        net, kept = to_weight_free(net, vectors)
        for name, reason in kept:
            if on_note:
                on_note(f"{name}: runs materialized ({reason})")
    return net


def open_converted(source, *, model=None, factory=None, original=None, trust_pickle=False) -> tuple[nn.Module, dict]:
    """(converted module, metadata) from a .dyn path, or an already converted module (metadata {})."""
    if isinstance(source, nn.Module):
        return source.eval(), {}
    tensors, meta = open_dyn(source)
    net = build_from(tensors, meta, model=model, factory=factory, original=original, trust_pickle=trust_pickle,
                     path=source)
    return net, meta


def load_any(path: str | Path, *, factory: str | None = None, arch: str | None = None, original=None,
             trust_pickle: bool = False, input_size=None) -> tuple[nn.Module, dict | None, dict, tuple]:
    """(model, .dyn metadata or None, source dict, input size) of a .dyn or an original checkpoint."""
    path = Path(path)
    if is_dyn(path):
        if not path.is_file():
            raise DynError(f"{path}: no such file")
        model, meta = open_converted(path, factory=factory, original=original, trust_pickle=trust_pickle)
        return model, meta, meta["source"], tuple(input_size or meta.get("input_size", (3, 224, 224)))
    loaded = load_model(path, arch=arch, model=factory, trust_pickle=trust_pickle)
    return loaded.model, None, loaded.source.to_dict(), tuple(input_size or (3, 224, 224))


def materialized(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every converted layer replaced by its dense twin: the original
    architecture (``corrected`` layers excepted: their forward is already a dense quantized weight
    and a thin correction)."""
    dense = copy.deepcopy(model)
    # a quantized weight with a state correction stays as it is: its correction is two thin products
    for name in [n for n, m in dense.named_modules() if isinstance(m, DynamicsLayer) and not hasattr(m, "base")]:
        set_submodule(dense, name, dense.get_submodule(name).to_dense())
    return dense.eval()


def verify(path: str | Path, *, factory: str | None = None, original: str | Path | None = None,
           trust_pickle: bool = False) -> dict:
    """Check a .dyn completely: header, metadata, layer shapes, checksum, finite states, and (when
    the architecture can be rebuilt: torchvision, or with the factory / original given) that the
    tensors fit it.

    Returns a summary; raises DynError naming the first problem.
    """
    tensors, meta = open_dyn(path, verify=True)
    for name, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise DynError(f"{path}: tensor {name} contains NaN or Inf")
    source = meta["source"]
    rebuilt = None
    if original is not None or source.get("kind") == "torchvision" or (source.get("kind") == "factory" and factory is not None):
        build_from(tensors, meta, factory=factory, original=original, trust_pickle=trust_pickle, path=path)
        rebuilt = source.get("arch") or source.get("factory") or f"the original {Path(original).name}"
    return {
        "format_version": meta["format_version"],
        "layers": len(meta["layers"]),
        "tensors": len(tensors),
        "tensors_sha256": meta["tensors_sha256"],
        "rebuilt": rebuilt,
        "source": source,
    }
