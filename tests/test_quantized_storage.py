"""Format version 2: quantized tensors stored as integers + scales, read back bit-identical;
version-1 files still read; malformed quantized metadata is one DynError line; exports keep the
integers (``--safetensors``) or carry them as int8 + DequantizeLinear (ONNX)."""

import json
import struct

import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dynconvert
from dynconvert.budget import quant
from dynconvert.dynfile.format import META_KEY, FORMAT_VERSION, read_dyn, tensors_checksum, write_dyn
from dynconvert.errors import DynError
from dynconvert.deploy.export import export_onnx, export_safetensors
from dynconvert.io.safetensors_io import write_safetensors
from helpers import one_line_error

META = {"source": {"kind": "module"}, "layers": {}}


def header(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


def test_round_trip_is_bit_identical_and_small(tmp_path):
    torch.manual_seed(0)
    w8 = quant.fake_quant(torch.randn(1000, 1000) * 0.02, 8, (0,))
    w4 = quant.fake_quant(torch.randn(2, 33, 3), 4, (0, 2))  # odd numel: the last byte is half padding
    s4 = quant.fake_quant(torch.randn(5, 7), 4, ())
    plain = torch.randn(10)
    write_dyn(tmp_path / "q.dyn", {"a.weight": w8, "b.states_out": w4, "c.weight": s4, "d.bias": plain}, META,
              quantized={"a.weight": {"bits": 8, "keep": [0]}, "b.states_out": {"bits": 4, "keep": [0, 2]},
                         "c.weight": {"bits": 4, "keep": []}})
    tensors, meta = read_dyn(tmp_path / "q.dyn")
    assert sorted(tensors) == ["a.weight", "b.states_out", "c.weight", "d.bias"]
    for name, want in (("a.weight", w8), ("b.states_out", w4), ("c.weight", s4), ("d.bias", plain)):
        got = tensors[name]
        assert got.dtype == torch.float32 and got.shape == want.shape
        assert torch.equal(got.view(torch.int32), want.view(torch.int32)), name  # bit for bit
    assert meta["format_version"] == FORMAT_VERSION >= 2
    assert meta["quantized"] == {"a.weight": {"bits": 8, "keep": [0], "shape": [1000, 1000]},
                                 "b.states_out": {"bits": 4, "keep": [0, 2], "shape": [2, 33, 3]},
                                 "c.weight": {"bits": 4, "keep": [], "shape": [5, 7]}}
    h = header(tmp_path / "q.dyn")
    assert h["a.weight:q"] == {**h["a.weight:q"], "dtype": "I8", "shape": [1000, 1000]}
    assert h["a.weight:scale"]["dtype"] == "F32" and h["a.weight:scale"]["shape"] == [1000, 1]
    assert h["b.states_out:q"]["dtype"] == "U8" and h["b.states_out:q"]["shape"] == [99]  # 198 values, 2 per byte
    assert h["b.states_out:scale"]["shape"] == [2, 1, 3]
    assert "a.weight" not in h and h["d.bias"]["dtype"] == "F32"
    size = (tmp_path / "q.dyn").stat().st_size
    assert 1_000_000 < size < 1_010_000, size  # int8: ~1 MB, not 4 MB


def test_write_refuses_what_it_cannot_store(tmp_path):
    w = torch.randn(8, 8)
    cases = [
        ({"x.weight": w}, {"x.weight": {"bits": 8, "keep": [0]}}, "not on its integer grid"),
        ({"x.weight": w}, {"y.weight": {"bits": 8, "keep": [0]}}, "not in the state dict"),
        ({"x.weight": w}, {"x.weight": {"bits": 3, "keep": [0]}}, "bits 3"),
        ({"x.weight": w}, {"x.weight": {"bits": 8, "keep": [2]}}, "invalid keep"),
        ({"x:q": w}, {}, "reserved"),
    ]
    for tensors, quantized, words in cases:
        with pytest.raises(DynError, match=words) as e:
            write_dyn(tmp_path / "bad.dyn", tensors, META, quantized=quantized)
        assert "\n" not in str(e.value)
    assert not (tmp_path / "bad.dyn").exists()


def test_stale_quantized_metadata_is_dropped(tmp_path):
    """A writer passing on an input file's metadata (finetune) must not claim integers it did not store."""
    w = torch.randn(4, 4)
    write_dyn(tmp_path / "f.dyn", {"w": w}, {**META, "quantized": {"w": {"bits": 8, "keep": [0], "shape": [4, 4]}}})
    tensors, meta = read_dyn(tmp_path / "f.dyn")
    assert "quantized" not in meta and torch.equal(tensors["w"], w)


def test_version_1_file_still_loads(tmp_path, cli):
    """A file laid out exactly as format version 1 wrote it (no integers, format_version 1)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))
    conv = dynconvert.convert(model, steps=1, min_params=100)
    state = {k: v.detach().contiguous() for k, v in conv.model.state_dict().items()}
    meta = dict(dynconvert.api.dyn_metadata(conv), format="dynconvert", format_version=1, dynconvert_version="0.1.0",
                tensors_sha256=tensors_checksum(state))
    write_safetensors(tmp_path / "v1.dyn", state, {META_KEY: json.dumps(meta)})
    code, stdout, stderr = cli("verify", tmp_path / "v1.dyn")
    assert code == 0 and stdout.startswith("OK"), stderr
    loaded = dynconvert.load(tmp_path / "v1.dyn", model=nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10)))
    x = torch.randn(3, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), conv.model(x))


def build_net():
    torch.manual_seed(1)
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10),
    )
    with torch.no_grad():
        net[1].running_mean.uniform_(-1, 1)
        net[1].running_var.uniform_(0.5, 2)
        net[1].weight.uniform_(0.5, 2)
    return net.eval()


def quantized_conversion(metric="sql2", bits=8):
    """Layer 7 converted (its states quantized), the two convs dense with quantized weights."""
    conv = dynconvert.convert(build_net(), steps=5, include=["7"], min_params=0, metric=metric, input_size=(3, 8, 8))
    assert [s.name for s in conv.layers] == ["7"]
    q = {}
    with torch.no_grad():
        for name, keep in (("0.weight", (0,)), ("3.weight", (0,)), ("9.weight", (0,)),
                           ("7.states_out", (0, 2)), ("7.states_in", (0, 2))):
            t = conv.model.get_parameter(name) if "weight" in name else getattr(conv.model[7], name.split(".")[1])
            t.copy_(quant.fake_quant(t, bits, keep))
            q[name] = {"bits": bits, "keep": list(keep)}
    conv.quantized = q
    return conv


@pytest.fixture(scope="module")
def qdyn(tmp_path_factory):
    d = tmp_path_factory.mktemp("q")
    conv = quantized_conversion()
    dynconvert.save(conv, d / "q.dyn")
    conv.quantized = {}
    dynconvert.save(conv, d / "f.dyn")
    return conv, d / "q.dyn", d / "f.dyn"


def test_save_and_load_a_quantized_conversion(qdyn):
    conv, qpath, fpath = qdyn
    assert qpath.stat().st_size < 0.5 * fpath.stat().st_size
    loaded = dynconvert.load(qpath, model=build_net())
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), conv.model(x))
    for name, t in conv.model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t), name
    assert dynconvert.api.verify(qpath)["format_version"] == FORMAT_VERSION


def test_int4_conversion_round_trip(tmp_path):
    conv = quantized_conversion(bits=4)
    dynconvert.save(conv, tmp_path / "q4.dyn")
    loaded = dynconvert.load(tmp_path / "q4.dyn", model=build_net())
    for name, t in conv.model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t), name


def test_export_safetensors_keeps_integers(qdyn, tmp_path):
    conv, qpath, _ = qdyn
    export_safetensors(qpath, tmp_path / "half.dyn", dtype="fp16")
    h = header(tmp_path / "half.dyn")
    assert h["7.states_out:q"]["dtype"] == "I8" and h["0.weight:q"]["dtype"] == "I8"
    assert h["7.coupling"]["dtype"] == "F16" and h["7.bias"]["dtype"] == "F32"
    loaded = dynconvert.load(tmp_path / "half.dyn", model=build_net())
    assert torch.equal(loaded[7].states_in, conv.model[7].states_in)
    # a materialized layer's states leave the file, and its dense weight is stored as floats
    export_safetensors(qpath, tmp_path / "mat.dyn", dtype="fp16", materialize_layers=["7"])
    h = header(tmp_path / "mat.dyn")
    assert "7.states_out:q" not in h and h["7.weight"]["dtype"] == "F32" and h["3.weight:q"]["dtype"] == "I8"
    meta = json.loads(h["__metadata__"][META_KEY])
    assert sorted(meta["quantized"]) == ["0.weight", "3.weight", "9.weight"]
    dynconvert.load(tmp_path / "mat.dyn", model=build_net())


def int8_initializers(path):
    return [i for i in onnx.load(str(path)).graph.initializer if i.data_type == onnx.TensorProto.INT8]


def test_onnx_carries_int8_weights(qdyn, tmp_path):
    _, qpath, fpath = qdyn
    res = export_onnx(qpath, tmp_path / "q.onnx", model=build_net(), input_size=(3, 8, 8))
    full = export_onnx(qpath, tmp_path / "f.onnx", model=build_net(), input_size=(3, 8, 8), quantize=False)
    plain = export_onnx(fpath, tmp_path / "p.onnx", model=build_net(), input_size=(3, 8, 8))
    print(f"ONNX bytes: int8 weights {res.bytes}, same file fp32 {full.bytes}, unquantized file {plain.bytes}")
    assert res.bytes == (tmp_path / "q.onnx").stat().st_size and full.bytes == plain.bytes
    # conv 0 is folded with its BatchNorm (a renamed initializer); conv 3 and linear 9 keep their names
    assert len(res.quantized) == 3 and {"3.weight", "9.weight"} <= set(res.quantized)
    assert not full.quantized and not plain.quantized
    ops = [n.op_type for n in onnx.load(str(tmp_path / "q.onnx")).graph.node]
    assert "DequantizeLinear" not in ops and ops.count("Cast") >= 3  # folded at load, see below
    assert sorted(tuple(i.dims) for i in int8_initializers(tmp_path / "q.onnx")) == [(10, 64), (16, 3, 3, 3), (32, 16, 3, 3)]
    assert res.bytes < full.bytes - 0.7 * 4 * (16 * 27 + 32 * 144 + 640)
    assert res.max_abs_diff <= res.tolerance
    assert [g.split(":")[0] for g in res.grew] == ["7"]  # only the converted layer, materialized from its states
    # a default session folds the integers to float weights once, at load: the graph it runs is the fp32 one
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(tmp_path / "q.onnx"), opts, providers=["CPUExecutionProvider"])
    folded = onnx.load(str(tmp_path / "opt.onnx")).graph
    assert not [i.name for i in folded.initializer if i.data_type != onnx.TensorProto.FLOAT and i.data_type != onnx.TensorProto.INT64]
    assert not {"Cast", "DequantizeLinear"} & {n.op_type for n in folded.node}
    # --keep-qdq: DequantizeLinear for runtimes with integer kernels
    qdq = export_onnx(qpath, tmp_path / "k.onnx", model=build_net(), input_size=(3, 8, 8), keep_qdq=True)
    ops = [n.op_type for n in onnx.load(str(tmp_path / "k.onnx")).graph.node]
    assert ops.count("DequantizeLinear") == 3 and len(qdq.quantized) == 3 and qdq.max_abs_diff <= qdq.tolerance


def test_no_quantized_tensor_leaves_as_float(qdyn, tmp_path, monkeypatch):
    """The export's own check: a quantized tensor the rewrite misses is named as float in the graph."""
    from dynconvert.deploy import export as ex

    _, qpath, _ = qdyn
    res = export_onnx(qpath, tmp_path / "q.onnx", model=build_net(), input_size=(3, 8, 8))
    assert not [g for g in res.grew if "float in the graph" in g and "integers" in g]
    real = ex.quantize_graph
    monkeypatch.setattr(ex, "quantize_graph", lambda graph, sources, keep_qdq: real(graph, sources[1:], keep_qdq))
    res = export_onnx(qpath, tmp_path / "m.onnx", model=build_net(), input_size=(3, 8, 8))
    assert len([g for g in res.grew if "stored as integers in the .dyn but float in the graph" in g]) == 1, res.grew


@pytest.mark.parametrize("metric", ["sql2", "l1"])
def test_weight_free_onnx_carries_int8_states(metric, tmp_path):
    conv = quantized_conversion(metric)
    dynconvert.save(conv, tmp_path / "q.dyn")
    res = export_onnx(tmp_path / "q.dyn", tmp_path / "q.onnx", model=build_net(), input_size=(3, 8, 8), weight_free=True)
    full = export_onnx(tmp_path / "q.dyn", tmp_path / "f.onnx", model=build_net(), input_size=(3, 8, 8),
                       weight_free=True, quantize=False)
    print(f"weight-free {metric} ONNX bytes: int8 {res.bytes}, fp32 {full.bytes}")
    tables = {"sql2": ("7.core.xa", "7.core.ya"), "l1": ("7.core.xs", "7.core.ys")}[metric]
    assert set(tables) <= set(res.quantized) and res.bytes < full.bytes
    assert res.max_abs_diff <= res.tolerance


# ------------------------------------------------------------------ malformed quantized files


def split(blob):
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def join(h, data):
    raw = json.dumps(h).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def meta_edit(fn):
    def edit(blob):
        h, data = split(blob)
        meta = json.loads(h["__metadata__"][META_KEY])
        fn(meta["quantized"], meta)
        h["__metadata__"][META_KEY] = json.dumps(meta)
        return join(h, data)
    return edit


def header_edit(fn):
    def edit(blob):
        h, data = split(blob)
        fn(h)
        return join(h, data)
    return edit


def forged(fn):
    """Tensors changed by ``fn(tensors)`` with the checksum recomputed (a deliberate forgery)."""
    def edit(blob):
        from safetensors.torch import load, save

        h, _ = split(blob)
        tensors = {k: v.clone() for k, v in load(blob).items()}
        fn(tensors)
        meta = json.loads(h["__metadata__"][META_KEY])
        meta["tensors_sha256"] = tensors_checksum(tensors)
        return save(tensors, {META_KEY: json.dumps(meta)})
    return edit


def _set(name, key, value):
    return meta_edit(lambda q, m: q[name].update({key: value}))


def _rename(old, new):
    return header_edit(lambda h: h.update({new: h.pop(old)}))


BROKEN = [
    ("bits-3", _set("3.weight", "bits", 3), "3.weight"),
    ("bits-string", _set("3.weight", "bits", "8"), "3.weight"),
    ("bits-bool", _set("3.weight", "bits", True), "3.weight"),
    ("bits-4-for-int8-data", _set("3.weight", "bits", 4), "3.weight"),
    ("keep-out-of-range", _set("3.weight", "keep", [4]), "3.weight"),
    ("keep-negative", _set("3.weight", "keep", [-1]), "3.weight"),
    ("keep-repeated", _set("7.states_out", "keep", [0, 0]), "7.states_out"),
    ("keep-unsorted", _set("7.states_out", "keep", [2, 0]), "7.states_out"),
    ("keep-string", _set("3.weight", "keep", "0"), "3.weight"),
    ("keep-missing", meta_edit(lambda q, m: q["3.weight"].pop("keep")), "3.weight"),
    ("keep-other-dim", _set("3.weight", "keep", [1]), "3.weight"),
    ("shape-wrong", _set("3.weight", "shape", [32, 16, 9]), "3.weight"),
    ("shape-negative", _set("3.weight", "shape", [-32, 16, 3, 3]), "3.weight"),
    ("shape-float", _set("3.weight", "shape", [32.0, 16, 3, 3]), "3.weight"),
    ("shape-huge", _set("3.weight", "shape", [2**39] * 4), "3.weight"),
    ("shape-many-dims", _set("3.weight", "shape", [1] * 100), "3.weight"),
    ("shape-missing", meta_edit(lambda q, m: q["3.weight"].pop("shape")), "3.weight"),
    ("entry-not-object", meta_edit(lambda q, m: q.update({"3.weight": 8})), "3.weight"),
    ("quantized-not-object", meta_edit(lambda q, m: m.update(quantized=["3.weight"])), "quantized"),
    ("undeclared", meta_edit(lambda q, m: q.pop("3.weight")), "3.weight:q"),
    ("declared-not-stored", meta_edit(lambda q, m: q.update({"ghost.weight": q["3.weight"]})), "ghost.weight"),
    ("also-plain", meta_edit(lambda q, m: q.update({"3.bias": dict(q["3.weight"], shape=[32])})), "3.bias"),
    ("ints-missing", forged(lambda t: t.pop("3.weight:q")), "3.weight"),
    ("scale-missing", forged(lambda t: t.pop("3.weight:scale")), "3.weight"),
    ("ints-as-uint8", header_edit(lambda h: h["3.weight:q"].update(dtype="U8")), "3.weight"),
    ("ints-as-bool", header_edit(lambda h: h["3.weight:q"].update(dtype="BOOL")), "3.weight"),
    ("scale-as-int32", header_edit(lambda h: h["3.weight:scale"].update(dtype="I32")), "3.weight"),
    ("q-and-scale-swapped", header_edit(lambda h: h.update({"3.weight:q": h["3.weight:scale"], "3.weight:scale": h["3.weight:q"]})), "3.weight"),
    ("scale-negative", forged(lambda t: t["3.weight:scale"].neg_()), "3.weight"),
    ("scale-zero", forged(lambda t: t["3.weight:scale"].zero_()), "3.weight"),
    ("scale-nan", forged(lambda t: t["3.weight:scale"].view(-1)[0].fill_(float("nan"))), "3.weight"),
    ("scale-inf", forged(lambda t: t["3.weight:scale"].view(-1)[0].fill_(float("inf"))), "3.weight"),
    ("scale-huge-overflows", forged(lambda t: t["3.weight:scale"].fill_(3e38)), "3.weight"),
    ("scale-per-tensor", forged(lambda t: t.update({"3.weight:scale": t["3.weight:scale"][:1]})), "3.weight"),
    ("scale-flat", forged(lambda t: t.update({"3.weight:scale": t["3.weight:scale"].reshape(-1)})), "3.weight"),
    ("int8-minus-128", forged(lambda t: t["3.weight:q"].view(-1)[0].fill_(-128)), "3.weight"),
    ("ints-reshaped", forged(lambda t: t.update({"3.weight:q": t["3.weight:q"].reshape(32, -1)})), "3.weight"),
    ("stray-colon-tensor", forged(lambda t: t.update({"x:q": torch.zeros(2, dtype=torch.int8)})), "x:q"),
    ("states-int-flip", forged(lambda t: t["7.states_out:q"].view(-1)[0].fill_(127)), None),  # valid, passes
    ("checksum-covers-ints", lambda b: b[:-1] + bytes([b[-1] ^ 1]), "checksum"),
]


@pytest.fixture(scope="module")
def int4_blob(tmp_path_factory):
    d = tmp_path_factory.mktemp("q4")
    conv = quantized_conversion(bits=4)
    dynconvert.save(conv, d / "q4.dyn")
    return (d / "q4.dyn").read_bytes()


BROKEN_INT4 = [
    ("int4-packed-too-short", forged(lambda t: t.update({"3.weight:q": t["3.weight:q"][:-1]})), "3.weight"),
    ("int4-as-int8", header_edit(lambda h: h["3.weight:q"].update(dtype="I8")), "3.weight"),
    ("int4-nibble-minus-8", forged(lambda t: t["3.weight:q"].view(-1)[0].fill_(0x00)), "3.weight"),
    ("int4-declared-8", _set("0.weight", "bits", 8), "0.weight"),
]


def _check_broken(blob, mutate, words, tmp_path, cli):
    path = tmp_path / "broken.dyn"
    path.write_bytes(mutate(blob))
    if words is None:
        read_dyn(path)
        return
    with pytest.raises(DynError) as e:
        dynconvert.api.verify(path)
    msg = str(e.value)
    assert "\n" not in msg and words in msg, msg
    one_line_error(*cli("verify", path))


@pytest.mark.parametrize("case_id,mutate,words", BROKEN, ids=[c[0] for c in BROKEN])
def test_malformed_quantized(case_id, mutate, words, qdyn, tmp_path, cli):
    _check_broken(qdyn[1].read_bytes(), mutate, words, tmp_path, cli)


@pytest.mark.parametrize("case_id,mutate,words", BROKEN_INT4, ids=[c[0] for c in BROKEN_INT4])
def test_malformed_int4(case_id, mutate, words, int4_blob, tmp_path, cli):
    _check_broken(int4_blob, mutate, words, tmp_path, cli)


json_value = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=6)
    | st.sampled_from([0, 1, 2, 3, 4, 8, -1, 2**40, [0], [0, 2], [2], [1, 1], "I8", "U8", "F32"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_fuzz_quantized_entries(qdyn, tmp_path_factory, data):
    """Random edits of the quantized metadata and of the integer/scale tensor entries: reading
    either succeeds or raises a one-line DynError."""
    h, payload = split(qdyn[1].read_bytes())
    meta = json.loads(h["__metadata__"][META_KEY])
    for _ in range(data.draw(st.integers(1, 3))):
        if data.draw(st.booleans()):
            name = data.draw(st.sampled_from(sorted(meta["quantized"]) or ["x"]))
            entry = meta["quantized"].setdefault(name, {})
            key = data.draw(st.sampled_from(["bits", "keep", "shape", "other"]))
            if data.draw(st.booleans()) and isinstance(entry, dict):
                entry[key] = data.draw(json_value)
            else:
                meta["quantized"][name] = data.draw(json_value) if data.draw(st.booleans()) else {}
        else:
            name = data.draw(st.sampled_from(sorted(k for k in h if ":" in k)))
            key = data.draw(st.sampled_from(["dtype", "shape"]))
            h[name][key] = data.draw(st.sampled_from(["I8", "U8", "F32", "F16", "I32", [], [1], [32, 16, 3, 3], [2, 3]]))
    h["__metadata__"][META_KEY] = json.dumps(meta, allow_nan=True)
    path = tmp_path_factory.getbasetemp() / "fuzz.dyn"
    path.write_bytes(join(h, payload))
    try:
        dynconvert.api.verify(path)
    except DynError as e:
        assert str(e) and "\n" not in str(e)
