"""ONNX Runtime latency of whole converted models (``bench --onnx``, ``report --latency``) and
the factorized export it times."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import torch


def test_factorized_export_matches_and_is_two_thin_layers(tmp_path, small_dyn):
    """Each sql2 layer becomes two thin ops whose product is the converted layer (export_onnx
    checks ORT against PyTorch), with rank-(H*d+2) inner dimensions."""
    from dynconvert.deploy.export import export_onnx
    from dynconvert.dynfile.format import read_dyn

    dyn, _, factory = small_dyn
    res = export_onnx(dyn, tmp_path / "f.onnx", factory=factory, factorize=True)
    assert res.kept == [] and res.max_abs_diff <= res.tolerance
    graph = onnx.load(str(tmp_path / "f.onnx")).graph
    assert [n.op_type for n in graph.node].count("Conv") == 2  # one 3x3 conv -> 3x3 + 1x1
    _, meta = read_dyn(dyn)
    rc, rl = (meta["layers"][k]["spec"]["groups"] * meta["layers"][k]["spec"]["dim"] + 2 for k in ("0", "3"))
    shapes = {tuple(i.dims) for i in graph.initializer}
    # conv 16x3x3x3 -> 3x3 conv to rc channels, 1x1 conv back to 16; linear 576->32 via rl
    assert {(rc, 3, 3, 3), (16, rc, 1, 1), (32, rl)} <= shapes and ((576, rl) in shapes or (rl, 576) in shapes), shapes


def test_factorized_keeps_full_rank_metrics_dense(tmp_path, cli, small_factory):
    from dynconvert.deploy.export import export_onnx

    ckpt, factory = small_factory
    out = tmp_path / "l1.dyn"
    code, _, err = cli("convert", ckpt, "--out", out, "--model", factory, "--steps", "3", "--min-params", "100",
                       "--metric", "l1", "--input-size", "3,8,8", "--threads", "1")
    assert code == 0, err
    res = export_onnx(out, tmp_path / "l1.onnx", factory=factory, factorize=True)
    assert res.kept and all("not a low-rank product" in why for _, why in res.kept)


def test_onnx_latency_rows(small_dyn):
    from dynconvert.deploy.bench import latency_markdown, onnx_latency

    dyn, ckpt, factory = small_dyn
    res = onnx_latency(dyn, original=ckpt, factory=factory, batches=(1, 4), threads=(1,), repeats=3)
    kinds = [r["export"] for r in res["rows"]]
    assert kinds == ["original", "default", "materialized", "factorized", "weight-free"]
    by = {r["export"]: r for r in res["rows"]}
    for r in res["rows"]:
        assert r["bytes"] > 0 and r["b1_ms"] > 0 and r["b4_ms"] > 0 and r["b1_threads"] == 1
    # the original and the materialized graph are the same layers: same size to within the names
    assert abs(by["original"]["bytes"] - by["materialized"]["bytes"]) < 0.05 * by["original"]["bytes"]
    assert "layout auto" in by["default"]["note"]
    table = latency_markdown(res)
    assert table.count("\n| ") == 5 and "factorized" in table and "batch 4 ms" in table


def test_bench_onnx_cli_and_report_latency(cli, small_dyn):
    dyn, _, factory = small_dyn
    code, stdout, err = cli("bench", "--onnx", dyn, "--model", factory, "--batches", "1", "--repeats", "2",
                            "--threads", "1", "--json")
    assert code == 0, err
    res = json.loads(stdout)
    assert [r["export"] for r in res["rows"]][:3] == ["original", "default", "materialized"] and res["batches"] == [1]
    code, stdout, err = cli("report", dyn, "--model", factory, "--latency", "--json")
    assert code == 0, err
    assert {r["export"] for r in json.loads(stdout)["latency"]["rows"]} >= {"original", "default", "materialized", "weight-free"}
    code, stdout, err = cli("report", dyn, "--model", factory, "--latency", "--markdown")
    assert code == 0 and "ONNX Runtime latency (batch 1)" in stdout and "| factorized |" in stdout, err
    code, stdout, err = cli("bench", "--onnx", dyn, "--batches", "1")
    assert code != 0 and "--model" in err and "Traceback" not in err, err


def test_auto_layout_rule():
    """``layout.auto_choice``: factorized where two thin products are clearly cheaper, materialized
    for a small layer (per-node cost), and for a budgeted file only layouts that keep its bytes."""
    from dynconvert.deploy import layout
    from dynconvert.dynamics.modules import DynLinear, DynSpec

    big = DynLinear(1024, 1024, False, DynSpec(2, 4, "sql2", "linear"))
    small = DynLinear(16, 16, False, DynSpec(1, 2, "sql2", "linear"))
    l1 = DynLinear(1024, 1024, False, DynSpec(2, 4, "l1", "linear"))
    assert layout.auto_choice(big, 1) == "factorized" and layout.auto_choice(big, 196) == "factorized"
    assert layout.auto_choice(small, 1) == "materialized"
    assert layout.auto_choice(l1, 1) == "materialized"  # no factorized form; weight-free is slow in ORT
    # a budgeted file holding the l1 layer's int8 states: the dense weight would not fit, its states do
    states = 2 * 4 * 2048 + 64
    assert layout.auto_choice(l1, 1, stored_bytes=states + 8 * 8 * 1024) == "weight-free"


def test_export_cli_layout_flags(cli, small_dyn, tmp_path):
    dyn, _, factory = small_dyn
    code, stdout, err = cli("export", dyn, "--onnx", tmp_path / "f.onnx", "--model", factory, "--layout", "factorized")
    assert code == 0 and "layout factorized: 2 factorized" in stdout, (stdout, err)
    code, stdout, err = cli("export", dyn, "--onnx", tmp_path / "a.onnx", "--model", factory)
    assert code == 0 and "layout auto:" in stdout, (stdout, err)
    for args, message in ((("--layout", "sideways"), "unknown layout"), (("--activations", "int8"), "needs --calib"),
                          (("--activations", "int4"), "unknown --activations")):
        code, _, err = cli("export", dyn, "--onnx", tmp_path / "x.onnx", "--model", factory, *args)
        assert code != 0 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "x.onnx").exists()
    code, stdout, err = cli("export", dyn, "--onnx", tmp_path / "q.onnx", "--model", factory, "--activations", "int8",
                            "--calib", "fake", "--calib-images", "8")
    assert code == 0 and "int8 activations" in stdout, (stdout, err)
    assert "QuantizeLinear" in {n.op_type for n in onnx.load(str(tmp_path / "q.onnx")).graph.node}


def test_numba_missing_gives_one_line_note(monkeypatch, capsys):
    from dynconvert.dynamics import fused

    monkeypatch.setattr(fused, "njit", None)
    monkeypatch.setattr(fused, "UNAVAILABLE", "ImportError: no module named numba")
    monkeypatch.setattr(fused, "_noted", False)
    assert not fused.available() and not fused.available()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "numba cannot load" in err and "eager path" in err
