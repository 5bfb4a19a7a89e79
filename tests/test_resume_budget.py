"""Issue 20: a budgeted conversion (--size) that is killed resumes where it was, and writes the very
bytes of an uninterrupted run. It saves its synthesized inputs and each layer's measured candidates
(dynfile/resume.BudgetCheckpoint) in OUT.partial/; the allocation and the fit are redone from them."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from _tiny import import_written

import dynconvert.dynfile.resume as rs
from dynconvert.api import convert_checkpoint
from dynconvert.dynamics.conversion import ConvertOptions
from dynconvert.errors import DynError

ROOT = Path(__file__).resolve().parent.parent
NET = textwrap.dedent(
    """
    import torch.nn as nn

    def build():
        layers, c = [], 3
        for width in (16, 32, 32, 64, 64, 64):
            layers += [nn.Conv2d(c, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
            c = width
        return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10))
    """
)
UNITS = 7  # six convs and the Linear
# measures three layers, says so on stderr and waits for the test's SIGKILL
STOP_AFTER_THREE = textwrap.dedent(
    """
    import sys, time
    import dynconvert.dynfile.resume as rs
    _real = rs.BudgetCheckpoint.save_measured
    def _save(self, index, unit, record):
        _real(self, index, unit, record)
        if len(self.units) == 3:
            print("MEASURED-THREE", file=sys.stderr, flush=True)
            time.sleep(120)
    rs.BudgetCheckpoint.save_measured = _save
    from dynconvert.cli import main
    main()
    """
)


@pytest.fixture
def net(tmp_path, monkeypatch):
    """The net's checkpoint and factory in ``tmp_path``; in this process, synthesis takes 20 steps
    (its 500 would take a minute here; the subprocess test runs the real ones)."""
    import functools

    import dynconvert.api

    monkeypatch.setattr(dynconvert.api, "bn_synthetic_batches",
                        functools.partial(dynconvert.api.bn_synthetic_batches, steps=20))
    (tmp_path / "stop_after_three.py").write_text(STOP_AFTER_THREE)
    build = import_written(monkeypatch, tmp_path, "resnet_like", NET).build
    torch.manual_seed(0)
    model = build()
    with torch.no_grad():  # BatchNorm statistics to synthesize inputs from (data-free)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2)
    torch.save(model.state_dict(), tmp_path / "net.pth")
    return tmp_path


def args_for(folder: Path, out: str) -> list[str]:
    return ["convert", folder / "net.pth", "--out", folder / out, "--model", "resnet_like:build", "--size", "1/4",
            "--min-params", "100", "--input-size", "3,8,8"]


def run(folder, args, script=None):
    code = [str(folder / script)] if script else ["-m", "dynconvert"]
    return subprocess.Popen([sys.executable, *code, *map(str, args)], cwd=folder, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{folder}", COLUMNS="200"))


def convert(folder, out, size=0.25, on_note=lambda s: None, **kw):
    return convert_checkpoint(folder / "net.pth", folder / out, ConvertOptions(min_params=100), model="resnet_like:build",
                              size=size, input_size=(3, 8, 8), on_note=on_note, **kw)


def test_an_interrupted_size_conversion_resumes_to_the_same_bytes(net, monkeypatch):
    convert(net, "fresh.dyn")
    real, calls = rs.BudgetCheckpoint.save_measured, []

    def interrupt_after_three(self, index, unit, record):
        real(self, index, unit, record)
        calls.append(unit)
        if len(calls) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(rs.BudgetCheckpoint, "save_measured", interrupt_after_three)
    with pytest.raises(KeyboardInterrupt):
        convert(net, "out.dyn")
    partial = rs.partial_dir(net / "out.dyn")
    assert not (net / "out.dyn").exists()
    assert sorted(f.name for f in partial.iterdir()) == [
        "budget-inputs.safetensors", *(f"budget-unit{i:05d}.safetensors" for i in range(3))]

    measured = []
    monkeypatch.setattr(rs.BudgetCheckpoint, "save_measured", lambda self, i, u, r: (measured.append(u), real(self, i, u, r)))
    notes = []
    convert(net, "out.dyn", on_note=notes.append, resume=True)
    assert any(n.startswith(f"resumed 3 measured layers and the synthesized inputs from {partial}") for n in notes), notes
    assert len(measured) == UNITS - 3  # only the layers the interrupted run had not measured
    assert not partial.exists(), "the partial folder outlived the final write"
    assert (net / "out.dyn").read_bytes() == (net / "fresh.dyn").read_bytes()


def test_resume_refuses_other_options_and_a_keep_search(net, monkeypatch):
    real = rs.BudgetCheckpoint.save_measured

    def stop(self, *a):
        real(self, *a)
        raise KeyboardInterrupt

    monkeypatch.setattr(rs.BudgetCheckpoint, "save_measured", stop)
    with pytest.raises(KeyboardInterrupt):
        convert(net, "out.dyn")
    monkeypatch.setattr(rs.BudgetCheckpoint, "save_measured", real)
    with pytest.raises(DynError, match="other options"):
        convert(net, "out.dyn", size=0.2, resume=True)
    with pytest.raises(DynError, match="--resume is not available with --keep"):
        convert(net, "out.dyn", size=None, keep=0.9, resume=True)
    assert not (net / "out.dyn").exists() and rs.saved(rs.partial_dir(net / "out.dyn")) == 2  # inputs + one layer


@pytest.mark.slow
def test_sigkill_then_resume_writes_the_bytes_of_an_uninterrupted_run(net):
    """Real processes: SIGKILL (no handler runs) after three measured layers, then `--resume`."""
    fresh = run(net, args_for(net, "fresh.dyn"))
    assert fresh.wait(timeout=300) == 0, fresh.stderr.read()
    killed = run(net, args_for(net, "out.dyn"), script="stop_after_three.py")
    lines = []
    for line in killed.stderr:
        lines.append(line)
        if "MEASURED-THREE" in line:
            break
    assert "MEASURED-THREE" in "".join(lines), "".join(lines)
    killed.kill()
    killed.wait()
    assert not (net / "out.dyn").exists()

    resumed = run(net, [*args_for(net, "out.dyn"), "--resume"])
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert "resumed 3 measured layers and the synthesized inputs" in out + err, out + err
    assert not rs.partial_dir(net / "out.dyn").exists()
    assert (net / "out.dyn").read_bytes() == (net / "fresh.dyn").read_bytes()
