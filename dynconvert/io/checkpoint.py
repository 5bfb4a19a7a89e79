"""Reading what users have: state dicts in .pth/.pt/.safetensors, wrappers, arch inference, trust.

Trust rule: a checkpoint is read weights-only (no code runs) unless the user passes
``trust_pickle=True`` (``--trust-pickle``). Only then are whole pickled modules and TorchScript
files loaded, because unpickling can run arbitrary code.

Longer than 350 lines: weights-only reading, architecture inference and the rebuild of every source kind.
"""

from __future__ import annotations

import contextlib
import functools
import pickle
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import DynError, first_line
from .allocator import release_freed
from .factories import TIMM, cwd_importable, import_factory
from .fileio import sniff
from .safetensors_io import read_safetensors

WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "network")
TRUST_HINT = "loading it would run code from the file; pass --trust-pickle only if you trust its source"


@dataclass
class Source:
    """Where a model came from, recorded in the .dyn so it can be rebuilt."""

    kind: str  # "torchvision" | "factory" | "module"
    arch: str | None = None
    num_classes: int | None = None
    factory: str | None = None
    module_class: str | None = None  # "module" sources: the class, named in messages only (never imported)

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}

    @classmethod
    def from_dict(cls, d: dict) -> "Source":
        cls_name = d.get("module_class")
        return cls(d["kind"], d.get("arch"), d.get("num_classes"), d.get("factory"),
                   cls_name if isinstance(cls_name, str) else None)


def source_of(model: nn.Module) -> Source:
    """How an in-memory model can be rebuilt: by its torchvision builder when it is a torchvision
    model (matched by its keys and shapes, so the .dyn rebuilds with no extra argument), else as a
    "module" that needs the original (or an instance) to rebuild."""
    cls = type(model)
    if cls.__module__.startswith("torchvision.models."):
        try:
            arch, num_classes = infer_arch(model.state_dict(), module=cls.__module__)
        except DynError:
            arch = None  # built with other arguments than any builder's: rebuild needs the module
        # the same keys and shapes are not enough: a swapped activation or block must not be rebuilt away
        if arch and _layout(build_torchvision(arch, num_classes, device="meta")) == _layout(model):
            return Source("torchvision", arch=arch, num_classes=num_classes)
    return Source("module", module_class=f"{cls.__module__}.{cls.__qualname__}")


def _layout(model: nn.Module) -> list[tuple[str, type]]:
    return [(name, type(m)) for name, m in model.named_modules()]


@dataclass
class Loaded:
    model: nn.Module
    source: Source
    notes: list[str] = field(default_factory=list)


def _check_file(path: Path) -> str | None:
    """Refuse what is not a checkpoint, saying what it is; returns fileio.sniff's kind."""
    if not path.exists():
        raise DynError(f"{path}: no such file")
    if path.is_dir():
        raise DynError(f"{path} is a directory, not a checkpoint file")
    if path.stat().st_size == 0:
        raise DynError(f"{path} is empty; it is not a checkpoint")
    kind = sniff(path) if path.suffix != ".safetensors" else "safetensors"
    if kind == "onnx":
        raise DynError(f"{path} is an ONNX model; dynconvert converts PyTorch checkpoints: give the .pth/.safetensors "
                       "it was exported from (ONNX graphs cannot be turned back into a PyTorch module)")
    if kind == "dyn":
        raise DynError(f"{path} is a .dyn file, already converted; use report, eval, finetune or export on it")
    if kind == "text":
        raise DynError(f"{path} is a text file, not a readable PyTorch checkpoint; give a state dict saved with "
                       "torch.save (.pth/.pt) or a .safetensors file")
    if kind is None:
        raise DynError(f"{path} is not a readable PyTorch checkpoint: neither a zip archive nor a pickle (what "
                       "torch.save writes) nor safetensors")
    return kind


