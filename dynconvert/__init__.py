"""dynconvert: rewrite pretrained vision models in the dynamics-based form of Pei & Wang (ICML 2023).

The API names below load on first use: importing the package (which ``dynconvert`` and
``python -m dynconvert`` do before anything else) stays light, so the CLI answers ``--help``,
usage errors and an early Ctrl-C without first loading torch.
"""

import importlib

from .version import __version__

_HOME = {"convert": "api", "load": "api", "save": "api", "build_report": "api", "export_onnx": "api",
         "export_pth": "api", "export_safetensors": "api", "distill": "distill"}

__all__ = [*_HOME, "__version__"]


def __getattr__(name: str):
    if name in _HOME:
        return getattr(importlib.import_module(f".{_HOME[name]}", __name__), name)
    try:  # a submodule used as an attribute (dynconvert.api.verify) before anything imported it
        return importlib.import_module(f".{name}", __name__)
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{name}":
            raise
    raise AttributeError(f"module 'dynconvert' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_HOME))
