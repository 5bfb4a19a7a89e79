"""ONNX export with the weights in one external data file, ``<out>.data`` (a graph over protobuf's
2 GiB cannot be one file): forced by ``external_data=True`` / ``--external-data``, automatic above
``onnx_files.EXTERNAL_DATA_ABOVE``; both files appear whole or not at all."""

import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from dynconvert.deploy import onnx_files
from dynconvert.deploy.export import export_onnx
from dynconvert.errors import DynError
from helpers import one_line_error


def _files(folder):
    """What an export may have left: graphs, data files, temporaries, the exporter's per-tensor files."""
    return sorted(p.name for p in folder.iterdir() if p.suffix not in (".dyn", ".pth", ".py") and p.name != "__pycache__")


def _check_pair(graph, model, res=None):
    """Both files, the graph small and naming its data by file name alone, ORT from the graph's
    path agreeing with PyTorch, and the reported bytes (``res``) those of both files."""
    data = graph.with_name(graph.name + ".data")
    assert data.is_file()
    if res is not None:
        assert res.path == graph and res.data_path == data
        assert res.bytes == graph.stat().st_size + data.stat().st_size
    assert graph.stat().st_size < 2048 < data.stat().st_size  # the weights are in the data file
    assert data.stat().st_mode == graph.stat().st_mode  # not the 0600 onnx creates it with
    bare = onnx.load(str(graph), load_external_data=False)
    locations = {e.value for i in bare.graph.initializer for e in i.external_data if e.key == "location"}
    assert locations == {data.name}
    assert {i.name for i in onnx.load(str(graph)).graph.initializer} == {i.name for i in bare.graph.initializer}
    onnx.checker.check_model(str(graph), full_check=True)
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        want = model(x).numpy()
    got = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_forced_and_automatic_external_data_then_one_file_again(tmp_path, small_dyn, monkeypatch):
    import dynconvert

    dyn, _, factory = small_dyn
    model = dynconvert.load(dyn, factory=factory).eval()
    res = export_onnx(dyn, tmp_path / "forced.onnx", factory=factory, external_data=True)
    _check_pair(tmp_path / "forced.onnx", model, res)
    moved = tmp_path / "elsewhere"  # the pair moves together: the location is relative
    moved.mkdir()
    for name in ("forced.onnx", "forced.onnx.data"):
        shutil.move(tmp_path / name, moved / name)
    _check_pair(moved / "forced.onnx", model)

    with monkeypatch.context() as small:  # above the threshold: automatic
        small.setattr(onnx_files, "EXTERNAL_DATA_ABOVE", 1000)
        res = export_onnx(dyn, tmp_path / "auto.onnx", factory=factory)
    _check_pair(tmp_path / "auto.onnx", model, res)

    # the same output as one file again: the earlier weights go, nothing points to them
    res = export_onnx(dyn, tmp_path / "auto.onnx", factory=factory, force=True)
    assert res.data_path is None and res.bytes == (tmp_path / "auto.onnx").stat().st_size > res.weight_bytes
    assert _files(tmp_path) == ["auto.onnx", "elsewhere"]
    # and back: a plain file replaced by a pair
    res = export_onnx(dyn, tmp_path / "auto.onnx", factory=factory, force=True, external_data=True)
    _check_pair(tmp_path / "auto.onnx", model, res)
    assert _files(tmp_path) == ["auto.onnx", "auto.onnx.data", "elsewhere"]


def test_the_exporters_files_per_tensor_stay_in_the_private_folder(tmp_path, small_dyn, monkeypatch):
    """Over 2 GB, torch's exporter writes one file per tensor beside its output: the export reads
    them into the graph and writes one data file; they never reach the output's folder."""
    import dynconvert

    dyn, _, factory = small_dyn
    real = torch.onnx.export

    def per_tensor(model, args, f, **kw):  # what the exporter does for a model over 2 GB
        real(model, args, f, **kw)
        onnx.save(onnx.load(f), f, save_as_external_data=True, all_tensors_to_one_file=False, size_threshold=0)

    monkeypatch.setattr(torch.onnx, "export", per_tensor)
    res = export_onnx(dyn, tmp_path / "m.onnx", factory=factory, external_data=True)
    _check_pair(tmp_path / "m.onnx", dynconvert.load(dyn, factory=factory).eval(), res)
    res = export_onnx(dyn, tmp_path / "m.onnx", factory=factory, force=True)  # the same, back in one file
    assert res.data_path is None and len(onnx.load(str(tmp_path / "m.onnx")).graph.initializer) >= 4
    assert _files(tmp_path) == ["m.onnx"]


