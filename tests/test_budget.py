"""Byte-budgeted conversion (--size / --target-bytes): allocation, real file bytes, read-back, errors."""

import pytest
import torch
import torch.nn as nn

import dynconvert
from dynconvert.budget.allocation import Candidate, allocate, parse_bytes, parse_size
from dynconvert.errors import DynError
from dynconvert.budget.outputs import gptq_quantize, output_error
from dynconvert.budget.quant import fake_quant
from helpers import one_line_error
from _tiny import BUDGET_NET as NET_SOURCE
from _tiny import import_written


def bn_net(seed: int = 0) -> nn.Sequential:
    """A small conv net with BatchNorm whose running statistics come from data (as trained ones do)."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 128, 1), nn.BatchNorm2d(128), nn.ReLU(),
        nn.Conv2d(128, 128, 3, padding=1, groups=128), nn.BatchNorm2d(128), nn.ReLU(),
        nn.Conv2d(128, 256, 1), nn.BatchNorm2d(256), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(256, 512),
    )
    net.train()
    with torch.no_grad():
        for _ in range(5):
            net(torch.randn(16, 3, 16, 16) * 0.8 + 0.1)
    return net.eval()


def images(count: int = 48, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(count, 3, 16, 16, generator=g) * 0.8 + 0.1
    return [x[i:i + 16] for i in range(0, count, 16)]


def test_parse_size_and_bytes():
    assert parse_size("1/8") == 0.125 and parse_size("12.5%") == 0.125 and parse_size("0.25") == 0.25
    assert parse_bytes("5MB") == 5_000_000 and parse_bytes("1.5MiB") == 1572864 and parse_bytes("800kB") == 800_000
    for bad in ("2", "0", "x", "1/0"):
        with pytest.raises(DynError):
            parse_size(bad)
    with pytest.raises(DynError):
        parse_bytes("12 parsecs")


def test_allocate_meets_the_budget_and_spends_it_where_error_falls_most():
    cheap, mid, dear = Candidate("int4", 10), Candidate("int8", 20), Candidate("fp32", 40)
    options = {
        "sensitive": [(cheap, 100.0), (mid, 1.0), (dear, 0.0)],
        "robust": [(cheap, 1.0), (mid, 0.5), (dear, 0.0)],
    }
    assert allocate(options, 35) == {"sensitive": 1, "robust": 0}  # the bytes go where error falls most
    assert allocate(options, 40) == {"sensitive": 1, "robust": 1}
    assert allocate(options, 60) == {"sensitive": 2, "robust": 1}
    assert allocate(options, 80) == {"sensitive": 2, "robust": 2}
    assert allocate(options, 19) is None


def test_gptq_beats_round_to_nearest_on_correlated_inputs():
    torch.manual_seed(0)
    w = torch.randn(64, 48)
    mix = torch.randn(48, 48)
    x = torch.randn(2000, 48) @ mix  # strongly correlated inputs, as real activations are
    c = x.T @ x / len(x)
    q, scale = gptq_quantize(w, c, 4)
    rtn = fake_quant(w, 4, (0,))
    assert output_error(w, q, c) < 0.7 * output_error(w, rtn, c)
    ints = q / scale
    assert torch.allclose(ints, ints.round(), atol=1e-4) and ints.abs().max() <= 7 + 1e-4


def test_gptq_reuses_its_inverse_factor_only_for_the_same_unchanged_moments():
    torch.manual_seed(3)
    w = torch.randn(16, 48)
    x = torch.randn(500, 48) @ torch.randn(48, 48)
    c = x.T @ x / len(x)
    first, _ = gptq_quantize(w, c, 4)
    assert torch.equal(gptq_quantize(w, c, 4)[0], first)  # the factor kept from the call before
    assert torch.equal(gptq_quantize(w, c.clone(), 4)[0], first)  # computed again: the same numbers
    d = torch.linspace(0.1, 10, 48)
    c.mul_(d[:, None] * d[None, :])  # changed in place: the kept factor must not be used
    assert torch.equal(gptq_quantize(w, c, 4)[0], gptq_quantize(w, c.clone(), 4)[0])
    assert not torch.equal(gptq_quantize(w, c, 4)[0], first)


def test_budgeted_conversion_file_fits_and_reads_back(tmp_path):
    net = bn_net()
    reference = bn_net()
    original_bytes = sum(t.numel() * t.element_size() for t in net.state_dict().values())
    conv = dynconvert.convert(net, size=0.1, calib=images(), min_params=2000, input_size=(3, 16, 16))
    path = tmp_path / "m.dyn"
    dynconvert.save(conv, path)
    assert path.stat().st_size <= 0.1 * original_bytes
    assert conv.budget["calibration"] == "images"
    kinds = {row["kind"] for row in conv.budget["layers"]}
    assert "dyn" in kinds and kinds & {"int3", "int4", "int5", "int6", "int8"}, kinds  # below int4 everywhere: states must be used
    loaded = dynconvert.load(path, model=bn_net(seed=5))
    x = images(8, seed=9)[0]
    with torch.no_grad():
        assert torch.allclose(loaded(x), conv.model(x), atol=1e-5)
        agree = (conv.model(x).argmax(1) == reference(x).argmax(1)).float().mean()
    assert agree >= 0.5


@pytest.mark.slow
def test_data_free_conversion_runs_and_says_so(tmp_path):
    conv = dynconvert.convert(bn_net(), size=0.3, data_free=True, synthetic_images=8, input_size=(3, 16, 16))
    assert conv.budget["calibration"].startswith("synthetic")
    dynconvert.save(conv, tmp_path / "m.dyn")
    assert (tmp_path / "m.dyn").stat().st_size <= 0.3 * sum(t.numel() * 4 for t in bn_net().state_dict().values())


def test_distill_keeps_quantized_tensors_on_their_grid(tmp_path):
    teacher = bn_net()
    conv = dynconvert.convert(bn_net(), size=0.2, calib=images(), min_params=2000, input_size=(3, 16, 16),
                              reconstruct=0)  # the grids distill keeps are there before any reconstruction
    report = dynconvert.distill(conv, teacher, images(), steps=5, seconds=None)
    assert report["steps"] == 5
    dynconvert.save(conv, tmp_path / "d.dyn")  # refuses tensors that left their grid
    assert (tmp_path / "d.dyn").stat().st_size <= 0.2 * sum(t.numel() * 4 for t in teacher.state_dict().values())


@pytest.mark.parametrize("kwargs, message", [
    (dict(size=1e-6), "below the smallest"),
    (dict(target_bytes=10**9), "not below the original"),
    (dict(size=0.2, ratio=0.5), "give one of them"),
    (dict(size=0.2, target_bytes=1000), "not both"),
])
def test_budget_errors(kwargs, message):
    with pytest.raises(DynError, match=message):
        dynconvert.convert(bn_net(), calib=images(), input_size=(3, 16, 16), **kwargs)


def test_data_free_needs_batchnorm():
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 14 * 14, 10))
    with pytest.raises(DynError, match="BatchNorm"):
        dynconvert.convert(net, size=0.2, data_free=True, input_size=(3, 16, 16))


@pytest.fixture
def budget_ckpt(tmp_path, monkeypatch):
    mod = import_written(monkeypatch, tmp_path, "budgetnet", NET_SOURCE)
    torch.save(mod.build().state_dict(), tmp_path / "net.pth")
    torch.save(mod.build_plain().state_dict(), tmp_path / "plain.pth")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    return tmp_path


@pytest.mark.parametrize("ckpt, args, message", [
    ("net.pth", ["--size", "1/8", "--ratio", "0.5"], "give one of them"),
    ("net.pth", ["--size", "2"], "between 0 and 1"),
    ("net.pth", ["--size", "1/100000"], "below the smallest"),
    ("net.pth", ["--target-bytes", "1GB"], "not below the original"),
    ("net.pth", ["--size", "1/4", "--calib", "{tmp}/empty"], "image"),
    ("plain.pth", ["--size", "1/4", "--data-free", "--model", "budgetnet:build_plain"], "BatchNorm"),
    ("net.pth", ["--data-free", "--ratio", "0.5"], "needs a byte budget or a quality target"),
])
def test_cli_budget_errors(cli, budget_ckpt, ckpt, args, message):
    out = budget_ckpt / "out.dyn"
    args = [a.replace("{tmp}", str(budget_ckpt)) for a in args]
    model = [] if "--model" in args else ["--model", "budgetnet:build"]
    code, stdout, stderr = cli("convert", budget_ckpt / ckpt, "--out", out, "--input-size", "3,16,16", *model, *args)
    assert code == 2 and message in one_line_error(code, stdout, stderr, out=out)


def test_cli_budget_conversion_then_report(cli, budget_ckpt):
    out = budget_ckpt / "out.dyn"
    code, stdout, stderr = cli("convert", budget_ckpt / "net.pth", "--out", out, "--model", "budgetnet:build",
                               "--input-size", "3,16,16", "--size", "1/3", "--calib-images", "16")
    assert code == 0, stderr
    assert "synthetic" in stdout + stderr and "bytes for a budget of" in stdout
    code, stdout, stderr = cli("report", out, "--model", "budgetnet:build")
    assert code == 0, stderr
    assert "allocation" in stdout.lower()


@pytest.mark.slow
def test_finetune_keeps_a_budgeted_file_at_its_bytes(cli, budget_ckpt):
    out, tuned = budget_ckpt / "out.dyn", budget_ckpt / "tuned.dyn"
    common = ["--model", "budgetnet:build"]
    code, _, stderr = cli("convert", budget_ckpt / "net.pth", "--out", out, "--input-size", "3,16,16", "--size", "1/3",
                          "--calib-images", "16", *common)
    assert code == 0, stderr
    code, _, stderr = cli("finetune", out, "--data", "fake", "--teacher", budget_ckpt / "net.pth", "--unlabeled",
                          "--train", "all", "--max-steps", "2", "--batch-size", "4", "--out", tuned, *common)
    assert code == 0, stderr
    assert tuned.stat().st_size <= out.stat().st_size + 2048  # still stored quantized (fp32 would be ~3x); + the finetune record
    import dynconvert
    from dynconvert.dynfile.format import read_dyn

    assert {k: v["bits"] for k, v in read_dyn(tuned)[1]["quantized"].items()} == \
        {k: v["bits"] for k, v in read_dyn(out)[1]["quantized"].items()}
    dynconvert.load(tuned, factory="budgetnet:build")


def test_a_byte_budget_measures_no_candidate_far_below_its_share(monkeypatch):
    from dynconvert.budget import pipeline

    def table(target):
        setup = pipeline.prepare(bn_net(), min_params=2000)
        return setup, pipeline.measure(setup, images(), calibration="images", target_bytes=target)

    setup, every = table(None)  # --keep: any budget can be asked of the table
    fraction = 0.25
    floor = {u.name: pipeline.CHEAPEST_SHARE * fraction * 4 * u.numel for u in setup.units}
    below = {n: [r for r in rows if r["bytes"] < floor[n]] for n, rows in every.notes.items()}
    assert any(r["network_error"] is not None for rows in below.values() for r in rows)  # they are measured there
    _, banded = table(int(fraction * setup.original_bytes))
    assert banded.notes and all(r["bytes"] >= floor[n] for n, rows in banded.notes.items() for r in rows)
    assert all(len(banded.notes[n]) == len(every.notes[n]) - len(below[n]) for n in every.notes)
    # a budget that needs candidates below the floor somewhere measures every one: at a floor of 0.9 f
    # the cheapest candidates left (int8) would not fit in f
    monkeypatch.setattr(pipeline, "CHEAPEST_SHARE", 0.9)
    _, tight = table(int(fraction * setup.original_bytes))
    assert {n: len(rows) for n, rows in tight.notes.items()} == {n: len(rows) for n, rows in every.notes.items()}


def test_saved_measurements_resume_by_label_whatever_the_floor_offers_now():
    """A resumed unit's saved candidates are read by label, not by index into today's list: a retry's
    reserve can switch the floor's fallback, and the list offered then is another one."""
    from dynconvert.budget import pipeline

    class Saved:  # dynfile.resume.BudgetCheckpoint's two calls, in memory
        def __init__(self):
            self.records = {}

        def measured(self, unit):
            return self.records.get(unit)

        def save_measured(self, index, unit, record):
            self.records[unit] = record

    saved = Saved()
    setup = pipeline.prepare(bn_net(), min_params=2000)
    every = pipeline.measure(setup, images(), calibration="images", saved=saved)  # no floor: every candidate
    setup = pipeline.prepare(bn_net(), min_params=2000)
    resumed = pipeline.measure(setup, images(), calibration="images", saved=saved,
                               target_bytes=int(0.25 * setup.original_bytes))  # a floor: fewer offered now
    assert {n: [(c.label, e) for c, e in o] for n, o in resumed.options.items()} == \
        {n: [(c.label, e) for c, e in o] for n, o in every.options.items()}
    assert any(c.bytes < 0.125 * 4 * u.numel for u in setup.units for c, _ in resumed.options[u.name])


