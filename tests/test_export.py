"""dynconvert export: ONNX (checked in a real ONNX Runtime session), .pth, compact fp16 .dyn."""

import json
import re
import sys

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torchvision

import dynconvert
from dynconvert.dynfile.format import FORMAT_VERSION, META_KEY
from dynconvert.io.safetensors_io import read_safetensors, write_safetensors
from helpers import one_line_error
from helpers_report import convert_tiny, convert_torchvision, header

DIFF = re.compile(r"max abs diff (\S+) \((\S+) x max \|output\|")


def _export_onnx_and_check(cli, dyn, out, *extra):
    """Export via the CLI; then check the graph is dense and re-run it in ORT at another batch size."""
    code, stdout, err = cli("export", dyn, "--onnx", out, *extra)
    assert code == 0, err
    assert "proves nothing" not in err  # live outputs: the check compared real numbers
    diff, ratio = (float(v) for v in DIFF.search(stdout).groups())
    assert ratio <= 1e-4 and diff >= 0
    graph = onnx.load(str(out)).graph
    names = [i.name for i in graph.initializer]
    assert not any(n.endswith(("states_out", "states_in", "coupling")) for n in names)  # weights, not states
    meta = json.loads(read_safetensors(dyn)[1][META_KEY])
    shapes = [tuple(i.dims) for i in graph.initializer]
    for info in meta["layers"].values():  # each converted layer is one dense initializer of its shape
        assert tuple(info["weight_shape"]) in shapes
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    return ratio


def test_resnet18_onnx_pth_and_fp16(cli, tmp_path):
    model, pth, dyn = convert_torchvision(cli, tmp_path, "resnet18", ["layer1.0.conv1", "layer3.0.conv1", "fc"])
    _export_onnx_and_check(cli, dyn, tmp_path / "r18.onnx", "--opset", "17")
    converted = dynconvert.load(dyn)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        want = converted(x)
    session = ort.InferenceSession(str(tmp_path / "r18.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": x.numpy()})[0]  # batch 3: the batch axis is dynamic
    assert np.abs(got - want.numpy()).max() <= 1e-4 * want.abs().max().item()

    # .pth: the plain architecture loads it and computes what the converted model computes
    code, _, err = cli("export", dyn, "--pth", tmp_path / "r18_dense.pth", "--safetensors", tmp_path / "r18_fp16.dyn")
    assert code == 0, err
    plain = torchvision.models.resnet18(num_classes=10).eval()
    plain.load_state_dict(torch.load(tmp_path / "r18_dense.pth", weights_only=True))
    with torch.no_grad():
        assert (plain(x) - want).abs().max() <= 1e-5 * want.abs().max()

    # fp16 states: stored as F16, same metadata, loads back as float32 and stays close
    h = header(tmp_path / "r18_fp16.dyn")
    assert h["layer1.0.conv1.states_out"]["dtype"] == "F16" and h["layer1.0.bn1.weight"]["dtype"] == "F32"
    meta16 = json.loads(h["__metadata__"][META_KEY])
    meta32 = json.loads(read_safetensors(dyn)[1][META_KEY])
    assert meta16["layers"] == meta32["layers"] and meta16["source"] == meta32["source"] and meta16["state_dtype"] == "fp16"
    half = dynconvert.load(tmp_path / "r18_fp16.dyn")
    assert half.layer1[0].conv1.states_out.dtype == torch.float32
    with torch.no_grad():
        assert (half(x) - want).abs().max() <= 1e-2 * want.abs().max()
    assert (tmp_path / "r18_fp16.dyn").stat().st_size < dyn.stat().st_size


def test_mobilenet_v2_onnx(cli, tmp_path):
    _, _, dyn = convert_torchvision(cli, tmp_path, "mobilenet_v2", ["features.2.conv.0.0", "features.17.conv.2", "classifier.1"])
    assert _export_onnx_and_check(cli, dyn, tmp_path / "mnv2.onnx") <= 1e-4


def test_custom_model_onnx_pth_and_parity_failure(cli, tmp_path, monkeypatch):
    model, pth, dyn, factory = convert_tiny(cli, tmp_path, "tiny_export_net")
    try:
        _export_onnx_and_check(cli, dyn, tmp_path / "tiny.onnx", "--model", factory, "--opset", "13")
        assert onnx.load(str(tmp_path / "tiny.onnx")).opset_import[0].version == 13
        code, _, err = cli("export", dyn, "--pth", tmp_path / "tiny_dense.pth", "--model", factory)
        assert code == 0, err
        plain = __import__("tiny_export_net").build().eval()
        plain.load_state_dict(torch.load(tmp_path / "tiny_dense.pth", weights_only=True))
        x = torch.randn(2, 3, 16, 16)
        with torch.no_grad():
            assert torch.allclose(plain(x), dynconvert.load(dyn, factory=factory)(x), atol=1e-6)

        # ONNX Runtime disagreeing with PyTorch: one line, non-zero exit, nothing left behind
        real_run = ort.InferenceSession.run
        monkeypatch.setattr(ort.InferenceSession, "run", lambda self, *a, **k: [o + 1.0 for o in real_run(self, *a, **k)])
        line = one_line_error(*cli("export", dyn, "--onnx", tmp_path / "bad.onnx", "--model", factory))
        assert "disagrees" in line
    finally:
        sys.path.remove(str(tmp_path))
    assert not (tmp_path / "bad.onnx").exists()
    assert not list(tmp_path.glob(".*.part"))


