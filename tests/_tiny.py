"""A tiny model importable as ``--model _tiny_safety_model:build``, for tests that run real conversions."""

import textwrap

import torch

FACTORY = "_tiny_safety_model:build"
SOURCE = textwrap.dedent(
    """
    import torch.nn as nn

    def build():
        layers = [nn.Flatten()]
        for _ in range(LAYERS):
            layers += [nn.Linear(64, 64), nn.ReLU()]
        return nn.Sequential(*layers, nn.Linear(64, 10))
    """
)


def write_factory(folder, layers: int = 3) -> None:
    (folder / "_tiny_safety_model.py").write_text(SOURCE.replace("LAYERS", str(layers)))


def tiny_checkpoint(folder, layers: int = 3, seed: int = 0):
    """Write the factory module and a matching state dict; returns the checkpoint path."""
    import importlib.util

    write_factory(folder, layers)
    spec = importlib.util.spec_from_file_location("_tiny_for_weights", folder / "_tiny_safety_model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    torch.manual_seed(seed)
    path = folder / "tiny.pth"
    torch.save(mod.build().state_dict(), path)
    return path


def use_factory(monkeypatch, folder) -> None:
    """Import the factory from ``folder`` in this process (forgetting one imported from elsewhere)."""
    import importlib
    import sys

    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.delitem(sys.modules, "_tiny_safety_model", raising=False)
    importlib.invalidate_caches()