def test_an_fp16_layer_stays_fp16_in_the_file_and_in_the_onnx_graph(tmp_path, monkeypatch):
    import numpy as np
    import onnx

    from dynconvert.budget import pipeline

    real = pipeline.unit_candidates

    def fp16_for_3(unit, min_params, group=None):
        cands = real(unit, min_params, group)
        return [c for c in cands if c.kind == "fp16"] if unit.name == "3" else cands

    monkeypatch.setattr(pipeline, "unit_candidates", fp16_for_3)
    conv = dynconvert.convert(bn_net(), size=0.3, calib=images(), min_params=2000, input_size=(3, 16, 16))
    row = next(r for r in conv.budget["layers"] if r["name"] == "3")
    assert row["kind"] == "fp16" and row["bytes"] == 2 * 128 * 32 and row["choice"] == "dense fp16"
    w = conv.model[3].weight.detach()
    assert torch.equal(w, w.half().float()) and conv.quantized["3.weight"] == {"bits": 16}
    path = tmp_path / "m.dyn"
    dynconvert.save(conv, path)
    assert torch.equal(dynconvert.load(path, model=bn_net(seed=3))[3].weight, w)
    # the exporter folds the BatchNorm after it into the weight: the fp16 values stay fp16, times a
    # per-channel factor, instead of a float tensor of twice the bytes
    result = dynconvert.export_onnx(path, tmp_path / "m.onnx", model=bn_net(seed=3))
    assert not result.grew and result.bytes <= result.budget_bytes and result.max_abs_diff <= result.tolerance
    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    assert any(i.data_type == onnx.TensorProto.FLOAT16 and int(np.prod(i.dims)) == 128 * 32 for i in graph.initializer)