def _check_zip(path: Path) -> None:
    """Check a zip-based checkpoint before torch reads it: the sizes its members declare (a small
    file must not make us inflate gigabytes) and every member's CRC (torch checks none, so a
    flipped byte would otherwise load as a silently different weight)."""
    try:
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
            declared = sum(i.file_size for i in infos)
            if declared > 16 * path.stat().st_size + (64 << 20):
                raise DynError(f"{path}: its zip members declare {declared:,} bytes, far more than the file holds; refusing to inflate it")
            bad = z.testzip()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, NotImplementedError) as e:
        raise DynError(f"{path} is a damaged zip archive; it is truncated or corrupt ({first_line(e)})") from None
    if bad is not None:
        raise DynError(f"{path}: member {bad} fails its CRC check; the file is corrupt (re-download it)")


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.split("/", 1)[-1].startswith("code/") or n.endswith("/constants.pkl") for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def read_checkpoint(path: str | Path, trust_pickle: bool = False) -> dict[str, torch.Tensor] | nn.Module:
    """A state dict (weights-only) or, with ``trust_pickle``, possibly a whole module."""
    path = Path(path)
    if _check_file(path) == "safetensors":  # also under another suffix
        tensors, _ = read_safetensors(path)
        return unwrap_state_dict(tensors)
    if zipfile.is_zipfile(path):
        _check_zip(path)
    if _is_torchscript(path):
        if not trust_pickle:
            raise DynError(f"{path} is a TorchScript file; {TRUST_HINT}")
        try:
            return torch.jit.load(str(path), map_location="cpu")
        except Exception as e:  # torch raises many types for corrupt archives
            raise DynError(f"{path}: cannot load TorchScript ({first_line(e)})") from None
    try:
        with warnings.catch_warnings():  # torch warns about odd pickle protocols; our error says what matters
            warnings.simplefilter("ignore")
            with cwd_importable() if trust_pickle else contextlib.nullcontext():  # a pickle names its classes' modules
                obj = torch.load(path, map_location="cpu", weights_only=not trust_pickle, mmap=False)
    except pickle.UnpicklingError as e:
        if not trust_pickle and "weights_only" in str(e):
            raise DynError(f"{path} holds pickled Python objects (for example a whole nn.Module); {TRUST_HINT}") from None
        raise DynError(f"{path} is not a readable checkpoint ({first_line(e)})") from None
    except ModuleNotFoundError as e:
        raise DynError(f"{path}: the pickled module needs {e.name!r}, which cannot be imported; run from the folder "
                       "that holds it or add that folder to PYTHONPATH") from None
    except Exception as e:
        raise DynError(f"{path} is not a readable PyTorch checkpoint; it may be truncated or corrupt ({first_line(e)})") from None
    if isinstance(obj, nn.Module):
        return obj
    return unwrap_state_dict(obj, path)


def unwrap_state_dict(obj, path: Path | str = "checkpoint") -> dict[str, torch.Tensor] | nn.Module:
    """Strip common wrappers: {"state_dict": ...}, {"model": ...}, a ``module.`` (DDP) prefix."""
    for _ in range(3):
        if isinstance(obj, dict) and not _all_tensors(obj):
            inner = next((obj[k] for k in WRAPPER_KEYS if k in obj and isinstance(obj[k], (dict, nn.Module))), None)
            if inner is None:
                break
            obj = inner
        if isinstance(obj, nn.Module):
            return obj
    if not isinstance(obj, dict) or not obj:
        raise DynError(f"{path} does not contain a state dict (a mapping of names to tensors)")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if len(tensors) != len(obj):
        bad = next(k for k, v in obj.items() if not isinstance(v, torch.Tensor))
        raise DynError(f"{path}: entry {bad!r} is not a tensor; expected a state dict of tensors")
    if all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    return tensors


def _all_tensors(d: dict) -> bool:
    return bool(d) and all(isinstance(v, torch.Tensor) for v in d.values())


def check_finite(state: dict[str, torch.Tensor], path: Path | str) -> None:
    for k, v in state.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise DynError(f"{path}: tensor {k!r} contains NaN or Inf; fix or re-export the checkpoint")


# ---------------------------------------------------------------- torchvision architectures


def torchvision_archs() -> list[str]:
    import torchvision.models as tvm

    return sorted(tvm.list_models(module=tvm))


