import json

import onnx
import pytest
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

import dynconvert
from dynconvert.deploy.export import export_onnx
from dynconvert.dynamics.modules import DynConv2d, DynLinear, DynSpec
from dynconvert.deploy.opcount import count
from dynconvert.dynamics.weightfree import WeightFreeConv2d, WeightFreeLinear, to_weight_free, weightfree_flops


def _fill(layer, gen, grid=None):
    """Random states (on a coarse grid when ``grid``: many ties among and between states)."""
    h, m, d = layer.states_out.shape
    n = layer.states_in.shape[1]
    x, y = torch.rand(h, m, d, generator=gen), torch.rand(h, n, d, generator=gen)
    if grid:
        x, y = (x * grid).round() / grid, (y * grid).round() / grid
    layer.set_states(x, y, torch.randn(h, generator=gen), torch.randn((), generator=gen))
    if layer.bias is not None:
        layer.bias.data.normal_(generator=gen)
    return layer


def _close(got, want, rel=2e-5):
    assert got.shape == want.shape
    err = (got - want).abs().max().item()
    assert err <= rel * max(want.abs().max().item(), 1.0), err


@pytest.mark.parametrize("metric", ["l1", "sql2"])
@pytest.mark.parametrize("m,n,h,d", [(1, 1, 1, 1), (7, 13, 2, 3), (23, 37, 3, 2), (64, 5, 1, 4), (5, 300, 4, 4)])
@pytest.mark.parametrize("batch", [1, 6])
def test_linear_exact(metric, m, n, h, d, batch):
    gen = torch.Generator().manual_seed(m * 100 + n)
    layer = _fill(DynLinear(n, m, True, DynSpec(h, d, metric)), gen)
    wf = WeightFreeLinear(layer)
    x = torch.randn(batch, n, generator=gen)
    with torch.no_grad():
        _close(wf(x), layer(x))
        _close(wf(x.reshape(batch, 1, n)), layer(x.reshape(batch, 1, n)))  # leading dims kept


def test_l1_in_place_and_out_of_place_agree():
    """Eager inference computes in a reused scratch buffer; export/autograd out of place: same numbers."""
    from dynconvert.dynamics.weightfree import clear_workspace, l1_matvec

    gen = torch.Generator().manual_seed(5)
    conv = _fill(DynConv2d.from_dense(nn.Conv2d(6, 9, 2, groups=3), DynSpec(2, 2, "l1")), gen)
    core = WeightFreeConv2d(conv).core
    v = torch.randn(7, 3 * core.n, generator=gen)
    e = core._expanded()
    a = l1_matvec(v, e, core.lam, core.m, core.n, core.g, reuse=False)
    b = l1_matvec(v, e, core.lam, core.m, core.n, core.g, reuse=True)
    c = l1_matvec(v[:2], e, core.lam, core.m, core.n, core.g, reuse=True)  # a smaller call reuses the buffer
    d = l1_matvec(v[:2], e, core.lam, core.m, core.n, core.g, reuse=False)
    # Equal bit for bit at the same batch size; across batch sizes only to rounding (on some CPUs the
    # kernels sum in another order for 2 rows than for 7).
    assert torch.equal(a, b) and torch.equal(c, d) and torch.allclose(a[:2], c, rtol=1e-6, atol=1e-6)
    clear_workspace()
    x = torch.randn(2, 6, 5, 5, generator=gen, requires_grad=True)  # autograd takes the out-of-place path
    WeightFreeConv2d(conv)(x).sum().backward()
    assert x.grad is not None


@pytest.mark.parametrize("grid", [1, 4])
def test_l1_ties_exact(grid):
    """States on a grid: equal input states, and output states equal to input states."""
    gen = torch.Generator().manual_seed(grid)
    layer = _fill(DynLinear(50, 40, False, DynSpec(2, 2, "l1")), gen, grid=grid)
    layer.states_out.data[:, :5] = layer.states_in.data[:, :5]  # exact x == y ties
    wf = WeightFreeLinear(layer)
    x = torch.randn(3, 50, generator=gen)
    with torch.no_grad():
        _close(wf(x), layer(x))


