"""ONNX Runtime latency of whole converted models (``bench --onnx``, ``report --latency``) and
the factorized export it times."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch


@pytest.fixture
def small_dyn(tmp_path, cli, small_factory):
    ckpt, factory = small_factory
    out = tmp_path / "m.dyn"
    code, _, err = cli("convert", ckpt, "--out", out, "--model", factory, "--steps", "20", "--min-params", "100",
                       "--input-size", "3,8,8", "--threads", "1")
    assert code == 0, err
    return out, ckpt, factory


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
