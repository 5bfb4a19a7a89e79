"""Issue 2's bad inputs to `convert`: each is one line `error: ...`, a non-zero exit, no traceback, no output."""

import os

import pytest
import torch
import torchvision
from helpers import one_line_error


@pytest.fixture
def sq(tmp_path):
    torch.manual_seed(0)
    state = torchvision.models.squeezenet1_1(num_classes=10).state_dict()
    torch.save(state, tmp_path / "sq.pth")
    return state


def run_convert(cli, tmp_path, ckpt, *extra, out=None):
    out = out or tmp_path / "out.dyn"
    return one_line_error(*cli("convert", ckpt, "--out", out, "--steps", "1", *extra), out=out)


def test_missing_file(tmp_path, cli):
    assert "no such file" in run_convert(cli, tmp_path, tmp_path / "nope.pth")


def test_not_a_checkpoint(tmp_path, cli):
    (tmp_path / "notes.pth").write_text("shopping list: eggs, milk\n")
    assert "not a readable PyTorch checkpoint" in run_convert(cli, tmp_path, tmp_path / "notes.pth")


def test_truncated_checkpoint(tmp_path, cli, sq):
    blob = (tmp_path / "sq.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(blob[: len(blob) // 2])
    assert "truncated or corrupt" in run_convert(cli, tmp_path, tmp_path / "cut.pth", "--arch", "squeezenet1_1")


def test_unknown_architecture(tmp_path, cli, sq):
    assert "unknown architecture 'squeezenet9'" in run_convert(cli, tmp_path, tmp_path / "sq.pth", "--arch", "squeezenet9")


def test_architecture_not_inferable(tmp_path, cli):
    torch.save({"w": torch.zeros(3, 3)}, tmp_path / "odd.pth")
    assert "could not infer the architecture" in run_convert(cli, tmp_path, tmp_path / "odd.pth")


def test_keys_do_not_match_arch(tmp_path, cli, sq):
    line = run_convert(cli, tmp_path, tmp_path / "sq.pth", "--arch", "resnet18")
    assert "do not match --arch resnet18" in line and "missing" in line


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_inf_weights(tmp_path, cli, sq, bad):
    sq["features.0.weight"][0, 0, 0, 0] = bad
    torch.save(sq, tmp_path / "bad.pth")
    line = run_convert(cli, tmp_path, tmp_path / "bad.pth", "--arch", "squeezenet1_1")
    assert "features.0.weight" in line and "NaN or Inf" in line


def test_out_folder_missing(tmp_path, cli, sq):
    line = run_convert(cli, tmp_path, tmp_path / "sq.pth", "--arch", "squeezenet1_1", out=tmp_path / "no" / "such" / "o.dyn")
    assert "does not exist" in line


def test_out_is_a_directory(tmp_path, cli, sq):
    (tmp_path / "d.dyn").mkdir()
    code, _, stderr = cli("convert", tmp_path / "sq.pth", "--out", tmp_path / "d.dyn", "--arch", "squeezenet1_1")
    assert code != 0 and stderr.startswith("error:") and "is a directory" in stderr


def test_out_folder_not_writable(tmp_path, cli, sq, monkeypatch):
    # Tests run as root, for whom chmod does not stop writes: simulate the permission check failing.
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **k: False if os.path.abspath(p) == str(locked) else real_access(p, mode, **k))
    line = run_convert(cli, tmp_path, tmp_path / "sq.pth", "--arch", "squeezenet1_1", out=locked / "o.dyn")
    assert "not writable" in line


def test_existing_output_needs_force(tmp_path, cli, sq):
    (tmp_path / "out.dyn").write_bytes(b"previous")
    code, _, stderr = cli("convert", tmp_path / "sq.pth", "--out", tmp_path / "out.dyn", "--arch", "squeezenet1_1")
    assert code != 0 and "--force" in stderr
    assert (tmp_path / "out.dyn").read_bytes() == b"previous"
