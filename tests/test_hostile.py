"""Hostile files: a pickle that would run code is refused without --trust-pickle and never runs."""

import pickle
import sys

import pytest
import torch
import torch.nn as nn

import dynconvert
from dynconvert.io.checkpoint import read_checkpoint
from dynconvert.errors import DynError


class Payload:
    """Unpickling this runs ``exec``, which creates the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def hostile_checkpoint(path, marker, legacy=False):
    state = nn.Linear(4, 4).state_dict()
    torch.save({"state_dict": state, "extra": Payload(marker)}, path, _use_new_zipfile_serialization=not legacy)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_reduce_payload_refused_and_never_runs(tmp_path, cli, legacy):
    marker = tmp_path / "PWNED"
    hostile_checkpoint(tmp_path / "evil.pth", marker, legacy)
    code, stdout, stderr = cli("convert", tmp_path / "evil.pth", "--out", tmp_path / "out.dyn", "--arch", "resnet18")
    assert code != 0
    assert stderr.startswith("error:") and "--trust-pickle" in stderr and len(stderr.strip().splitlines()) == 1
    assert not marker.exists(), "the pickle payload ran"
    assert not (tmp_path / "out.dyn").exists()
    with pytest.raises(DynError, match="trust-pickle"):
        read_checkpoint(tmp_path / "evil.pth")
    assert not marker.exists()


def test_payload_is_real(tmp_path):
    """The refusal above means something only if the payload does run when trusted."""
    marker = tmp_path / "PWNED"
    hostile_checkpoint(tmp_path / "evil.pth", marker)
    read_checkpoint(tmp_path / "evil.pth", trust_pickle=True)
    assert marker.exists()


def test_torchscript_refused_without_trust(tmp_path, cli):
    torch.jit.script(nn.Linear(3, 3)).save(str(tmp_path / "ts.pt"))
    code, _, stderr = cli("convert", tmp_path / "ts.pt", "--out", tmp_path / "o.dyn")
    assert code != 0 and "TorchScript" in stderr and "--trust-pickle" in stderr


@pytest.mark.parametrize("name", ["evil.dyn", "evil.safetensors"])
def test_pickle_disguised_as_safetensors_never_unpickled(tmp_path, cli, name):
    marker = tmp_path / "PWNED"
    hostile_checkpoint(tmp_path / name, marker)
    if name.endswith(".dyn"):
        code, _, stderr = cli("verify", tmp_path / name)
        with pytest.raises(DynError):
            dynconvert.load(tmp_path / name)
    else:
        code, _, stderr = cli("convert", tmp_path / name, "--out", tmp_path / "o.dyn", "--arch", "resnet18")
    assert code != 0 and stderr.startswith("error:")
    assert not marker.exists()


def test_dyn_reading_uses_no_pickle(tmp_path, monkeypatch, cli):
    """Reading, verifying and loading a valid .dyn works with every unpickling entry point broken."""
    conv = dynconvert.convert(nn.Sequential(nn.Linear(32, 32)), steps=1, min_params=100)
    dynconvert.save(conv, tmp_path / "m.dyn")

    def boom(*a, **k):
        raise AssertionError("a .dyn must never be unpickled")

    for obj, attr in [(pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")]:
        monkeypatch.setattr(obj, attr, boom)
    code, stdout, stderr = cli("verify", tmp_path / "m.dyn")
    assert code == 0 and stdout.startswith("OK"), stderr
    model = nn.Sequential(nn.Linear(32, 32))
    assert dynconvert.load(tmp_path / "m.dyn", model=model) is model


def test_recorded_factory_never_imported(tmp_path, cli, monkeypatch):
    """A .dyn naming a --model factory does not make verify or load import it."""
    marker = tmp_path / "IMPORTED"
    (tmp_path / "evilmod.py").write_text(
        f"open({str(marker)!r}, 'w').close()\nimport torch.nn as nn\ndef build():\n    return nn.Sequential(nn.Linear(32, 32))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    from dynconvert.io.checkpoint import Source

    conv = dynconvert.convert(nn.Sequential(nn.Linear(32, 32)), steps=1, min_params=100, source=Source("factory", factory="evilmod:build"))
    dynconvert.save(conv, tmp_path / "m.dyn")
    code, stdout, _ = cli("verify", tmp_path / "m.dyn")
    assert code == 0 and "not rebuilt" in stdout
    with pytest.raises(DynError, match="--model evilmod:build"):
        dynconvert.load(tmp_path / "m.dyn")
    assert not marker.exists()
    assert "evilmod" not in sys.modules
