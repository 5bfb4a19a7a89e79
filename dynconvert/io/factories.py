"""Building the user's architecture by name: ``--model package.module:factory`` (its module found
in the current folder too, the way ``python -m`` finds it) and ``--model timm:NAME`` (a timm
architecture without pretrained weights; timm is the optional extra ``[timm]``).

Naming a factory is what trusts its code: a .dyn only records the name, and rebuilding it imports
the factory only when the caller names the same one again (checkpoint.rebuild).
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import os
import sys

import torch
import torch.nn as nn

from ..errors import DynError, first_line

TIMM = "timm:"


@contextlib.contextmanager
def cwd_importable():
    """Modules in the current directory import the way ``python -m`` finds them: the ``dynconvert``
    script's sys.path starts with its own bin/ folder, not with the folder it is run from."""
    cwd = os.getcwd()
    added = "" not in sys.path and cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
        importlib.invalidate_caches()
    try:
        yield
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)


def import_factory(spec: str, state: dict | None = None, num_classes: int | None = None) -> nn.Module:
    """Call ``package.module:factory`` (found in the current directory too) and check it returns an
    nn.Module; ``timm:NAME`` builds a timm architecture (see ``build_timm``)."""
    if spec.startswith(TIMM):
        return build_timm(spec, state, num_classes)
    if ":" not in spec:
        raise DynError(f"--model {spec!r} must look like package.module:factory (or timm:NAME)")
    mod_name, _, attr = spec.partition(":")
    try:
        with cwd_importable():
            module = importlib.import_module(mod_name)
    except Exception as e:
        raise DynError(f"--model {spec}: cannot import {mod_name} ({first_line(e)})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise DynError(f"--model {spec}: {mod_name} has no callable {attr!r}")
    model = fn()
    if not isinstance(model, nn.Module):
        raise DynError(f"--model {spec}: the factory returned {type(model).__name__}, not an nn.Module")
    return model


def build_timm(spec: str, state: dict | None = None, num_classes: int | None = None) -> nn.Module:
    """``timm:NAME`` or ``timm:NAME,key=value,...`` (keyword arguments of ``timm.create_model``, e.g.
    ``img_size=64``): the architecture without pretrained weights. The class count comes from
    ``num_classes``, else from the classifier rows in ``state``."""
    name, *args = spec[len(TIMM):].split(",")
    try:
        import timm
    except ImportError:
        raise DynError(f"--model {spec} needs timm, which is not installed: pip install 'dynconvert[timm]'") from None
    kwargs = {}
    for arg in args:
        key, eq, value = arg.partition("=")
        try:
            kwargs[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            eq = ""
        if not eq or not key.strip().isidentifier():
            raise DynError(f"--model {spec}: {arg!r} must look like key=value with a Python literal value (img_size=64)")
    if not timm.is_model(name):
        raise DynError(f"--model {spec}: timm has no architecture {name!r} (list them: python -c \"import timm; print(timm.list_models('*{name[:4]}*'))\")")
    kwargs["pretrained"] = False
    if num_classes is None and state is not None:
        num_classes = _timm_classes(timm, name, kwargs, state)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    try:
        return timm.create_model(name, **kwargs)
    except Exception as e:  # timm raises many types for bad keyword arguments
        raise DynError(f"--model {spec}: timm cannot build it ({first_line(e)})") from None


def _timm_classes(timm, name: str, kwargs: dict, state: dict) -> int | None:
    """The class count the checkpoint's classifier has (fine-tuned heads differ from the default)."""
    try:
        with torch.device("meta"):
            net = timm.create_model(name, **kwargs)
        head = net.get_classifier()
    except Exception:
        return None
    key = next((f"{n}.weight" for n, m in net.named_modules() if m is head and n), None)
    if key in state and state[key].ndim >= 1 and isinstance(head, (nn.Linear, nn.Conv2d)):
        return int(state[key].shape[0])
    return None
