import pytest
import torch
import torch.nn as nn
import torchvision

import dynconvert
from dynconvert.dynamics.modules import DynConv2d, DynLinear, DynSpec, choose_spec, materialize, relations


@pytest.mark.parametrize("metric", ["l1", "l2", "sql2"])
@pytest.mark.parametrize("kernel", ["linear", "inverse"])
def test_materialize_matches_definition(metric, kernel):
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(3, 5, 2, generator=g), torch.rand(3, 7, 2, generator=g)
    lam, off = torch.randn(3, generator=g), torch.tensor(0.3)
    w = materialize(x, y, lam, off, metric, kernel)
    p = {"l1": 1, "l2": 2, "sql2": 2}[metric]
    want = torch.zeros(5, 7)
    for k in range(3):
        for i in range(5):
            for j in range(7):
                dist = (x[k, i] - y[k, j]).abs().pow(p).sum()
                dist = dist if metric == "sql2" else dist.pow(1 / p)
                phi = dist if kernel == "linear" else 1 / (dist + 1e-2)
                want[i, j] += lam[k] * phi
    assert torch.allclose(w, want + off, atol=1e-4)
    assert relations(x, y, metric, kernel).shape == (3, 5, 7)


def test_choose_spec_respects_ratio():
    for m, n in [(64, 576), (512, 4608), (10, 128), (1000, 2048)]:
        spec = choose_spec(m, n, 0.25, 4, "sql2", "linear")
        assert spec.state_params(m, n) <= 0.25 * m * n
    assert choose_spec(4, 4, 0.1, 4, "l1", "linear") is None


def test_converted_layers_run_and_train():
    spec = DynSpec(2, 3, "l1", "linear")
    lin = DynLinear.from_dense(nn.Linear(20, 8), spec)
    conv = DynConv2d.from_dense(nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2), spec)
    out = conv(torch.randn(2, 4, 9, 9)).sum() + lin(torch.randn(3, 20)).sum()
    out.backward()
    assert lin.states_out.grad is not None and conv.states_in.grad is not None


def test_convert_load_roundtrip(tmp_path):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    torch.save(model.state_dict(), tmp_path / "r18.pth")
    from dynconvert.api import convert_checkpoint
    from dynconvert.dynamics.conversion import ConvertOptions

    conv = convert_checkpoint(tmp_path / "r18.pth", tmp_path / "r18.dyn", ConvertOptions(steps=3, min_params=100_000))
    assert len(conv.layers) > 0
    loaded = dynconvert.load(tmp_path / "r18.dyn")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (loaded(x) - conv.model(x)).abs().max() <= 1e-6


def test_same_seed_byte_identical(tmp_path, cli, small_factory):
    ckpt, factory = small_factory
    for name in ("a.dyn", "b.dyn"):
        code, _, err = cli("convert", ckpt, "--out", tmp_path / name, "--model", factory,
                           "--steps", "20", "--min-params", "100", "--seed", "3", "--input-size", "3,8,8")
        assert code == 0, err
    assert (tmp_path / "a.dyn").read_bytes() == (tmp_path / "b.dyn").read_bytes()


def test_calibrated_conversion_lowers_output_error(tmp_path, cli):
    from dynconvert.cli.demo import lenet5
    from dynconvert.dynfile.format import read_dyn
    from dynconvert.dynamics.fit import input_whitener, output_rel_error
    from dynconvert.dynamics.conversion import input_moments

    torch.manual_seed(0)
    torch.save(lenet5().state_dict(), tmp_path / "lenet.pth")
    args = ["--model", "dynconvert.cli.demo:lenet5", "--input-size", "1,32,32", "--steps", "10", "--min-params", "2000"]
    code, _, err = cli("convert", tmp_path / "lenet.pth", "--out", tmp_path / "w.dyn", *args)
    assert code == 0, err
    code, _, err = cli("convert", tmp_path / "lenet.pth", "--out", tmp_path / "c.dyn", *args,
                       "--calib", "digits", "--calib-images", "128", "--calib-steps", "30")
    assert code == 0, err
    _, meta = read_dyn(tmp_path / "c.dyn")
    assert all(v["fit_mode"] == "calibrated" for v in meta["layers"].values())
    # the same layers fitted to weights only have a larger output error on the same inputs
    plain = dynconvert.load(tmp_path / "w.dyn", factory="dynconvert.cli.demo:lenet5")
    original = lenet5()
    original.load_state_dict(torch.load(tmp_path / "lenet.pth"))
    from dynconvert.io.data import calibration_batches

    batches = calibration_batches("digits", {"kind": "factory"}, (1, 32, 32), 128)
    moments = input_moments(original, {n: original.get_submodule(n) for n in meta["layers"]}, batches)
    for name, info in meta["layers"].items():
        w = original.get_submodule(name).weight.detach().reshape(info["matrix_shape"])
        plain_err = output_rel_error(w, plain.get_submodule(name).weight_matrix().detach(), input_whitener(moments[name]))
        assert info["output_rel_error"] < plain_err
