"""Faults at run time: a full disk, a folder that stops being writable, an absent CUDA device, NaN
appearing while fitting. Each ends in one line `error: ...`, and no output (or the previous one)."""

import errno
import pathlib
import tempfile

import pytest
import torch
from _tiny import FACTORY, tiny_checkpoint, use_factory

from dynconvert.dynfile.format import write_dyn
from dynconvert.errors import DynError


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    path = tiny_checkpoint(tmp_path)
    use_factory(monkeypatch, tmp_path)
    return path


def convert(cli, tiny, out, *extra):
    return cli("convert", tiny, "--out", out, "--model", FACTORY, "--steps", "3", "--min-params", "100",
               "--input-size", "1,8,8", *extra)


def assert_clean_error(code, stderr, out, previous=None):
    assert code != 0
    # the per-layer progress lines of a run that got that far come first; then exactly one error line
    lines = stderr.splitlines()
    assert lines[-1].startswith("error:") and sum(line.startswith("error") for line in lines) == 1, stderr
    assert "Traceback" not in stderr
    if previous is None:
        assert not out.exists()
    else:
        assert out.read_bytes() == previous
    assert not list(out.parent.glob(f".{out.name}*")), "a temporary file was left behind"
    return lines[-1]


@pytest.mark.parametrize("previous", [None, b"an earlier conversion"], ids=["fresh", "overwrite"])
def test_disk_full_while_writing(tmp_path, tiny, cli, monkeypatch, previous):
    out = tmp_path / "out.dyn"
    if previous:
        out.write_bytes(previous)
    real = pathlib.Path.write_bytes

    def half_then_full(self, data):
        real(self, data[: len(data) // 2])  # the disk fills up half-way through the file
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pathlib.Path, "write_bytes", half_then_full)
    code, _, stderr = convert(cli, tiny, out, *(["--force"] if previous else []))
    assert "No space left on device" in assert_clean_error(code, stderr, out, previous)


def test_io_error_at_rename(tmp_path, tiny, cli, monkeypatch):
    import os

    out = tmp_path / "out.dyn"
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: real(a, b) if ".partial" in str(b) else (_ for _ in ()).throw(OSError(errno.EIO, "Input/output error")))
    code, _, stderr = convert(cli, tiny, out)
    assert "Input/output error" in assert_clean_error(code, stderr, out)


def test_folder_becomes_unwritable_at_write_time(tmp_path, tiny, cli, monkeypatch):
    """The folder passed the up-front check but refuses the file when it is finally written."""
    out = tmp_path / "out.dyn"
    real = tempfile.mkstemp

    def refuse(*a, dir=None, **k):
        if pathlib.Path(dir) == tmp_path:
            raise PermissionError(errno.EACCES, "Permission denied")
        return real(*a, dir=dir, **k)

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    code, _, stderr = convert(cli, tiny, out)
    assert "Permission denied" in assert_clean_error(code, stderr, out)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_requested_but_absent(tmp_path, tiny, cli, device):
    out = tmp_path / "out.dyn"
    code, _, stderr = convert(cli, tiny, out, "--device", device)
    line = assert_clean_error(code, stderr, out)
    assert "no CUDA device" in line and "--device cpu" in line


def test_nan_during_fitting_names_the_layer(tmp_path, tiny, cli, monkeypatch):
    """An optimizer step that blows the states up to NaN is caught and named, nothing is written."""
    out = tmp_path / "out.dyn"
    real_step = torch.optim.Adam.step

    def poisoned(self, *a, **k):
        result = real_step(self, *a, **k)
        with torch.no_grad():
            for group in self.param_groups:
                for p in group["params"]:
                    p.fill_(float("nan"))
        return result

    monkeypatch.setattr(torch.optim.Adam, "step", poisoned)
    code, _, stderr = convert(cli, tiny, out)
    line = assert_clean_error(code, stderr, out)
    assert "layer 1" in line and ("NaN" in line or "diverged" in line)


def test_nan_fit_never_written(tmp_path, tiny, cli, monkeypatch):
    """Were a fit to return NaN states unnoticed, the writer still refuses them, naming the layer."""
    import importlib

    from dynconvert.dynamics.fit import fit_weight

    cv = importlib.import_module("dynconvert.dynamics.conversion")

    def nan_fit(*a, **k):
        fit = fit_weight(*a, **k)
        if k.get("name") == "3":
            fit.states_in[0, 0, 0] = float("nan")
        return fit

    monkeypatch.setattr(cv, "fit_weight", nan_fit)
    out = tmp_path / "out.dyn"
    code, _, stderr = convert(cli, tiny, out)
    line = assert_clean_error(code, stderr, out)
    assert ("layer 3" in line or "3.states_in" in line) and "NaN" in line
    assert not (tmp_path / "out.dyn.partial" / "00001.safetensors").exists(), "a NaN fit was checkpointed"


def test_write_dyn_refuses_nan(tmp_path):
    with pytest.raises(DynError, match="layer.states_out contains NaN"):
        write_dyn(tmp_path / "x.dyn", {"layer.states_out": torch.tensor([1.0, float("nan")])}, {})
    assert not (tmp_path / "x.dyn").exists()
