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


def import_written(monkeypatch, folder, name: str, source: str):
    """``source`` written as ``folder/name.py`` and imported from there (a copy another test imported
    from its own folder forgotten, and this one after the test), as ``--model name:build`` finds it
    in this process."""
    import importlib
    import sys

    (folder / f"{name}.py").write_text(source)
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setitem(sys.modules, name, None)  # at teardown sys.modules[name] is as before: this one forgotten
    del sys.modules[name]
    return importlib.import_module(name)


# Factory modules the tests write into their folder (``--model NAME:build`` imports them, also in
# the CLI's own process); each test module names the file it writes.

SMALLNET = (  # conftest's small_factory: "smallnet:build"
    "import torch.nn as nn\n\n\ndef build():\n"
    "    return nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 6 * 6, 32))\n"
)

# helpers_report: not a torchvision model (conv + BN + strided conv + linear head)
TINY_NET = '''
import torch.nn as nn


class TinyNet(nn.Module):
    """Not a torchvision model: conv + BN + strided conv + linear head."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        return self.head(self.features(x))


def build():
    return TinyNet()
'''

# test_end_to_end: a conv, pooling and a linear head as a custom nn.Module
E2E_SMALLNET = """
import torch.nn as nn


class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.fc = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x):
        return self.fc(self.pool(self.conv(x).relu()).flatten(1))


def build():
    return SmallNet()
"""

# test_budget: conv/BN nets for byte budgets (build) and one without BatchNorm (build_plain)
BUDGET_NET = """
import torch.nn as nn

def build():
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.Conv2d(32, 128, 1), nn.BatchNorm2d(128),
        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 100))

def build_plain():
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 100))
"""

# test_transformer: a tiny torchvision ViT
VIT = ("import torch.nn as nn\nfrom torchvision.models import VisionTransformer\n\n\ndef build():\n"
       "    return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32,\n"
       "                             mlp_dim=64, num_classes=10)\n")

# test_new_user: a user's own architecture in their folder
NEW_USER_NET = textwrap.dedent(
    """
    import torch.nn as nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 128), nn.ReLU(), nn.Linear(128, 10))

        def forward(self, x):
            return self.body(x)

    def build():
        return Net()
    """
)
