"""`--model timm:NAME`: timm architectures (built without pretrained weights) take the checkpoint's
state dict, convert, and rebuild from the .dyn. timm is the optional extra [timm]: without it these
tests skip, except the one checking the error that names the extra."""

import sys

import pytest
import torch

import dynconvert
from dynconvert.api import convert_checkpoint
from dynconvert.io.factories import import_factory
from dynconvert.dynamics.conversion import ConvertOptions
from dynconvert.errors import DynError
from dynconvert.dynfile.rebuild import read_meta


def test_missing_timm_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # what an environment without timm sees
    with pytest.raises(DynError, match=r"needs timm, which is not installed: pip install 'dynconvert\[timm\]'") as e:
        import_factory("timm:resnet18")
    assert "\n" not in str(e.value)


timm = pytest.importorskip("timm")

# convnets (a ResNet, MobileNetV3 with its depthwise convs, an EfficientNet) and a ViT, at low resolution
SLOW = pytest.mark.slow
ARCHS = [pytest.param("test_resnet", "3,32,32", marks=SLOW), pytest.param("mobilenetv3_small_050", "3,32,32", marks=SLOW),
         ("test_efficientnet", "3,32,32"), pytest.param("test_vit", "3,160,160", marks=SLOW)]


@pytest.mark.parametrize("name,size", ARCHS)
def test_timm_architecture_round_trips(tmp_path, cli, name, size):
    torch.manual_seed(0)
    net = timm.create_model(name, num_classes=7).eval()  # a fine-tuned head: not timm's default class count
    torch.save(net.state_dict(), tmp_path / "m.pth")
    spec = f"timm:{name}"
    conv = convert_checkpoint(tmp_path / "m.pth", tmp_path / "m.dyn", ConvertOptions(steps=3, min_params=2000),
                              model=spec, input_size=tuple(map(int, size.split(","))), on_note=lambda m: None)
    meta = read_meta(tmp_path / "m.dyn")
    assert meta["source"] == {"kind": "factory", "factory": spec, "num_classes": 7}
    assert len(meta["layers"]) >= 2

    x = torch.randn(2, *map(int, size.split(",")))
    rebuilt = dynconvert.load(tmp_path / "m.dyn", factory=spec)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), conv.model(x))  # the file holds exactly the converted model
        assert rebuilt(x).shape == (2, 7)
    code, out, err = cli("verify", tmp_path / "m.dyn", "--model", spec)
    assert code == 0 and f"rebuilds as {spec}" in out, err
    code, out, err = cli("report", tmp_path / "m.dyn")  # a factory is named again, as for any --model file
    assert code == 2 and f"--model {spec}" in err, err


@pytest.mark.slow
def test_timm_keyword_arguments(tmp_path, cli):
    torch.manual_seed(0)
    torch.save(timm.create_model("test_vit", img_size=32, num_classes=5).state_dict(), tmp_path / "v.pth")
    spec = "timm:test_vit,img_size=32"
    code, out, err = cli("convert", tmp_path / "v.pth", "--out", tmp_path / "v.dyn", "--model", spec, "--steps", "2",
                         "--input-size", "3,32,32", "--min-params", "2000")
    assert code == 0, err
    assert dynconvert.load(tmp_path / "v.dyn", factory=spec)(torch.randn(1, 3, 32, 32)).shape == (1, 5)
    # a timm ViT exports to ONNX, materialized and weight-free, and passes ONNX Runtime's check
    for extra in ([], ["--weight-free"]):
        code, out, err = cli("export", tmp_path / "v.dyn", "--model", spec, "--onnx", tmp_path / "v.onnx", "--force", *extra)
        assert code == 0 and "ONNX Runtime vs PyTorch max abs diff" in out and "proves nothing" not in err, err


@pytest.mark.parametrize("spec,message", [
    ("timm:no_such_net", "timm has no architecture 'no_such_net'"),
    ("timm:test_resnet,img_size", "'img_size' must look like key=value"),
    ("timm:test_resnet,depth=os.system('x')", "must look like key=value with a Python literal"),
])
def test_timm_bad_specs_are_one_line(tmp_path, cli, spec, message):
    torch.save({"w": torch.zeros(2)}, tmp_path / "m.pth")
    code, out, err = cli("convert", tmp_path / "m.pth", "--out", tmp_path / "m.dyn", "--model", spec)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and message in lines[0], err
