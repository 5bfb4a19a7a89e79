"""Issue 10: every kind of model a user has goes through every command, from the CLI:
convert -> report -> finetune (2 steps) -> eval -> export --onnx (ONNX Runtime parity) -> verify.

The conversions of torchvision/timm networks are in the slow tier (`pytest -m slow`, CI runs it).
Sources: a torchvision state dict, a ``--model`` factory in the current folder, a pickled whole
module (``--trust-pickle``), TorchScript, a timm architecture (``--model timm:NAME``) and a
torchvision module converted in Python. Small models, low resolution, few steps."""

import json
import re
import sys

import pytest
import torch
import torch.nn as nn
import torchvision

import dynconvert
from _tiny import E2E_SMALLNET as FACTORY

SIZE = "3,32,32"


def chain(cli, folder, dyn, *rebuild):
    """Every command after convert on ``dyn``; ``rebuild``: what the file needs to be rebuilt
    (--model, --original ... --trust-pickle), passed to each command the same way."""
    code, out, err = cli("report", dyn, "--json", *rebuild)
    assert code == 0, err
    rep = json.loads(out)
    assert rep["totals"]["converted_layers"] >= 1 and rep["layers"][0]["state_params"] < rep["layers"][0]["dense_params"]

    tuned = folder / "tuned.dyn"
    code, out, err = cli("finetune", dyn, "--data", "fake", "--out", tuned, "--max-steps", "2", "--batch-size", "4",
                         "--workers", "0", *rebuild)
    assert code == 0, err
    assert "wrote" in out and "2 steps" in out, out

    code, out, err = cli("eval", tuned, "--data", "fake", "--batch-size", "16", "--json", *rebuild)
    assert code == 0, err
    row = json.loads(out)[str(tuned)]  # with --original, the original's row comes too
    assert 0 <= row["top1"] <= row["top5"] <= 1 and row["n"] > 0

    onnx = folder / "tuned.onnx"
    code, out, err = cli("export", tuned, "--onnx", onnx, *rebuild)
    assert code == 0, err
    diff = float(re.search(r"max abs diff (\S+)", out).group(1))
    assert onnx.stat().st_size > 0 and diff < 1e-3, out  # export itself fails above 1e-4 x the output scale

    code, out, err = cli("verify", tuned, *rebuild)
    assert code == 0, err
    assert out.startswith("OK") and "rebuilds as" in out, out


def convert(cli, src, out, *args):
    code, stdout, err = cli("convert", src, "--out", out, "--steps", "5", "--input-size", SIZE, *args)
    assert code == 0, err
    return out


@pytest.mark.slow
def test_torchvision_state_dict(tmp_path, cli):
    torch.manual_seed(0)
    torch.save(torchvision.models.squeezenet1_1(num_classes=10).state_dict(), tmp_path / "sq.pth")
    dyn = convert(cli, tmp_path / "sq.pth", tmp_path / "sq.dyn", "--include", "features.12.*")
    chain(cli, tmp_path, dyn)


@pytest.fixture
def user_folder(tmp_path, monkeypatch):
    """The user's folder, as the current directory, with e2e_smallnet.py in it (not on sys.path)."""
    import importlib.util

    (tmp_path / "e2e_smallnet.py").write_text(FACTORY)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "e2e_smallnet", raising=False)  # another test's copy (another tmp folder)
    spec = importlib.util.spec_from_file_location("e2e_smallnet", tmp_path / "e2e_smallnet.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    torch.manual_seed(0)
    return tmp_path, mod


def test_factory_in_current_folder(user_folder, cli):
    folder, mod = user_folder
    torch.save(mod.build().state_dict(), folder / "m.pth")
    dyn = convert(cli, folder / "m.pth", folder / "m.dyn", "--model", "e2e_smallnet:build", "--min-params", "0")
    chain(cli, folder, dyn, "--model", "e2e_smallnet:build")


def test_pickled_module(user_folder, cli, monkeypatch):
    folder, _ = user_folder
    monkeypatch.delitem(sys.modules, "e2e_smallnet", raising=False)
    monkeypatch.syspath_prepend(str(folder))  # torch.save pickles the class by its module's name
    import e2e_smallnet

    torch.save(e2e_smallnet.build(), folder / "whole.pt")
    dyn = convert(cli, folder / "whole.pt", folder / "w.dyn", "--trust-pickle", "--min-params", "0")
    chain(cli, folder, dyn, "--original", folder / "whole.pt", "--trust-pickle")


@pytest.mark.slow
def test_torchscript(tmp_path, cli):
    torch.manual_seed(0)
    torch.jit.script(torchvision.models.squeezenet1_1(num_classes=10).eval()).save(str(tmp_path / "ts.pt"))
    dyn = convert(cli, tmp_path / "ts.pt", tmp_path / "ts.dyn", "--trust-pickle", "--include", "features.12.*")
    chain(cli, tmp_path, dyn)  # rebuilt as the torchvision architecture its weights match


@pytest.mark.slow
def test_timm(tmp_path, cli):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    torch.save(timm.create_model("test_resnet", num_classes=10).state_dict(), tmp_path / "t.pth")
    dyn = convert(cli, tmp_path / "t.pth", tmp_path / "t.dyn", "--model", "timm:test_resnet")
    chain(cli, tmp_path, dyn, "--model", "timm:test_resnet")


@pytest.mark.slow
def test_module_converted_in_python(tmp_path, cli):
    torch.manual_seed(0)
    conv = dynconvert.convert(torchvision.models.squeezenet1_1(num_classes=10), include=["features.12.*"], steps=5,
                              input_size=(3, 32, 32))
    dynconvert.save(conv, tmp_path / "py.dyn")
    chain(cli, tmp_path, tmp_path / "py.dyn")


def test_custom_module_converted_in_python_rebuilds_from_its_saved_original(user_folder, cli, monkeypatch):
    folder, _ = user_folder
    monkeypatch.syspath_prepend(str(folder))
    import e2e_smallnet

    model = e2e_smallnet.build()
    torch.save(model, folder / "orig.pt")  # what the CLI can rebuild it from
    conv = dynconvert.convert(model, min_params=0, steps=5, input_size=(3, 32, 32))
    assert isinstance(conv.model.fc, nn.Module)
    dynconvert.save(conv, folder / "py.dyn")
    chain(cli, folder, folder / "py.dyn", "--original", folder / "orig.pt", "--trust-pickle")
