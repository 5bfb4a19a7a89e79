"""Issue 10: the rough edges a new user hits, each checked the way the user meets it (the CLI, run
from the user's own folder). Each test failed on the code before the fix."""

import dataclasses
import os
import re
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from helpers import ROOT, env, one_line_error
from _tiny import NEW_USER_NET as NET, import_written


def dynconvert(*args, cwd, extra=None):
    """The installed `dynconvert` script, as a user runs it: its sys.path starts with its bin/ folder,
    not with the folder it runs in (``python -m dynconvert`` would hide that)."""
    script = Path(sys.executable).parent / "dynconvert"
    cmd = [str(script)] if script.exists() else [sys.executable, "-P", "-m", "dynconvert"]
    r = subprocess.run([*cmd, *map(str, args)], cwd=cwd, env={**env(), "COLUMNS": "200", **(extra or {})},
                       capture_output=True, text=True, timeout=300)
    return r.returncode, r.stdout, r.stderr


def one_error(code, out, err):
    """helpers.one_line_error, and the usage-error exit code 2 (typer's box drew with '╭')."""
    assert code == 2 and "╭" not in out + err, (code, out, err)
    return one_line_error(code, out, err)


@pytest.fixture
def user_folder(tmp_path, monkeypatch):
    """A user's project folder: mynet.py, and what its training script saved, a state dict and a
    whole module (pickled as ``mynet.Net``; saved here, not by a second interpreter: 4 s each)."""
    mynet = import_written(monkeypatch, tmp_path, "mynet", NET)
    torch.manual_seed(0)
    net = mynet.build()
    torch.save(net.state_dict(), tmp_path / "my.pth")
    torch.save(net, tmp_path / "whole.pt")
    return tmp_path


def test_factory_in_current_folder(user_folder):
    code, out, err = dynconvert("convert", "my.pth", "--model", "mynet:build", "--out", "m.dyn", "--steps", "2",
                                "--input-size", "3,8,8", cwd=user_folder)
    assert code == 0, err
    assert (user_folder / "m.dyn").is_file()


def test_pickled_module_from_a_script_in_current_folder(user_folder):
    code, out, err = dynconvert("convert", "whole.pt", "--trust-pickle", "--out", "w.dyn", "--steps", "2",
                                "--input-size", "3,8,8", cwd=user_folder)
    assert code == 0, err


def test_every_skipped_layer_listed_with_its_reason_and_singular(user_folder):
    code, out, err = dynconvert("convert", "my.pth", "--model", "mynet:build", "--out", "m.dyn", "--steps", "2",
                                "--input-size", "3,8,8", cwd=user_folder)
    assert code == 0, err
    # body.3 (128 x 10 = 1,280 weights) is below min_params
    assert "skipped body.3: 1280 weights < min_params 10000" in out
    assert "1 layer converted (1 skipped)" in out


def test_include_matching_nothing_is_an_error(user_folder):
    line = one_error(*dynconvert("convert", "my.pth", "--model", "mynet:build", "--out", "m.dyn",
                                 "--include", "nomatch*", "--input-size", "3,8,8", cwd=user_folder))
    assert "'nomatch*' matches no Linear/Conv2d layer" in line and "body.1" in line
    assert not (user_folder / "m.dyn").exists()


def test_onnx_given_to_convert(tmp_path, cli):
    net = torch.nn.Sequential(torch.nn.Linear(4, 2))
    torch.onnx.export(net, torch.zeros(1, 4), str(tmp_path / "m.onnx"), dynamo=False)
    for name in ("m.onnx", "renamed.bin"):  # recognized by its bytes too
        (tmp_path / name).write_bytes((tmp_path / "m.onnx").read_bytes())
        code, out, err = cli("convert", tmp_path / name, "--out", tmp_path / "x.dyn")
        assert code == 2 and "is an ONNX model" in err and "trust-pickle" not in err, err


@pytest.fixture
def torchvision_pth(tmp_path):
    import torchvision

    torch.manual_seed(0)
    torch.save(torchvision.models.squeezenet1_1(num_classes=4).state_dict(), tmp_path / "sq.pth")
    return tmp_path / "sq.pth"


def test_verify_and_report_name_a_checkpoint_or_text_file(tmp_path, cli, torchvision_pth):
    (tmp_path / "notes.dyn").write_text("shopping list: eggs, milk\n" * 3)
    for command in ("verify", "report", "export"):
        code, out, err = cli(command, torchvision_pth, *(["--pth", tmp_path / "o.pth"] if command == "export" else []))
        assert code == 2 and "is a PyTorch checkpoint, not a .dyn" in err and "header length" not in err, err
        code, out, err = cli(command, tmp_path / "notes.dyn", *(["--pth", tmp_path / "o.pth"] if command == "export" else []))
        assert code == 2 and "is a text file, not a .dyn" in err, err


def test_text_file_given_to_convert(tmp_path, cli):
    (tmp_path / "notes.pth").write_text("shopping list: eggs, milk\n")
    code, out, err = cli("convert", tmp_path / "notes.pth", "--out", tmp_path / "x.dyn")
    assert code == 2 and "is a text file" in err and not re.search(r"\(\d+\)", err), err


def test_usage_errors_are_one_line(tmp_path, cli):
    line = one_error(*dynconvert("convert", cwd=tmp_path))  # the installed script, as a user meets it
    assert line == "error: missing argument 'checkpoint'; see `dynconvert convert --help`"
    for args in (["nosuchcommand"], ["convert", "x.pth", "--no-such-flag"], ["convert", "x.pth", "--out", "y.dyn", "--ratio", "abc"],
                 ["export", "x.dyn", "--dtype"]):
        line = one_error(*cli(*args))
        assert "--help" in line, line  # says where to look


