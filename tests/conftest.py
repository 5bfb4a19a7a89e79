import pytest
import torch
from _tiny import SMALLNET


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """Tests run small models, fastest on one thread; on a shared machine more threads only spin
    against each other. OMP_NUM_THREADS=1 also makes `convert`'s default one worker, so in-process
    tests (monkeypatched fits) see every fit, whatever the machine. A test about threads sets its own."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="session")
def quick_probe():
    """Every conversion ends with a probe (budget/probe.py), and --keep and data-free budgets
    synthesize their inputs when there are no images: a few steps on a few inputs keep tests fast
    (the real sizes are measured in docs/budget.md). Session-wide, so that module-scoped fixtures,
    set up before any function-scoped one, convert with it too (a ResNet-18 fixture took 45 s on
    the full probe)."""
    from dynconvert.budget import keep, probe, synth

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(synth, "STEPS", 50)
        mp.setattr(probe, "PROBE_STEPS", 5)
        mp.setattr(probe, "PROBE_IMAGES", 16)
        mp.setattr(keep, "FIT_STEPS", 20)
        yield


@pytest.fixture
def cli():
    """Run the dynconvert CLI in-process: returns (exit_code, stdout, stderr)."""
    from typer.testing import CliRunner

    from dynconvert.cli import app

    def run(*args):
        result = CliRunner().invoke(app, [str(a) for a in args])
        return result.exit_code, result.stdout, result.stderr

    return run


@pytest.fixture
def small_factory(tmp_path, monkeypatch):
    """A small non-torchvision net's checkpoint and its importable factory: (m.pth, "smallnet:build")."""
    import importlib

    (tmp_path / "smallnet.py").write_text(SMALLNET)
    monkeypatch.syspath_prepend(str(tmp_path))
    torch.manual_seed(0)
    torch.save(importlib.import_module("smallnet").build().state_dict(), tmp_path / "m.pth")
    return tmp_path / "m.pth", "smallnet:build"


@pytest.fixture
def small_dyn(tmp_path, cli, small_factory):
    """small_factory's net converted (20 steps): (m.dyn, m.pth, "smallnet:build")."""
    ckpt, factory = small_factory
    out = tmp_path / "m.dyn"
    code, _, err = cli("convert", ckpt, "--out", out, "--model", factory, "--steps", "20", "--min-params", "100",
                       "--input-size", "3,8,8", "--threads", "1")
    assert code == 0, err
    return out, ckpt, factory