def test_bad_input_and_outputs(cli, tmp_path):
    model = _mlp()
    conv = dynconvert.convert(model, steps=1, min_params=0, input_size=(3, 4, 4))
    conv.source = dynconvert.api.Source("module")
    dyn = tmp_path / "m.dyn"
    dynconvert.save(conv, dyn)
    torch.save(model.state_dict(), tmp_path / "m.pth")
    data = dyn.read_bytes()
    (tmp_path / "truncated.dyn").write_bytes(data[:-50])
    corrupt = bytearray(data)
    corrupt[-20] ^= 0x55
    (tmp_path / "corrupt.dyn").write_bytes(bytes(corrupt))
    tensors, raw = read_safetensors(dyn)
    meta = json.loads(raw[META_KEY])
    meta["format_version"] = FORMAT_VERSION + 1
    write_safetensors(tmp_path / "newer.dyn", tensors, {META_KEY: json.dumps(meta)})

    out = tmp_path / "out"
    out.mkdir()
    for flag, name in (("--onnx", "x.onnx"), ("--pth", "x.pth"), ("--safetensors", "x.dyn")):
        for bad, words in ((tmp_path / "m.pth", "not a .dyn"), (tmp_path / "truncated.dyn", "truncated"),
                           (tmp_path / "corrupt.dyn", "checksum"), (tmp_path / "newer.dyn", "newer")):
            assert words in one_line_error(*cli("export", bad, flag, out / name))
        # unwritable outputs: a missing folder, an existing file without --force, a directory
        assert "does not exist" in one_line_error(*cli("export", dyn, flag, tmp_path / "nowhere" / name))
        (out / "exists").write_text("keep")
        assert "already exists" in one_line_error(*cli("export", dyn, flag, out / "exists"))
        assert "directory" in one_line_error(*cli("export", dyn, flag, out))
    assert "nothing to export" in one_line_error(*cli("export", dyn))
    assert "--dtype" in one_line_error(*cli("export", dyn, "--safetensors", out / "x.dyn", "--dtype", "int3"))
    assert sorted(p.name for p in out.iterdir()) == ["exists"] and (out / "exists").read_text() == "keep"


def _mlp():
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))


def test_api_exports_module_and_materialize_selection(tmp_path):
    torch.manual_seed(0)
    conv = dynconvert.convert(_mlp(), steps=1, min_params=0, metric="l1", input_size=(3, 4, 4))
    res = dynconvert.export_onnx(conv.model, tmp_path / "m.onnx", input_size=(3, 4, 4))
    assert res.max_abs_diff <= 1e-4 * res.output_scale and res.path.exists()
    dyn = tmp_path / "m.dyn"
    dynconvert.save(conv, dyn)
    dynconvert.export_safetensors(dyn, tmp_path / "sel.dyn", dtype="bf16", materialize_layers=["3"])
    h = header(tmp_path / "sel.dyn")
    assert h["1.states_out"]["dtype"] == "BF16" and h["3.weight"]["shape"] == [10, 64] and "3.states_out" not in h
    meta = json.loads(h["__metadata__"][META_KEY])
    assert list(meta["layers"]) == ["1"] and meta["skipped"][-1]["name"] == "3"
    loaded = dynconvert.load(tmp_path / "sel.dyn", model=_mlp())
    x = torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        want = conv.model(x)
        assert (loaded(x) - want).abs().max() <= 2e-2 * want.abs().max()


def test_onnx_check_on_all_zero_outputs_says_it_proves_nothing(cli, tmp_path):
    """torchvision starts some heads at zero (ViT): then every output is 0 and the parity check
    compares zeros. The export still succeeds, but says so instead of claiming a match."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    torch.nn.init.zeros_(model.fc.weight)
    torch.nn.init.zeros_(model.fc.bias)
    pth, dyn = tmp_path / "zero_head.pth", tmp_path / "zero_head.dyn"
    torch.save(model.state_dict(), pth)
    code, _, err = cli("convert", pth, "--out", dyn, "--steps", "2", "--min-params", "0", "--include", "layer1.0.conv1",
                       "--input-size", "3,32,32")
    assert code == 0, err
    code, stdout, err = cli("export", dyn, "--onnx", tmp_path / "zero_head.onnx")
    assert code == 0, err
    assert "every output of the model is 0" in err and "proves nothing" in err