def test_int8_activations_over_the_threshold(tmp_path, small_dyn, monkeypatch):
    """ONNX Runtime's static quantizer gets a float graph over the threshold: its own graphs keep
    their weights in files too, and the result is written as a pair."""
    dyn, _, factory = small_dyn
    monkeypatch.setattr(onnx_files, "EXTERNAL_DATA_ABOVE", 1000)
    res = export_onnx(dyn, tmp_path / "q.onnx", factory=factory, activations="int8", calib=[torch.randn(8, 3, 8, 8)])
    assert res.data_path is not None and res.bytes == sum((tmp_path / n).stat().st_size for n in ("q.onnx", "q.onnx.data"))
    assert "QuantizeLinear" in {n.op_type for n in onnx.load(str(tmp_path / "q.onnx")).graph.node}
    assert _files(tmp_path) == ["q.onnx", "q.onnx.data"]


def test_a_failed_check_leaves_no_file_and_an_earlier_pair_untouched(tmp_path, small_dyn, monkeypatch):
    dyn, _, factory = small_dyn
    out = tmp_path / "m.onnx"
    real_run = ort.InferenceSession.run
    with monkeypatch.context() as wrong:
        wrong.setattr(ort.InferenceSession, "run", lambda self, *a, **k: [o + 1.0 for o in real_run(self, *a, **k)])
        with pytest.raises(DynError, match="disagrees"):
            export_onnx(dyn, out, factory=factory, external_data=True)
    assert _files(tmp_path) == []  # neither file, nor the private folder with the exporter's files

    export_onnx(dyn, out, factory=factory, external_data=True)
    before = {n: (tmp_path / n).read_bytes() for n in _files(tmp_path)}
    with monkeypatch.context() as wrong:
        wrong.setattr(ort.InferenceSession, "run", lambda self, *a, **k: [o + 1.0 for o in real_run(self, *a, **k)])
        for external in (True, False):
            with pytest.raises(DynError, match="disagrees"):
                export_onnx(dyn, out, factory=factory, external_data=external, force=True)
    assert {n: (tmp_path / n).read_bytes() for n in _files(tmp_path)} == before


def test_cli_flag_and_data_path_refusals(cli, tmp_path, small_dyn, monkeypatch):
    dyn, _, factory = small_dyn
    out = tmp_path / "c.onnx"
    code, stdout, err = cli("export", dyn, "--onnx", out, "--model", factory, "--external-data")
    assert code == 0, err
    total = out.stat().st_size + (tmp_path / "c.onnx.data").stat().st_size
    assert f"{total:,} bytes" in stdout and "in c.onnx.data)" in stdout, stdout
    assert "weights are in c.onnx.data beside the graph (--external-data)" in err, err

    with monkeypatch.context() as small:  # above the threshold: automatic, and said
        small.setattr(onnx_files, "EXTERNAL_DATA_ABOVE", 1000)
        code, stdout, err = cli("export", dyn, "--onnx", tmp_path / "a.onnx", "--model", factory)
    assert code == 0 and "in a.onnx.data)" in stdout, err
    assert "weights are in a.onnx.data beside the graph (0.00 GiB of weights: one ONNX file holds at most 2 GiB)" in err
    # `--onnx` alone: DYN's name with .onnx, and its data file
    code, stdout, err = cli("export", dyn, "--onnx", "--model", factory, "--external-data")
    assert code == 0 and (tmp_path / "m.onnx.data").is_file() and "in m.onnx.data)" in stdout, err

    # the data file belongs to the output: refused without --force, even when the graph is gone
    out.unlink()
    line = one_line_error(*cli("export", dyn, "--onnx", out, "--model", factory))
    assert "c.onnx.data already exists" in line and "--force" in line
    code, stdout, err = cli("export", dyn, "--onnx", out, "--model", factory, "--force")  # one file: the stale data goes
    assert code == 0 and "c.onnx.data" not in stdout + err, err
    assert f"{out.stat().st_size:,} bytes" in stdout and not (tmp_path / "c.onnx.data").exists()

    (tmp_path / "d.onnx.data").mkdir()  # never replaced, --force or not
    for force in ([], ["--force"]):
        line = one_line_error(*cli("export", dyn, "--onnx", tmp_path / "d.onnx", "--model", factory, *force),
                              out=tmp_path / "d.onnx")
        assert "d.onnx.data exists and is not a regular file" in line
    assert "apply to --onnx" in one_line_error(*cli("export", dyn, "--pth", tmp_path / "p.pth", "--external-data"))
    def too_big(*args, **kwargs):  # a graph over 2 GiB though its weights are under the threshold
        raise ValueError("The proto size is larger than the 2 GB limit")

    with monkeypatch.context() as big:
        big.setattr(onnx, "save", too_big)
        line = one_line_error(*cli("export", dyn, "--onnx", tmp_path / "b.onnx", "--model", factory),
                              out=tmp_path / "b.onnx")
    assert "cannot save the ONNX graph (The proto size" in line and "pass --external-data" in line
    assert _files(tmp_path) == ["a.onnx", "a.onnx.data", "c.onnx", "d.onnx.data", "m.onnx", "m.onnx.data"]