CONVS = [
    dict(cin=6, cout=9, k=3, stride=2, padding=1, dilation=2, groups=3),
    dict(cin=4, cout=6, k=(3, 2), stride=(1, 2), padding=(2, 0), dilation=1, groups=2),
    dict(cin=5, cout=7, k=1, stride=2, padding=0, dilation=1, groups=1),  # 1x1, strided slicing path
    dict(cin=4, cout=8, k=1, stride=1, padding=1, dilation=1, groups=2),  # padded grouped 1x1
    dict(cin=3, cout=5, k=4, stride=1, padding="same", dilation=1, groups=1),  # asymmetric 'same' padding
]


@pytest.mark.parametrize("metric", ["l1", "sql2"])
@pytest.mark.parametrize("cfg", CONVS)
@pytest.mark.parametrize("batch", [1, 3])
def test_conv_exact(metric, cfg, batch):
    gen = torch.Generator().manual_seed(cfg["cin"] * 10 + cfg["cout"])
    dense = nn.Conv2d(cfg["cin"], cfg["cout"], cfg["k"], cfg["stride"], cfg["padding"], cfg["dilation"], cfg["groups"])
    layer = _fill(DynConv2d.from_dense(dense, DynSpec(2, 3, metric)), gen)
    wf = WeightFreeConv2d(layer)
    x = torch.randn(batch, cfg["cin"], 11, 10, generator=gen)
    with torch.no_grad():
        _close(wf(x), layer(x))


@pytest.mark.parametrize("metric", ["l1", "sql2"])
def test_flop_counts_are_what_runs(metric):
    """The count report prints equals the ops measured while the path runs, and never an m x n tensor."""
    gen = torch.Generator().manual_seed(1)
    lin = _fill(DynLinear(300, 200, True, DynSpec(4, 4, metric)), gen)
    conv = _fill(DynConv2d.from_dense(nn.Conv2d(6, 12, 3, padding=1, groups=3), DynSpec(2, 2, metric)), gen)
    x = torch.randn(4, 300, generator=gen)
    c = count(WeightFreeLinear(lin).core, x)
    assert c.flops == weightfree_flops(lin, 4) > 0
    c = count(WeightFreeLinear(lin).core, x[:1])  # one vector: intermediates are O(H*d*(m+n)), not m*n
    assert c.flops == weightfree_flops(lin, 1) and c.largest_bytes < c.peak_bytes < 200 * 300 * 4
    xc = torch.randn(2, 6, 7, 7, generator=gen)
    c = count(WeightFreeConv2d(conv), xc)
    vectors = 2 * 7 * 7
    assert c.flops == weightfree_flops(conv, vectors) + vectors * 12  # + the bias add
    if metric == "sql2":  # all of it is matrix products: torch's own counter must agree
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            WeightFreeLinear(lin).core(x)
        assert fc.get_total_flops() == weightfree_flops(lin, 4)
    assert weightfree_flops(_fill(DynLinear(30, 20, False, DynSpec(2, 2, "l2")), gen), 4) is None


def _mixed_model(gen):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2), nn.ReLU(),
        nn.Conv2d(8, 16, 1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 4 * 4, 10),
    )
    specs = {"0": DynSpec(2, 2, "l1"), "2": DynSpec(2, 2, "sql2"), "4": DynSpec(1, 3, "l2"), "7": DynSpec(3, 2, "l1")}
    from dynconvert.dynamics.conversion import set_submodule
    from dynconvert.dynamics.layers import make_dynamic

    for name, spec in specs.items():
        set_submodule(model, name, _fill(make_dynamic(model.get_submodule(name), spec), gen))
    return model.eval()


def test_to_weight_free_keeps_other_kernels():
    gen = torch.Generator().manual_seed(2)
    model = _mixed_model(gen)
    x = torch.randn(2, 3, 8, 8, generator=gen)
    with torch.no_grad():
        want = model(x)
        wf, kept = to_weight_free(model)
        got = wf(x)
    assert [name for name, _ in kept] == ["4"] and "l2" in kept[0][1]
    assert isinstance(wf[0], WeightFreeConv2d) and isinstance(wf[7], WeightFreeLinear)
    _close(got, want)


