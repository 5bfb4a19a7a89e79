"""`dynconvert verify` and the checksum `load` checks."""

import pytest
import torch
import torch.nn as nn
from _tiny import FACTORY, tiny_checkpoint, use_factory

import dynconvert
from dynconvert.errors import DynError


@pytest.fixture
def dyn(tmp_path, monkeypatch, cli):
    ckpt = tiny_checkpoint(tmp_path)
    use_factory(monkeypatch, tmp_path)
    code, _, stderr = cli("convert", ckpt, "--out", tmp_path / "m.dyn", "--model", FACTORY, "--steps", "2", "--min-params", "100",
                          "--input-size", "1,8,8")
    assert code == 0, stderr
    return tmp_path / "m.dyn"


def test_verify_reports_layers_and_checksum(dyn, cli):
    meta = dynconvert.api.read_meta(dyn)
    code, stdout, _ = cli("verify", dyn)
    assert code == 0
    assert stdout.startswith(f"OK {dyn}") and "4 converted layers" in stdout
    assert f"sha256:{meta['tensors_sha256']}" in stdout and "needs --model" in stdout
    code, stdout, _ = cli("verify", dyn, "--model", FACTORY)
    assert code == 0 and f"rebuilds as {FACTORY}" in stdout


def flip_last_tensor_byte(path):
    blob = bytearray(path.read_bytes())
    blob[-1] ^= 0x01
    path.write_bytes(bytes(blob))


def test_tampering_detected_by_verify_and_load(dyn, cli):
    flip_last_tensor_byte(dyn)
    code, stdout, stderr = cli("verify", dyn)
    assert code == 2 and stdout == "" and "checksum mismatch" in stderr and len(stderr.splitlines()) == 1
    with pytest.raises(DynError, match="checksum mismatch"):
        dynconvert.load(dyn, factory=FACTORY)
    assert isinstance(dynconvert.load(dyn, factory=FACTORY, verify=False), nn.Module)  # an explicit opt-out


def test_verify_with_wrong_model(dyn, cli, tmp_path, monkeypatch):
    (tmp_path / "other_arch.py").write_text("import torch.nn as nn\ndef build():\n    return nn.Sequential(nn.Linear(3, 3))\n")
    code, _, stderr = cli("verify", dyn, "--model", "other_arch:build")
    assert code == 2 and "differs from the factory recorded" in stderr


def test_verify_rebuilds_torchvision(tmp_path, cli):
    from dynconvert.io.checkpoint import Source

    torch.manual_seed(0)
    conv = dynconvert.convert(
        __import__("torchvision").models.squeezenet1_1(num_classes=10), min_params=60_000, steps=1,
        source=Source("torchvision", arch="squeezenet1_1", num_classes=10),
    )
    dynconvert.save(conv, tmp_path / "sq.dyn")
    code, stdout, stderr = cli("verify", tmp_path / "sq.dyn")
    assert code == 0 and "rebuilds as squeezenet1_1" in stdout and f"{len(conv.layers)} converted layers" in stdout, stderr
    assert len(conv.layers) >= 1
