"""benchmarks.real_model --merge: runs split over processes make one table and plot; runs of
other crops are refused."""

import json

import pytest

from benchmarks.real_model import main

FP32 = dict(name="fp32 original", kind="fp32", method="fp32", bytes=100, ratio=1.0, top1=1.0, top5=1.0, seconds=1.0)


def run(path, rows, calib=4):
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(dict(model="m", input_size=[3, 8, 8], fp32_bytes=100, budgets=["1/8"], machine={},
                                    timing={}, args=dict(calib=calib, eval=8, seed=0), rows=[FP32, *rows])))
    return str(path)


def row(name, size, top1):
    return dict(name=name, kind="x", method=name, bytes=size, ratio=size / 100, top1=top1, top5=1.0, seconds=1.0)


def test_merged_runs_keep_every_row_once(tmp_path):
    a = run(tmp_path / "a" / "results.json", [row("int8", 25, 0.9)])
    b = run(tmp_path / "b" / "results.json", [row("dynconvert @ 1/8", 12, 0.8), row("dynconvert @ 1/6", 17, 0.85)])
    result = main(["--merge", a, b, "--out", str(tmp_path / "m")])
    assert [r["name"] for r in result["rows"]] == ["fp32 original", "int8", "dynconvert @ 1/8", "dynconvert @ 1/6"]
    written = json.loads((tmp_path / "m" / "results.json").read_text())
    assert written["merged_from"] == [a, b] and written["rows"] == result["rows"]


def test_runs_on_other_crops_are_not_merged(tmp_path):
    a = run(tmp_path / "a" / "results.json", [], calib=4)
    b = run(tmp_path / "b" / "results.json", [], calib=8)
    with pytest.raises(SystemExit, match="the same crops"):
        main(["--merge", a, b, "--out", str(tmp_path / "m")])
    assert not (tmp_path / "m").exists()
