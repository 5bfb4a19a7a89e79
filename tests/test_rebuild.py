"""Rebuilding any converted model: torchvision modules converted in Python rebuild alone; pickled
modules, TorchScript and custom modules rebuild from --original (sha256-checked)."""

import importlib

import pytest
import torch
import torch.nn as nn
import torchvision

import dynconvert
from dynconvert.io.checkpoint import source_of
from dynconvert.errors import DynError
from _tiny import import_written
from helpers import one_line_error

FAST = dict(steps=20, min_params=0)


@pytest.fixture
def pickled_custom(tmp_path, monkeypatch):
    """A custom module class in an importable file, its pickled instance (orig.pt) and its .dyn."""
    mynet = import_written(monkeypatch, tmp_path, "mynet",
        "import torch.nn as nn\n\n\nclass MyNet(nn.Module):\n"
        "    def __init__(self):\n        super().__init__()\n"
        "        self.conv = nn.Conv2d(3, 8, 3)\n        self.fc = nn.Linear(8 * 14 * 14, 10)\n\n"
        "    def forward(self, x):\n        return self.fc(self.conv(x).relu().flatten(1))\n"
    )
    torch.manual_seed(0)
    torch.save(mynet.MyNet(), tmp_path / "orig.pt")
    return tmp_path


def test_in_memory_torchvision_model_round_trips_without_arguments(tmp_path, cli):
    conv = dynconvert.convert(torchvision.models.resnet18(num_classes=10), include=["fc"], **FAST)
    assert conv.source.kind == "torchvision" and conv.source.arch == "resnet18" and conv.source.num_classes == 10
    dynconvert.save(conv, tmp_path / "tv.dyn")
    net = dynconvert.load(tmp_path / "tv.dyn")
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(net(x), conv.model(x))
    code, stdout, stderr = cli("report", tmp_path / "tv.dyn", "--json")
    assert code == 0, stderr


def test_modified_torchvision_model_is_not_rebuilt_as_the_stock_one():
    model = torchvision.models.resnet18(num_classes=10)
    model.relu = nn.GELU()  # same keys and shapes, other computation
    src = source_of(model)
    assert src.kind == "module" and src.module_class == "torchvision.models.resnet.ResNet"


def test_module_converted_in_python_says_what_to_pass(tmp_path, pickled_custom):
    model = torch.load(pickled_custom / "orig.pt", weights_only=False)
    conv = dynconvert.convert(model, **FAST)
    dynconvert.save(conv, tmp_path / "py.dyn")
    with pytest.raises(DynError, match=r"mynet\.MyNet module.*--original FILE.*model=") as e:
        dynconvert.load(tmp_path / "py.dyn")
    assert "\n" not in str(e.value)
    fresh = importlib.import_module("mynet").MyNet()
    net = dynconvert.load(tmp_path / "py.dyn", model=fresh)
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(net(x), conv.model(x))
    # a factory (--model) that builds the same class holds it too; one of another class is refused
    torch.testing.assert_close(dynconvert.load(tmp_path / "py.dyn", factory="mynet:MyNet")(x), conv.model(x))
    with pytest.raises(DynError, match=r"--model torchvision.models:resnet18 builds a torchvision.models.resnet.ResNet, "
                                       r"but this file was converted from a mynet\.MyNet module"):
        dynconvert.load(tmp_path / "py.dyn", factory="torchvision.models:resnet18")


def test_pickled_module_goes_through_every_command_with_original(pickled_custom, cli):
    d = pickled_custom
    code, _, stderr = cli("convert", d / "orig.pt", "--out", d / "m.dyn", "--trust-pickle", "--steps", "20",
                          "--min-params", "0", "--input-size", "3,16,16")
    assert code == 0, stderr
    assert "--original" in one_line_error(*cli("report", d / "m.dyn"))
    code, stdout, stderr = cli("report", d / "m.dyn", "--original", d / "orig.pt", "--trust-pickle", "--json")
    assert code == 0, stderr
    assert '"conv"' in stdout and '"fc"' in stdout
    code, stdout, stderr = cli("verify", d / "m.dyn", "--original", d / "orig.pt", "--trust-pickle")
    assert code == 0 and "rebuilds as the original orig.pt" in stdout, stderr
    code, stdout, stderr = cli("export", d / "m.dyn", "--onnx", d / "m.onnx", "--original", d / "orig.pt",
                               "--trust-pickle")
    assert code == 0 and (d / "m.onnx").stat().st_size > 0, stderr
    # the original is unpickled only when trusted
    assert "--trust-pickle" in one_line_error(*cli("report", d / "m.dyn", "--original", d / "orig.pt"))


def test_original_must_be_the_file_converted_from(pickled_custom, cli):
    d = pickled_custom
    code, _, stderr = cli("convert", d / "orig.pt", "--out", d / "m.dyn", "--trust-pickle", "--steps", "5",
                          "--min-params", "0", "--input-size", "3,16,16")
    assert code == 0, stderr
    torch.manual_seed(1)
    torch.save(importlib.import_module("mynet").MyNet(), d / "other.pt")
    line = one_line_error(*cli("report", d / "m.dyn", "--original", d / "other.pt", "--trust-pickle"))
    assert "sha256" in line and "other.pt" in line


def test_torchscript_of_a_torchvision_model_converts_as_that_model(tmp_path, cli):
    torch.manual_seed(0)
    torch.jit.script(torchvision.models.resnet18(num_classes=10).eval()).save(str(tmp_path / "ts.pt"))
    code, stdout, stderr = cli("convert", tmp_path / "ts.pt", "--out", tmp_path / "ts.dyn", "--trust-pickle",
                               "--include", "fc", "--steps", "5", "--min-params", "0")
    assert code == 0, stderr
    meta = dynconvert.api.read_meta(tmp_path / "ts.dyn")
    assert meta["source"]["arch"] == "resnet18" and list(meta["layers"]) == ["fc"]
    assert dynconvert.load(tmp_path / "ts.dyn")(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_torchscript_of_a_custom_model_is_refused_in_one_line(pickled_custom, cli):
    d = pickled_custom
    torch.jit.script(torch.load(d / "orig.pt", weights_only=False)).save(str(d / "ts.pt"))
    line = one_line_error(*cli("convert", d / "ts.pt", "--out", d / "ts.dyn", "--trust-pickle"), out=d / "ts.dyn")
    assert "TorchScript" in line and "--model" in line