def test_weight_free_onnx_runs_in_ort(tmp_path):
    import onnxruntime as ort

    gen = torch.Generator().manual_seed(3)
    model = _mixed_model(gen)
    res = export_onnx(model, tmp_path / "wf.onnx", input_size=(3, 8, 8), weight_free=True)
    assert res.max_abs_diff <= res.tolerance and [k for k, _ in res.kept] == ["4"]
    graph = onnx.load(str(tmp_path / "wf.onnx")).graph
    ops = {node.op_type for node in graph.node}
    assert {"CumSum", "Gather", "MatMul"} <= ops
    # no m x n weight is stored: the largest initializer (the linear's sorted states) is under its 10 x 256 matrix
    sizes = {i.name: int(torch.tensor(list(i.dims)).prod()) for i in graph.initializer}
    assert max(sizes.values()) < 10 * 256 and "7.core.order" in sizes
    sess = ort.InferenceSession(str(tmp_path / "wf.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(5, 3, 8, 8, generator=gen)  # another batch size: the batch axis is dynamic
    with torch.no_grad():
        want = model(x)
    _close(torch.from_numpy(sess.run(None, {"input": x.numpy()})[0]), want, rel=1e-4)


def test_load_weight_free_and_export_cli(tmp_path, cli, small_factory):
    ckpt, factory = small_factory
    code, _, err = cli("convert", ckpt, "--out", tmp_path / "m.dyn", "--model", factory,
                       "--steps", "5", "--min-params", "100", "--metric", "l1", "--input-size", "3,8,8")
    assert code == 0, err
    dense = dynconvert.load(tmp_path / "m.dyn", factory=factory)
    notes = []
    wf = dynconvert.load(tmp_path / "m.dyn", factory=factory, weight_free="all", on_note=notes.append)
    assert isinstance(wf[3], WeightFreeLinear) and notes == []
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        _close(wf(x), dense(x))
    code, stdout, err = cli("export", tmp_path / "m.dyn", "--onnx", tmp_path / "m.onnx", "--weight-free", "--model", factory)
    assert code == 0, err
    assert "weight-free" in stdout and (tmp_path / "m.onnx").stat().st_size > 0
    code, _, err = cli("export", tmp_path / "m.dyn", "--onnx", tmp_path / "m.onnx", "--weight-free", "--model", factory)
    assert code == 2 and "already exists" in err and "Traceback" not in err


def test_load_weight_free_follows_the_cost_rule(tmp_path):
    """weight_free=True runs from states only the L1 layers the cost model predicts faster: a wide
    Linear at batch 1 (reading its 16 MiB matrix costs more than a pass over the states), not a
    conv over a 16x16 map (256 vectors per call); "all" runs both from states. Outputs match."""
    from dynconvert.dynamics.fused import pick_path
    from dynconvert.dynamics.weightfree import vectors_per_call

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 16 * 16, 1024))
    conv = dynconvert.convert(net, metric="l1", groups=1, dim=2, steps=2, min_params=0, input_size=(3, 16, 16))
    dynconvert.save(conv, tmp_path / "m.dyn")
    assert vectors_per_call(conv.model, (3, 16, 16)) == {"0": 256, "3": 1}
    assert pick_path(16, 27, 2, vectors=256) == "dense" and pick_path(1024, 4096, 2, vectors=1) == "weightfree"
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        want = conv.model(x)
    notes = []
    wf = dynconvert.load(tmp_path / "m.dyn", model=nn.Sequential(*net), weight_free=True, on_note=notes.append)
    assert isinstance(wf[0], DynConv2d) and isinstance(wf[3], WeightFreeLinear)
    assert len(notes) == 1 and notes[0].startswith("0: runs materialized") and "ms dense" in notes[0]
    with torch.no_grad():
        _close(wf(x), want, rel=1e-4)
    wf = dynconvert.load(tmp_path / "m.dyn", model=nn.Sequential(*net), weight_free="all")
    assert isinstance(wf[0], WeightFreeConv2d) and isinstance(wf[3], WeightFreeLinear)
    with torch.no_grad():
        _close(wf(x), want, rel=1e-4)
    from dynconvert.errors import DynError

    with pytest.raises(DynError, match="weight_free"):
        dynconvert.load(tmp_path / "m.dyn", model=nn.Sequential(*net), weight_free="some")


