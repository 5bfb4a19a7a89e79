"""dynconvert: rewrite pretrained vision models in the dynamics-based form of Pei & Wang (ICML 2023).

The API names below load on first use: importing the package (which ``dynconvert`` and
``python -m dynconvert`` do before anything else) stays light, so the CLI answers ``--help``,
usage errors and an early Ctrl-C without first loading torch.

The modules live in one folder per stage (io < dynamics < budget < dynfile < train | deploy < api/cli;
docs/architecture.md). The flat module paths of earlier releases (``dynconvert.workers``,
``dynconvert.fit``, ...) still import: ``_MOVED`` maps each to its new place.
"""

import importlib
import importlib.abc
import importlib.util
import sys

from .version import __version__

_HOME = {"convert": "api", "load": "api", "save": "api", "build_report": "api", "export_onnx": "api",
         "export_pth": "api", "export_safetensors": "api", "distill": "train.distill"}

# old flat module -> its module now (dynamics, budget, dynfile and cli are packages under their old name)
_MOVED = {
    "fileio": "io.fileio", "safetensors_io": "io.safetensors_io", "checkpoint": "io.checkpoint",
    "factories": "io.factories", "data": "io.data",
    "metrics": "dynamics.metrics", "layers": "dynamics.layers", "attention": "dynamics.attention",
    "fit": "dynamics.fit", "fit_sql2": "dynamics.fit_sql2", "fit_full": "dynamics.fit_full",
    "weightfree": "dynamics.weightfree", "fused": "dynamics.fused", "conversion": "dynamics.conversion",
    "workers": "dynamics.workers", "recipes": "dynamics.recipes",
    "allocation": "budget.allocation", "outputs": "budget.outputs", "synth": "budget.synth", "quant": "budget.quant",
    "rebuild": "dynfile.rebuild", "resume": "dynfile.resume",
    "finetune": "train.finetune", "trainable": "train.trainable", "distributed": "train.distributed",
    "train_checkpoint": "train.snapshots", "evaluation": "train.evaluation",
    "export": "deploy.export", "onnx_quant": "deploy.onnx_quant", "bench": "deploy.bench",
    "opcount": "deploy.opcount", "report": "deploy.report", "demo": "cli.demo",
}

__all__ = [*_HOME, "__version__"]


class _OldPaths(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """``import dynconvert.<old>`` gives the module at its new place (the same module object)."""

    def find_spec(self, fullname, path=None, target=None):
        head, _, old = fullname.partition(".")
        if head == __name__ and old in _MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        module = importlib.import_module(f"{__name__}.{_MOVED[spec.name.partition('.')[2]]}")
        spec.loader_state = module.__spec__  # the import system sets the alias spec on the module next
        return module

    def exec_module(self, module):
        module.__spec__ = module.__spec__.loader_state  # the module keeps its own spec


if not any(isinstance(f, _OldPaths) for f in sys.meta_path):
    sys.meta_path.insert(0, _OldPaths())


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