def build_torchvision(arch: str, num_classes: int | None = None, device: str | torch.device | None = None) -> nn.Module:
    import torchvision.models as tvm

    if arch not in torchvision_archs():
        raise DynError(f"unknown architecture {arch!r}; see `dynconvert archs` for the torchvision ones, or use --model pkg.module:factory")
    kwargs = {"weights": None}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if arch in ("googlenet", "inception_v3"):
        kwargs["init_weights"] = False
    meta = torch.device(device or "cpu").type == "meta"
    with torch.device(device or "cpu"), (_initializers_skipped() if meta else contextlib.nullcontext()):
        return tvm.get_model(arch, **kwargs)


@contextlib.contextmanager
def _initializers_skipped():
    """torch.nn.init's functions made no-ops: on the meta device they write nothing, yet they took
    three quarters of building the 80 torchvision models that architecture inference compares
    (13 s of every `convert` of a torchvision checkpoint without --arch, 2 s without them)."""
    names = [n for n in dir(nn.init) if n.endswith("_") and not n.startswith("_")]
    saved = {n: getattr(nn.init, n) for n in names}
    for n in names:
        setattr(nn.init, n, lambda *args, **kwargs: args[0] if args else kwargs.get("tensor"))
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(nn.init, n, f)


@functools.lru_cache(maxsize=None)
def _signature(arch: str) -> dict[str, tuple[int, ...]] | None:
    try:
        model = build_torchvision(arch, device="meta")
    except Exception:
        return None
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def infer_arch(state: dict[str, torch.Tensor], module: str | None = None) -> tuple[str, int]:
    """(arch, num_classes) of the torchvision classifier whose keys and shapes match ``state``.

    Only the classifier's output size may differ from the builder's default, which gives the class count.
    ``module``: only try builders defined there (e.g. ``torchvision.models.resnet``), which is quicker.
    """
    import torchvision.models as tvm

    shapes = {k: tuple(v.shape) for k, v in state.items()}
    archs = torchvision_archs()
    if module is not None:
        archs = [a for a in archs if tvm.get_model_builder(a).__module__ == module]
    for arch in archs:
        sig = _signature(arch)
        if sig is None or sig.keys() != shapes.keys():
            continue
        diff = [k for k in sig if sig[k] != shapes[k]]
        if not diff:
            return arch, _num_classes(build_torchvision(arch, device="meta"))
        # a different class count changes only the last layer's weight and bias
        if len(diff) <= 2 and all(len(shapes[k]) >= 1 and sig[k][1:] == shapes[k][1:] for k in diff):
            num_classes = shapes[diff[0]][0]
            cand = {k: tuple(v.shape) for k, v in build_torchvision(arch, num_classes, device="meta").state_dict().items()}
            if cand == shapes:
                return arch, num_classes
    raise DynError(
        "could not infer the architecture: the keys and shapes match no torchvision classifier; "
        "pass --arch NAME, or --model pkg.module:factory for your own model"
    )


def _num_classes(model: nn.Module) -> int:
    last = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return last[-1].out_features if last else 0


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    check_weights(model, state, what)
    model.load_state_dict(state, strict=True)