def test_bench_json(cli):
    code, stdout, err = cli("bench", "--json", "--sizes", "64", "--no-resnet50", "--repeats", "2", "--threads", "1")
    assert code == 0, err
    rows = json.loads(stdout)["rows"]
    assert [(r["m"], r["n"], r["batch"], r["device"]) for r in rows] == [(64, 64, 1, "cpu"), (64, 64, 32, "cpu")]
    for r in rows:
        assert r["hd"] == 16 and all(r[k] > 0 for k in ("dense_ms", "svd_ms", "weightfree_ms", "sql2_ms"))
        assert 0 < r["weightfree_largest_bytes"] and r["weightfree_peak_bytes"] > 0
    code, stdout, err = cli("bench", "--sizes", "256", "--no-resnet50", "--repeats", "1", "--batches", "1", "--threads", "1")
    assert code == 0 and "256x256" in stdout and "dense/L1" in stdout and "dense matrix on every CPU row: yes" in " ".join(stdout.split())
    code, _, err = cli("bench", "--sizes", "abc")
    assert code == 2 and "--sizes" in err and "Traceback" not in err
    if not torch.cuda.is_available():
        code, _, err = cli("bench", "--device", "cuda")
        assert code == 2 and "no CUDA device" in err


@pytest.mark.parametrize("cfg", [(40, 50, 1, 2, 2), (12, 7, 3, 1, 3), (64, 300, 1, 4, 4)])
def test_fused_l1_matches_eager(cfg, monkeypatch):
    """The numba kernel (when installed) and the eager ops give the same products, ties included."""
    from dynconvert.dynamics import fused
    from dynconvert.dynamics.weightfree import WeightFreeCore, l1_matvec

    if not fused.available():
        pytest.skip("numba not installed (optional extra 'fast'); the eager path is tested above")
    m, n, g, h, d = cfg
    gen = torch.Generator().manual_seed(m + n)
    if g == 1:
        layer = _fill(DynLinear(n, m, False, DynSpec(h, d, "l1")), gen, grid=4)
    else:
        layer = _fill(DynConv2d.from_dense(nn.Conv2d(g * n, m, 1, groups=g), DynSpec(h, d, "l1")), gen, grid=4)
    core = WeightFreeCore(layer)
    v = torch.randn(5, g * n, generator=gen)
    eager = l1_matvec(v, core._expanded(), core.lam, core.m, core.n, core.g)
    with torch.no_grad():
        got = core(v)
        _close(got, eager)
        monkeypatch.setattr(fused, "available", lambda: False)  # the default install's path
        assert torch.equal(core(v), eager)


def test_pick_path_rule():
    """The cost model picks weight-free for a big layer at batch 1 and dense where the batch amortizes
    the weight read over many vectors; without numba it is more cautious, never less."""
    from dynconvert.dynamics.fused import pick_path, predicted_seconds

    assert pick_path(16384, 16384, 16, vectors=1, fused=True) == "weightfree"
    assert pick_path(1024, 1024, 16, vectors=32, fused=True) == "dense"
    assert pick_path(512, 4608, 16, vectors=49 * 32, fused=True) == "dense"  # a conv over a 7x7 map
    for shape in [(1024, 1024), (4096, 4096), (1000, 2048)]:
        for vectors in (1, 8, 32):
            fast, slow = predicted_seconds(*shape, 16, 1, vectors, True)[0], predicted_seconds(*shape, 16, 1, vectors, False)[0]
            assert slow > fast
            if pick_path(*shape, 16, 1, vectors, fused=False) == "weightfree":
                assert pick_path(*shape, 16, 1, vectors, fused=True) == "weightfree"
    from dynconvert.dynamics.fused import layer_path

    assert layer_path(DynLinear(8192, 8192, False, DynSpec(4, 4, "l1")), 1) == pick_path(8192, 8192, 16, 1, 1)
    assert layer_path(DynLinear(8192, 8192, False, DynSpec(4, 4, "sql2")), 1) == "dense"  # no L1 path