def test_budgeted_file_exports_to_onnx_with_int8_initializers(tmp_path):
    conv = dynconvert.convert(bn_net(), size=0.1, calib=images(), min_params=2000, input_size=(3, 16, 16))
    path = tmp_path / "m.dyn"
    dynconvert.save(conv, path)
    dense_bytes = sum(t.numel() * 4 for t in bn_net().state_dict().values())
    # the default export keeps the budget: the converted layer goes factorized, its int8 states
    # (a scale per state vector) staying integers in the thin layers' weights
    result = dynconvert.export_onnx(path, tmp_path / "d.onnx", model=bn_net(seed=3))
    assert "14" in result.layouts and set(result.layouts.values()) == {"factorized"}, result.layouts
    assert result.bytes <= result.budget_bytes and not result.grew
    assert len(result.quantized) >= 2 + 2 and result.max_abs_diff <= result.tolerance
    # the budget holds for the bytes on disk, graph structure included, not only for the weights
    conv.budget["target_bytes"] = (result.weight_bytes + result.bytes) // 2
    dynconvert.save(conv, tmp_path / "tight.dyn")
    with pytest.raises(DynError, match=r"would be [\d,]+ bytes on disk \([\d,]+ of weights\), over the file's budget of [\d,]+; the weights fit"):
        dynconvert.export_onnx(tmp_path / "tight.dyn", tmp_path / "t.onnx", model=bn_net(seed=3))
    assert not (tmp_path / "t.onnx").exists()
    # the materialized layout cannot: the export measures its own bytes against the budget, names what grew
    with pytest.raises(DynError, match=r"over the file's budget of [\d,]+; grew: 14: [\d,]+ B in the .dyn"):
        dynconvert.export_onnx(path, tmp_path / "m.onnx", model=bn_net(seed=3), layout_name="materialized")
    assert not (tmp_path / "m.onnx").exists()
    result = dynconvert.export_onnx(path, tmp_path / "m.onnx", model=bn_net(seed=3), keep_qdq=True, allow_larger=True,
                                    layout_name="materialized")
    assert result.quantized and result.weight_bytes > result.budget_bytes and result.grew
    # --keep-qdq: without its QDQ rules, ONNX Runtime dequantizes the constant weights once at load,
    # and computes the same outputs (the default export folds them without any session option)
    import onnx
    import onnxruntime as ort

    def session(fold):
        opts = ort.SessionOptions()
        if fold:
            opts.add_session_config_entry("session.disable_quant_qdq", "1")
            opts.optimized_model_filepath = str(tmp_path / "folded.onnx")
        return ort.InferenceSession(str(tmp_path / "m.onnx"), opts, providers=["CPUExecutionProvider"])

    assert any(n.op_type == "DequantizeLinear" for n in onnx.load(str(tmp_path / "m.onnx")).graph.node)
    x = {"input": torch.randn(2, 3, 16, 16).numpy()}
    folded, plain = session(True).run(None, x)[0], session(False).run(None, x)[0]
    assert not any(n.op_type == "DequantizeLinear" for n in onnx.load(str(tmp_path / "folded.onnx")).graph.node)
    assert abs(folded - plain).max() <= 1e-5 * abs(plain).max()
    # states stay states (int8) only in the weight-free graph; the materialized one expands them to fp32
    result = dynconvert.export_onnx(path, tmp_path / "wf.onnx", model=bn_net(seed=3), weight_free=True, allow_larger=True)
    assert (tmp_path / "wf.onnx").stat().st_size < 0.25 * dense_bytes, result.quantized


def test_input_vectors_of_a_map_smaller_than_the_kernel():
    """A Conv2d subclass that pads in its own forward (EfficientNet's "same" convs) can be fed a map
    smaller than its kernel by small calibration inputs: there are still patches to sample."""
    from dynconvert.budget.outputs import input_vectors

    conv = nn.Conv2d(8, 8, 5, groups=8)
    v = input_vectors(conv, torch.randn(2, 8, 2, 2), 100, torch.Generator().manual_seed(0))
    assert v.shape[1] == 25 and len(v) > 0