def check_weights(model: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """The state dict has exactly the model's keys and shapes (works on a meta-device model too)."""
    ours = model.state_dict()
    missing = [k for k in ours if k not in state]
    unexpected = [k for k in state if k not in ours]
    wrong = [k for k in ours if k in state and tuple(ours[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} with other shapes (e.g. {k}: {tuple(state[k].shape)} vs {tuple(ours[k].shape)})")
        raise DynError(f"the checkpoint's keys do not match {what}: {'; '.join(parts)}")


def load_model(
    path: str | Path, *, arch: str | None = None, model: str | None = None, trust_pickle: bool = False
) -> Loaded:
    """Load a checkpoint into a ready nn.Module (eval mode), recording how to rebuild it."""
    try:
        return _load_model(path, arch=arch, model=model, trust_pickle=trust_pickle)
    finally:
        release_freed()  # the checkpoint's tensors, copied into the model: a second copy of the weights otherwise


def _load_model(path, *, arch, model, trust_pickle) -> Loaded:
    obj = read_checkpoint(path, trust_pickle=trust_pickle)
    if isinstance(obj, torch.jit.ScriptModule):
        # compiled code has no nn.Linear/Conv2d to replace: convert its weights in an eager twin
        obj = _eager_state(obj, path, arch, model)
    elif isinstance(obj, nn.Module):
        check_finite(obj.state_dict(), path)
        return Loaded(obj.eval(), source_of(obj))
    check_finite(obj, path)
    if model is not None:
        net = import_factory(model, state=obj)
        load_weights(net, obj, f"--model {model}")
        # a timm model's class count is part of its architecture; a factory's own code fixes it
        classes = getattr(net, "num_classes", None) if model.startswith(TIMM) else None
        return Loaded(net.eval(), Source("factory", factory=model, num_classes=classes))
    if arch is not None:
        if arch not in torchvision_archs():
            build_torchvision(arch)  # raises the unknown-architecture error
        default = build_torchvision(arch, device="meta").state_dict()
        num_classes = _classes_from(default, obj, arch)
        net = build_torchvision(arch, num_classes)
        load_weights(net, obj, f"--arch {arch}")
        return Loaded(net.eval(), Source("torchvision", arch=arch, num_classes=num_classes))
    arch, num_classes = infer_arch(obj)
    net = build_torchvision(arch, num_classes)
    load_weights(net, obj, arch)
    return Loaded(net.eval(), Source("torchvision", arch=arch, num_classes=num_classes), [f"architecture inferred: {arch}, {num_classes} classes"])


def _eager_state(script: torch.jit.ScriptModule, path, arch: str | None, factory: str | None) -> dict:
    """The state dict of a TorchScript file, for an eager architecture to load (--arch, --model, or
    a torchvision one inferred from the keys and shapes)."""
    state = dict(script.state_dict())
    if arch is None and factory is None:
        try:
            infer_arch(state)
        except DynError:
            raise DynError(f"{path} is TorchScript, whose compiled layers cannot be rewritten, and its weights match no "
                           "torchvision architecture; pass --model pkg.module:factory that builds the same model in "
                           "Python") from None
    return state


def _classes_from(default: dict, state: dict, arch: str) -> int | None:
    """The class count a state dict implies for ``arch`` (its last weight's rows), if it differs."""
    last = [k for k in default if k.endswith("weight") and default[k].ndim == 2]
    if last and last[-1] in state and state[last[-1]].ndim == 2:
        return int(state[last[-1]].shape[0])
    return None


def rebuild(source: Source, model: nn.Module | None = None, factory: str | None = None) -> nn.Module:
    """An empty model of the recorded architecture, to be filled from a .dyn.

    A factory recorded in a file is never imported on the file's word: the caller must name the
    same factory (``--model``) or pass the model, since importing runs code.
    """
    if model is not None:
        return model
    if source.kind == "torchvision":
        return build_torchvision(source.arch, source.num_classes)
    if source.kind == "factory":
        if factory is None:
            raise DynError(f"this file was converted from --model {source.factory}; pass --model {source.factory} to load it (importing runs that code)")
        if factory != source.factory:
            raise DynError(f"--model {factory} differs from the factory recorded in the file ({source.factory})")
        return import_factory(factory, num_classes=source.num_classes)
    what = f"a {source.module_class} module" if source.module_class else "a pickled module"
    if factory is not None and source.module_class:
        # converted in Python from a module: a factory that builds the same class can hold it
        # (the .dyn's keys and shapes are checked against the built model when it is filled)
        built = import_factory(factory, num_classes=source.num_classes)
        made = f"{type(built).__module__}.{type(built).__qualname__}"
        if made != source.module_class:
            raise DynError(f"--model {factory} builds a {made}, but this file was converted from {what}")
        return built
    raise DynError(f"this file was converted from {what}, which a .dyn cannot rebuild alone; pass --original FILE "
                   "(the file it was converted from, with --trust-pickle if that is a pickle), --model "
                   "pkg.module:factory that builds the same class, or in Python "
                   "dynconvert.load(path, model=an_instance_of_the_original)")
