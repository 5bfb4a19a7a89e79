"""dynconvert report: counts checked against the files themselves and FlopCounterMode."""

import json
import sys

import pytest
import torch
import torchvision
from torch.utils.flop_counter import FlopCounterMode

from dynconvert.dynfile.format import FORMAT_VERSION, META_KEY
from dynconvert.io.safetensors_io import read_safetensors, write_safetensors
from helpers import one_line_error
from helpers_report import convert_tiny, convert_torchvision, count_params, header

INCLUDE = ["layer1.0.conv1", "layer2.0.downsample.0", "fc"]


@pytest.fixture(scope="module")
def r18(tmp_path_factory):
    from typer.testing import CliRunner

    from dynconvert.cli import app

    def cli(*args):
        r = CliRunner().invoke(app, [str(a) for a in args])
        return r.exit_code, r.stdout, r.stderr

    tmp = tmp_path_factory.mktemp("r18")
    model, pth, dyn = convert_torchvision(cli, tmp, "resnet18", INCLUDE)
    return model, pth, dyn


def test_json_counts_match_the_files_and_flopcountermode(r18, cli):
    model, pth, dyn = r18
    code, out, err = cli("report", dyn, "--json")
    assert code == 0, err
    rep = json.loads(out)
    t = rep["totals"]

    # parameters, counted from the original checkpoint and the .dyn's safetensors header directly
    original = torch.load(pth, weights_only=True)
    assert t["original_params"] == count_params({k: v.shape for k, v in original.items()}) == 11_181_642
    dyn_header = {k: v["shape"] for k, v in header(dyn).items() if k != "__metadata__"}
    assert t["dyn_params"] == count_params(dyn_header)
    assert t["original_bytes"] == pth.stat().st_size and t["dyn_bytes"] == dyn.stat().st_size

    # dense FLOPs: FlopCounterMode on the original model, total and per layer
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 3, 32, 32))
    assert t["dense_flops"] == counter.get_total_flops()
    per_module = counter.get_flop_counts()
    assert [r["name"] for r in rep["layers"]] == INCLUDE
    for r in rep["layers"]:
        assert set(r) >= {"name", "shape", "dense_params", "state_params", "weight_rel_error", "svd_rel_error",
                          "dense_flops", "weightfree_flops"}
        w = original[f"{r['name']}.weight"]
        assert r["shape"] == list(w.shape) and r["dense_params"] == w.numel()
        states = sum(count_params({k: s}) for k, s in dyn_header.items() if k.startswith(r["name"] + ".")
                     and k.rsplit(".", 1)[-1] in ("states_out", "states_in", "coupling", "offset"))
        assert r["state_params"] == states < r["dense_params"]
        assert r["dense_flops"] == sum(per_module[f"ResNet.{r['name']}"].values()) > 0
        assert 0 < r["weightfree_flops"]  # l1/linear has a weight-free path
        assert 0 < r["weight_rel_error"] and 0 < r["svd_rel_error"] < 1

    # totals tie out: converted layers' weight-free FLOPs replace their dense FLOPs
    conv = rep["layers"]
    assert t["weightfree_flops"] == t["dense_flops"] - sum(r["dense_flops"] for r in conv) + sum(r["weightfree_flops"] for r in conv)
    assert t["original_params"] - t["dyn_params"] == sum(r["dense_params"] - r["state_params"] for r in conv)
    assert t["mean_weight_rel_error"] == pytest.approx(sum(r["weight_rel_error"] for r in conv) / 3)
    assert rep["input_size"] == [3, 32, 32]


def test_input_size_override_changes_flops(r18, cli):
    _, _, dyn = r18
    code, out, err = cli("report", dyn, "--json", "--input-size", "3,64,64")
    assert code == 0, err
    model = torchvision.models.resnet18(num_classes=10).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 3, 64, 64))
    assert json.loads(out)["totals"]["dense_flops"] == counter.get_total_flops()


def test_rich_and_markdown_show_the_decision_figures(r18, cli):
    _, pth, dyn = r18
    rep = json.loads(cli("report", dyn, "--json")[1])
    t = rep["totals"]
    for flag in ([], ["--markdown"]):
        code, out, err = cli("report", dyn, *flag)
        assert code == 0, err
        assert f"{t['original_params']:,} -> {t['dyn_params']:,}" in out
        assert "file bytes" in out and "weight-free path" in out and "truncated SVD" in out
        assert f"{t['mean_weight_rel_error']:.4f}" in out and f"{t['mean_svd_rel_error']:.4f}" in out
        assert all(name in out for name in INCLUDE)
    assert cli("report", dyn, "--markdown")[1].count("\n| ") == 1 + len(INCLUDE)  # header + rows


def test_report_custom_model_needs_and_uses_its_factory(tmp_path, cli):
    model, pth, dyn, factory = convert_tiny(cli, tmp_path, "tiny_report_net")
    try:
        one_line_error(*cli("report", dyn, "--json"))  # the factory is never imported on the file's word
        code, out, err = cli("report", dyn, "--json", "--model", factory)
        assert code == 0, err
    finally:
        sys.path.remove(str(tmp_path))
    rep = json.loads(out)
    assert rep["totals"]["original_params"] == sum(p.numel() for p in model.parameters())
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 3, 16, 16))
    assert rep["totals"]["dense_flops"] == counter.get_total_flops()
    assert [r["name"] for r in rep["layers"]] == ["features.3", "head"]


def test_report_api_on_a_module():
    import dynconvert
    from dynconvert.api import dyn_metadata

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    conv = dynconvert.convert(model, steps=1, min_params=0, metric="sql2", input_size=(3, 4, 4))
    rep = dynconvert.build_report(conv.model, meta=dyn_metadata(conv))
    assert rep["totals"]["original_params"] == 48 * 64 + 64 + 64 * 10 + 10
    assert rep["totals"]["dense_flops"] == 2 * (48 * 64 + 64 * 10)
    assert all(r["weightfree_flops"] > 0 for r in rep["layers"])


# ---------------------------------------------------------------- bad input


def _rewrite_meta(src, dst, **changes):
    tensors, raw = read_safetensors(src)
    meta = json.loads(raw[META_KEY])
    meta.update(changes)
    write_safetensors(dst, tensors, {META_KEY: json.dumps(meta)})


def test_bad_input_is_one_line_error(r18, cli, tmp_path):
    _, pth, dyn = r18
    data = dyn.read_bytes()
    (tmp_path / "truncated.dyn").write_bytes(data[: len(data) // 2])
    corrupt = bytearray(data)
    corrupt[-100] ^= 0xFF  # a tensor byte: the checksum catches it
    (tmp_path / "corrupt.dyn").write_bytes(bytes(corrupt))
    _rewrite_meta(dyn, tmp_path / "newer.dyn", format_version=FORMAT_VERSION + 1)
    cases = {
        pth: "",  # a .pth, not a .dyn
        tmp_path / "truncated.dyn": "truncated",
        tmp_path / "corrupt.dyn": "checksum",
        tmp_path / "newer.dyn": "newer",
        tmp_path / "missing.dyn": "no such file",
    }
    cases[pth] = "not a .dyn"
    for path, words in cases.items():
        line = one_line_error(*cli("report", path, "--json"))
        assert words in line, line
    one_line_error(*cli("report", dyn, "--json", "--markdown"))
    assert "--input-size" in one_line_error(*cli("report", dyn, "--input-size", "1,32,32"))  # ResNet wants 3 channels
    one_line_error(*cli("report", dyn, "--input-size", "3,32"))