def test_export_onnx_without_a_path_uses_the_input_name(user_folder):
    code, out, err = dynconvert("convert", "my.pth", "--model", "mynet:build", "--out", "m.dyn", "--steps", "2",
                                "--input-size", "3,8,8", cwd=user_folder)
    assert code == 0, err
    code, out, err = dynconvert("export", "m.dyn", "--onnx", "--model", "mynet:build", cwd=user_folder)
    assert code == 0, err
    assert (user_folder / "m.onnx").is_file() and "wrote m.onnx" in out


def test_help_shows_defaults_read_from_the_options():
    """Every flag that sets a ConvertOptions/FinetuneOptions field shows that field's default, and a
    flag with a real default has the dataclass's (no second copy to drift, as --distill-weight did)."""
    from typer.main import get_command

    from dynconvert.cli import app
    from dynconvert.dynamics.conversion import ConvertOptions
    from dynconvert.train.finetune import FinetuneOptions

    commands = get_command(app).commands
    checked = 0
    for command, options in (("convert", ConvertOptions), ("finetune", FinetuneOptions)):
        params = {p.name: p for p in commands[command].params}
        for f in dataclasses.fields(options):
            p = params.get(f.name)
            if p is None or f.default is dataclasses.MISSING or f.default is None:
                continue
            if p.default is None:  # filled by a recipe when not given: the help says the default
                assert f"[default: {f.default}]" in p.help, (command, f.name, p.help)
            else:
                assert p.default == f.default, (command, f.name, p.default, f.default)
            checked += 1
    assert checked >= 25
    assert FinetuneOptions().distill_weight == 0.5  # a teacher given means distilling from it


def test_report_readable_on_80_columns(tmp_path, cli, torchvision_pth):
    code, out, err = cli("convert", torchvision_pth, "--out", tmp_path / "sq.dyn", "--steps", "1", "--min-params", "0",
                         "--include", "features.3.*", "--input-size", "3,32,32")
    assert code == 0, err
    code, out, err = dynconvert("report", tmp_path / "sq.dyn", cwd=tmp_path, extra={"COLUMNS": "80"})
    assert code == 0, err
    lines = out.splitlines()
    assert "…" not in out and max(len(line) for line in lines) <= 80, out
    for name in ("features.3.squeeze", "features.3.expand1x1", "features.3.expand3x3"):
        assert any(line.strip().startswith(name) for line in lines), out  # every layer has its row, name whole


def test_demo_last_line_names_no_deleted_file():
    from dynconvert.cli.demo import DemoSettings, run_demo

    log = []
    run_demo(None, DemoSettings(train_epochs=1, finetune_epochs=1, fit_steps=2), log=log.append)
    for line in log:
        for path in re.findall(r"(/\S+\.(?:onnx|dyn|pth))", line):
            assert Path(path).exists(), f"{line!r} names a file that is gone"
    assert "--out-dir" in log[-1]


@pytest.mark.slow  # builds a wheel and installs it into a folder (offline: no build isolation)
def test_recipes_ship_in_the_wheel(tmp_path):
    """A non-editable install (a wheel) carries the top-level recipes/: `--recipe resnet18` finds them."""
    src = tmp_path / "src"  # a copy: building in place would leave build/ and *.egg-info in the tree
    for folder in ("dynconvert", "recipes"):
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    r = subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(src)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    (wheel,) = tmp_path.glob("dynconvert-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for recipe in ("resnet18", "resnet50", "mobilenet_v2", "vgg16"):
        assert f"dynconvert/_recipes/{recipe}.toml" in names, names
    site = tmp_path / "site"
    r = subprocess.run([*pip, "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    code = "from dynconvert.dynamics.recipes import find_recipe; print(find_recipe('resnet18'))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                       env={**os.environ, "PYTHONPATH": str(site)}, timeout=120)
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()) == site / "dynconvert" / "_recipes" / "resnet18.toml"


def test_docs_state_the_default_init():
    from dynconvert.dynamics.conversion import ConvertOptions

    method = (ROOT / "docs" / "method.md").read_text()
    assert f"`--init {ConvertOptions().init}`" in method and "(the default)" in method
    assert "States start uniform in [0, 1) as in" not in method


def test_convert_changes_the_model_passed_in_as_documented():
    """README: `convert` replaces the layers of the model passed in (result.model is that model)."""
    import dynconvert

    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
    conv = dynconvert.convert(model, min_params=0, steps=2, include=["0"])
    assert conv.model is model and type(model[0]).__name__ != "Linear"
    readme = (ROOT / "README.md").read_text()
    assert "changed in place" in readme and "copy.deepcopy(model)" in readme


@pytest.mark.parametrize("head,kind", [
    (struct.pack("<Q", 0x280) + b'{"__metadata__":{}}', "safetensors"),  # a header length whose first byte is 0x80
    (b"\x80\x02\x8a\x0a", "pickle"), (b"PK\x03\x04rest", "zip"), (b"\x08\x07\x12\x07pytorch", "onnx"),
    (b"plain words\n", "text"), (b"\x08", None), (b"\x00\x01\xff", None),
])
def test_file_kinds_from_their_bytes(tmp_path, head, kind):
    from dynconvert.io.fileio import sniff

    (tmp_path / "f.bin").write_bytes(head)
    assert sniff(tmp_path / "f.bin") == kind
