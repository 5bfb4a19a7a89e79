"""A generated corpus of broken inputs, each run through the CLI.

Every case must end in exactly one line starting with ``error:``, a non-zero exit, no traceback and
no output file. The valid originals are built once per module; each case derives its broken file.
"""

import io
import sys
import json
import struct
import zipfile

import pytest
import torch
import torch.nn as nn
import torchvision

import dynconvert
from dynconvert.io.checkpoint import Source
from dynconvert.dynfile.format import META_KEY
from dynconvert.io.safetensors_io import write_safetensors
from helpers import ROOT, one_line_error, run


# ------------------------------------------------------------------ valid originals


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    d = tmp_path_factory.mktemp("orig")
    torch.manual_seed(0)
    small = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))
    conv = dynconvert.convert(small, steps=1, min_params=100)
    dynconvert.save(conv, d / "small.dyn")
    # a torchvision-sourced file (only the classifier converted), for source and layer-config tampering
    sq = torchvision.models.squeezenet1_1(num_classes=10)
    torch.save(sq.state_dict(), d / "sq.pth")
    tv = dynconvert.convert(sq, include=["classifier.1"], min_params=100, steps=1,
                            source=Source("torchvision", arch="squeezenet1_1", num_classes=10))
    assert [s.name for s in tv.layers] == ["classifier.1"]
    dynconvert.save(tv, d / "tv.dyn")
    write_safetensors(d / "sq.safetensors", torch.load(d / "sq.pth"), {})
    return {p.name: p.read_bytes() for p in d.iterdir()}


def split(blob: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def join(header, data: bytes, raw_header: bytes | None = None) -> bytes:
    raw = raw_header if raw_header is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def with_meta(blob: bytes, edit) -> bytes:
    """The same tensors with the dynconvert metadata changed by ``edit(meta)`` (checksum kept)."""
    header, data = split(blob)
    meta = json.loads(header["__metadata__"][META_KEY])
    edit(meta)
    header["__metadata__"][META_KEY] = json.dumps(meta)
    return join(header, data)


def with_header(blob: bytes, edit) -> bytes:
    header, data = split(blob)
    edit(header)
    return join(header, data)


def first_state(header: dict, suffix: str = "states_out") -> str:
    return next(k for k in header if k.endswith("." + suffix))


def set_(path, value):
    def edit(d):
        keys = path.split("/")
        for k in keys[:-1]:
            d = d[k] if not isinstance(d, list) else d[int(k)]
        d[keys[-1]] = value
    return edit


def delete(path):
    def edit(d):
        keys = path.split("/")
        for k in keys[:-1]:
            d = d[k]
        del d[keys[-1]]
    return edit


def first_layer(meta) -> dict:
    return meta["layers"][next(iter(meta["layers"]))]


def set_layer(key, value):
    def edit(meta):
        first_layer(meta)[key] = value
    return edit


def zip_without(blob: bytes, suffix: str) -> bytes:
    src = zipfile.ZipFile(io.BytesIO(blob))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as w:
        for name in src.namelist():
            if not name.endswith(suffix):
                w.writestr(name, src.read(name))
    return buf.getvalue()


def zip_bomb(_blob: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as w:
        w.writestr("m/data.pkl", b"\x80\x02}q\x00.")
        w.writestr("m/data/0", bytes(200 << 20))  # 200 MB of zeros deflates to ~200 KB
    return buf.getvalue()


def flip(at):
    def edit(blob: bytes) -> bytes:
        b = bytearray(blob)
        i = at(len(b)) if callable(at) else at
        b[i] ^= 0xFF
        return bytes(b)
    return edit


def flip_data(frac):
    """Flip one byte inside the tensor data region (past the header)."""
    def edit(blob: bytes) -> bytes:
        (n,) = struct.unpack("<Q", blob[:8])
        start = 8 + n
        return flip(start + int(frac * (len(blob) - start - 1)))(blob)
    return edit


def truncate_at(frac):
    return lambda blob: blob[: int(frac * len(blob))]


def nan_state(blob: bytes) -> bytes:
    """A NaN written into a state tensor, with the checksum recomputed (a deliberate forgery)."""
    from dynconvert.dynfile.format import tensors_checksum

    from safetensors.torch import load

    header, data = split(blob)
    tensors = load(blob)
    key = first_state(header)
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] = float("nan")
    meta = json.loads(header["__metadata__"][META_KEY])
    meta["tensors_sha256"] = tensors_checksum(tensors)
    from safetensors.torch import save

    return save(tensors, {META_KEY: json.dumps(meta)})


FRACS = [0.0, 0.001, 0.002, 0.004, 0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999]

# (case id, original, mutation, command): command "verify" checks a .dyn, "convert" reads a checkpoint
CASES = []
for f in FRACS:
    CASES.append((f"dyn-truncated-{f}", "small.dyn", truncate_at(f), "verify"))
for cut in (1, 7, 8, 9, 100):
    CASES.append((f"dyn-truncated-to-{cut}B", "small.dyn", lambda b, c=cut: b[:c], "verify"))
CASES.append(("dyn-one-byte-short", "small.dyn", lambda b: b[:-1], "verify"))
CASES.append(("dyn-trailing-garbage", "small.dyn", lambda b: b + b"garbage", "verify"))
for f in (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0):
    CASES.append((f"dyn-flip-data-{f}", "small.dyn", flip_data(f), "verify"))
for i in range(8):
    CASES.append((f"dyn-flip-length-byte-{i}", "small.dyn", flip(i), "verify"))
CASES.append(("dyn-flip-header-open-brace", "small.dyn", flip(8), "verify"))
CASES += [
    ("dyn-header-length-2^63", "small.dyn", lambda b: struct.pack("<Q", 2**63) + b[8:], "verify"),
    ("dyn-header-length-2^40", "small.dyn", lambda b: struct.pack("<Q", 2**40) + b[8:], "verify"),
    ("dyn-header-length-filesize", "small.dyn", lambda b: struct.pack("<Q", len(b)) + b[8:], "verify"),
    ("dyn-header-length-zero", "small.dyn", lambda b: struct.pack("<Q", 0) + b[8:], "verify"),
    ("dyn-header-not-json", "small.dyn", lambda b: join(None, split(b)[1], b"{not json" + b" " * 10), "verify"),
    ("dyn-header-not-utf8", "small.dyn", lambda b: join(None, split(b)[1], b"\xff\xfe{}"), "verify"),
    ("dyn-header-json-array", "small.dyn", lambda b: join(None, split(b)[1], b"[1, 2, 3]"), "verify"),
    ("dyn-header-deep-nesting", "small.dyn", lambda b: join(None, split(b)[1], b"[" * 100000 + b"]" * 100000), "verify"),
    ("dyn-header-huge-int", "small.dyn", lambda b: join(None, split(b)[1], b'{"a": ' + b"9" * 100000 + b"}"), "verify"),
    ("dyn-shape-absurd", "small.dyn", lambda b: with_header(b, lambda h: h[first_state(h)].update(shape=[2**39, 2**39, 2**39])), "verify"),
    ("dyn-shape-negative", "small.dyn", lambda b: with_header(b, lambda h: h[first_state(h)].update(shape=[-1, 4, 4])), "verify"),
    ("dyn-shape-float", "small.dyn", lambda b: with_header(b, lambda h: h[first_state(h)].update(shape=[1.5, 2])), "verify"),
    ("dyn-shape-bool", "small.dyn", lambda b: with_header(b, lambda h: h[first_state(h)].update(shape=[True])), "verify"),
    ("dyn-shape-string", "small.dyn", lambda b: with_header(b, lambda h: h[first_state(h)].update(shape="big")), "verify"),
    ("dyn-shape-mismatch-bytes", "small.dyn", lambda b: with_header(b, lambda h: h[first_state(h)].update(shape=[1])), "verify"),
    ("dyn-dtype-unknown", "small.dyn", lambda b: with_header(b, lambda h: h[first_state(h)].update(dtype="F128")), "verify"),
    ("dyn-dtype-wrong-size", "small.dyn", lambda b: with_header(b, lambda h: h[first_state(h)].update(dtype="F64")), "verify"),
    ("dyn-dtype-not-string", "small.dyn", lambda b: with_header(b, lambda h: h[first_state(h)].update(dtype=["F32"])), "verify"),
    ("dyn-dtype-int-state", "small.dyn", lambda b: with_header(b, lambda h: h[first_state(h)].update(dtype="I32")), "verify"),
    ("dyn-offsets-outside", "small.dyn", lambda b: with_header(b, lambda h: h[first_state(h)].update(data_offsets=[0, 2**50])), "verify"),
    ("dyn-offsets-reversed", "small.dyn", lambda b: with_header(b, lambda h: h[first_state(h)].update(data_offsets=h[first_state(h)]["data_offsets"][::-1])), "verify"),
    ("dyn-offsets-three", "small.dyn", lambda b: with_header(b, lambda h: h[first_state(h)].update(data_offsets=[0, 1, 2])), "verify"),
    ("dyn-offsets-overlap", "small.dyn", lambda b: with_header(b, lambda h: [h[k].update(data_offsets=[0, h[k]["data_offsets"][1] - h[k]["data_offsets"][0]]) for k in list(h)[-2:] if k != "__metadata__"]), "verify"),
    ("dyn-entry-missing-key", "small.dyn", lambda b: with_header(b, lambda h: h[first_state(h)].pop("dtype")), "verify"),
    ("dyn-entry-extra-key", "small.dyn", lambda b: with_header(b, lambda h: h[first_state(h)].update(x=1)), "verify"),
    ("dyn-entry-not-object", "small.dyn", lambda b: with_header(b, lambda h: h.update({first_state(h): 3})), "verify"),
    ("dyn-metadata-not-map", "small.dyn", lambda b: with_header(b, lambda h: h.update(__metadata__=[1])), "verify"),
    ("dyn-metadata-non-string", "small.dyn", lambda b: with_header(b, lambda h: h["__metadata__"].update({META_KEY: 5})), "verify"),
    ("dyn-no-metadata", "small.dyn", lambda b: with_header(b, lambda h: h.pop("__metadata__")), "verify"),
    ("dyn-meta-not-json", "small.dyn", lambda b: with_header(b, lambda h: h["__metadata__"].update({META_KEY: "{oops"})), "verify"),
    ("dyn-meta-deep-nesting", "small.dyn", lambda b: with_header(b, lambda h: h["__metadata__"].update({META_KEY: "[" * 50000 + "]" * 50000})), "verify"),
    ("dyn-meta-huge-int", "small.dyn", lambda b: with_header(b, lambda h: h["__metadata__"].update({META_KEY: '{"format": ' + "7" * 50000 + "}"})), "verify"),
    ("dyn-meta-array", "small.dyn", lambda b: with_header(b, lambda h: h["__metadata__"].update({META_KEY: "[]"})), "verify"),
    ("dyn-meta-wrong-format", "small.dyn", lambda b: with_meta(b, set_("format", "other")), "verify"),
    ("dyn-meta-version-newer", "small.dyn", lambda b: with_meta(b, set_("format_version", 99)), "verify"),
    ("dyn-meta-version-zero", "small.dyn", lambda b: with_meta(b, set_("format_version", 0)), "verify"),
    ("dyn-meta-version-string", "small.dyn", lambda b: with_meta(b, set_("format_version", "1")), "verify"),
    ("dyn-meta-version-bool", "small.dyn", lambda b: with_meta(b, set_("format_version", True)), "verify"),
    ("dyn-meta-layers-list", "small.dyn", lambda b: with_meta(b, set_("layers", [])), "verify"),
    ("dyn-meta-source-string", "small.dyn", lambda b: with_meta(b, set_("source", "torchvision")), "verify"),
    ("dyn-meta-checksum-wrong", "small.dyn", lambda b: with_meta(b, set_("tensors_sha256", "0" * 64)), "verify"),
    ("dyn-meta-checksum-number", "small.dyn", lambda b: with_meta(b, set_("tensors_sha256", 5)), "verify"),
    ("dyn-layer-not-object", "small.dyn", lambda b: with_meta(b, lambda m: m["layers"].update({next(iter(m["layers"])): "x"})), "verify"),
    ("dyn-layer-no-spec", "small.dyn", lambda b: with_meta(b, lambda m: first_layer(m).pop("spec")), "verify"),
    ("dyn-layer-spec-groups-0", "small.dyn", lambda b: with_meta(b, lambda m: first_layer(m)["spec"].update(groups=0)), "verify"),
    ("dyn-layer-spec-groups-huge", "small.dyn", lambda b: with_meta(b, lambda m: first_layer(m)["spec"].update(groups=10**12)), "verify"),
    ("dyn-layer-spec-metric", "small.dyn", lambda b: with_meta(b, lambda m: first_layer(m)["spec"].update(metric="l7")), "verify"),
    ("dyn-layer-spec-kernel", "small.dyn", lambda b: with_meta(b, lambda m: first_layer(m)["spec"].update(kernel=None)), "verify"),
    ("dyn-layer-matrix-shape-wrong", "small.dyn", lambda b: with_meta(b, set_layer("matrix_shape", [3, 3])), "verify"),
    ("dyn-layer-matrix-shape-short", "small.dyn", lambda b: with_meta(b, set_layer("matrix_shape", [3])), "verify"),
    ("dyn-layer-matrix-shape-text", "small.dyn", lambda b: with_meta(b, set_layer("matrix_shape", ["a", "b"])), "verify"),
    ("dyn-layer-matrix-shape-infinity", "small.dyn", lambda b: with_meta(b, set_layer("matrix_shape", [float("inf"), 3])), "verify"),
    ("dyn-layer-spec-groups-nan", "small.dyn", lambda b: with_meta(b, lambda m: first_layer(m)["spec"].update(groups=float("nan"))), "verify"),
    ("dyn-layer-unknown-name", "small.dyn", lambda b: with_meta(b, lambda m: m["layers"].update(ghost=first_layer(m))), "verify"),
    ("dyn-state-tensor-missing", "small.dyn", lambda b: with_header(b, lambda h: h.pop(first_state(h, "coupling"))), "verify"),
    ("dyn-nan-state-forged-checksum", "small.dyn", nan_state, "verify"),
    ("dyn-tv-num-classes-huge", "tv.dyn", lambda b: with_meta(b, set_("source/num_classes", 10**9)), "verify"),
    ("dyn-tv-num-classes-string", "tv.dyn", lambda b: with_meta(b, set_("source/num_classes", "10")), "verify"),
    ("dyn-tv-num-classes-negative", "tv.dyn", lambda b: with_meta(b, set_("source/num_classes", -3)), "verify"),
    ("dyn-tv-arch-unknown", "tv.dyn", lambda b: with_meta(b, set_("source/arch", "os.system")), "verify"),
    ("dyn-tv-arch-other", "tv.dyn", lambda b: with_meta(b, set_("source/arch", "resnet18")), "verify"),
    ("dyn-tv-arch-number", "tv.dyn", lambda b: with_meta(b, set_("source/arch", 5)), "verify"),
    ("dyn-tv-source-no-kind", "tv.dyn", lambda b: with_meta(b, delete("source/kind")), "verify"),
    ("dyn-tv-tensor-missing", "tv.dyn", lambda b: with_header(b, lambda h: h.pop(next(k for k in h if k.endswith("bias")))), "verify"),
    # states match the declared spec, but the layer config would build a 10^9-channel conv (GBs)
    ("dyn-tv-huge-layer-config", "tv.dyn", lambda b: with_meta(
        b, lambda m: m["layers"]["classifier.1"]["config"].update(in_channels=10**9, out_channels=10**9)), "verify"),
    ("dyn-tv-layer-config-kernel-text", "tv.dyn", lambda b: with_meta(
        b, lambda m: m["layers"]["classifier.1"]["config"].update(kernel_size="big")), "verify"),
    ("dyn-tv-layer-kind-unknown", "tv.dyn", lambda b: with_meta(b, lambda m: m["layers"]["classifier.1"].update(kind="lstm")), "verify"),
    ("dyn-tv-layer-kind-swapped", "tv.dyn", lambda b: with_meta(b, lambda m: m["layers"]["classifier.1"].update(kind="linear")), "verify"),
    ("dyn-tv-layer-not-a-layer", "tv.dyn", lambda b: with_meta(b, lambda m: m["layers"].update({"classifier.2": {
        "kind": "linear", "spec": {"groups": 1, "dim": 1, "metric": "l1", "kernel": "linear"}, "matrix_shape": [1, 1],
        "config": {"in_features": 1, "out_features": 1, "bias": False}}})), "verify"),
]
for f in (0.0, 0.01, 0.1, 0.3, 0.5, 0.7, 0.9, 0.99, 0.9999):
    CASES.append((f"pth-truncated-{f}", "sq.pth", truncate_at(f), "convert"))
for f in (0.2, 0.5, 0.8):
    CASES.append((f"pth-flip-data-{f}", "sq.pth", lambda b, f=f: flip(int(len(b) * f))(b), "convert"))
CASES += [
    ("pth-flip-last-byte", "sq.pth", flip(lambda n: n - 1), "convert"),
    ("pth-missing-data.pkl", "sq.pth", lambda b: zip_without(b, "/data.pkl"), "convert"),
    ("pth-missing-version", "sq.pth", lambda b: zip_without(b, "/version"), "convert"),
    ("pth-missing-storage-0", "sq.pth", lambda b: zip_without(b, "/data/0"), "convert"),
    ("pth-missing-storage-7", "sq.pth", lambda b: zip_without(b, "/data/7"), "convert"),
    ("pth-zip-bomb", "sq.pth", zip_bomb, "convert"),
    ("pth-random-bytes", "sq.pth", lambda b: bytes(range(256)) * 40, "convert"),
    ("pth-text", "sq.pth", lambda b: b"this is not a checkpoint\n" * 10, "convert"),
    ("pth-safetensors-bytes", "small.dyn", lambda b: b, "convert"),
    ("pth-not-a-state-dict", "sq.pth", lambda b: _saved([1, 2, 3]), "convert"),
    ("pth-entry-not-tensor", "sq.pth", lambda b: _saved({"w": torch.zeros(2), "step": 3}), "convert"),
    ("pth-empty-dict", "sq.pth", lambda b: _saved({}), "convert"),
    ("pth-legacy-truncated", "sq.pth", lambda b: _saved({"w": torch.zeros(64)}, legacy=True)[:-20], "convert"),
]
for f in (0.0, 0.01, 0.1, 0.5, 0.9, 0.999):
    CASES.append((f"safetensors-truncated-{f}", "sq.safetensors", truncate_at(f), "convert"))
CASES += [
    ("safetensors-flip-length", "sq.safetensors", flip(3), "convert"),
    ("safetensors-shape-absurd", "sq.safetensors", lambda b: with_header(b, lambda h: h[next(k for k in h if k != "__metadata__")].update(shape=[2**39] * 3)), "convert"),
    ("safetensors-empty-table", "sq.safetensors", lambda b: join({}, b""), "convert"),
]


def storage_size_lies(legacy: bool):
    """A checkpoint whose one storage declares 16 GiB while the file holds 16 bytes."""
    def make(_blob: bytes) -> bytes:
        blob = _saved({"w": torch.zeros(4)}, legacy=legacy)
        if legacy:  # the storage's element count is the 8 bytes before its 16 data bytes, at the end
            assert struct.unpack("<q", blob[-24:-16])[0] == 4
            return blob[:-24] + struct.pack("<q", 2**32) + blob[-16:]
        src = zipfile.ZipFile(io.BytesIO(blob))
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as w:
            for name in src.namelist():
                data = src.read(name)
                if name.endswith("data.pkl"):  # the storage's element count: BININT1 4 -> BININT 2**31-1
                    data = data.replace(b"X\x03\x00\x00\x00cpuq\x06K\x04", b"X\x03\x00\x00\x00cpuq\x06J" + struct.pack("<i", 2**31 - 1), 1)
                    assert b"J" + struct.pack("<i", 2**31 - 1) in data
                w.writestr(name, data)
        return buf.getvalue()
    return make


CASES += [
    ("pth-storage-size-lies", "sq.pth", storage_size_lies(False), "convert"),
    ("pth-legacy-storage-size-lies", "sq.pth", storage_size_lies(True), "convert"),
]


def _saved(obj, legacy=False) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, _use_new_zipfile_serialization=not legacy)
    return buf.getvalue()


def test_corpus_is_large_enough():
    assert len(CASES) + len(SPECIAL) >= 100
    assert len({c[0] for c in CASES}) == len(CASES)


def check_error(code, stdout, stderr, out=None):
    one_line_error(code, stdout, stderr, out=out)


@pytest.mark.parametrize("case_id,original,mutate,command", CASES, ids=[c[0] for c in CASES])
def test_broken_input(case_id, original, mutate, command, originals, tmp_path, cli):
    suffix = ".dyn" if command == "verify" else "." + original.rsplit(".", 1)[1]
    broken = tmp_path / f"broken{suffix}"
    broken.write_bytes(mutate(originals[original]))
    out = tmp_path / "out.dyn"
    if command == "verify":
        code, stdout, stderr = cli("verify", broken)
        check_error(code, stdout, stderr)
        assert "OK" not in stdout
    else:
        code, stdout, stderr = cli("convert", broken, "--out", out, "--arch", "squeezenet1_1", "--steps", "1")
        check_error(code, stdout, stderr, out)


# cases that are not a derived file
SPECIAL = ["empty-dyn", "empty-pth", "directory-dyn", "directory-pth", "missing-dyn", "missing-pth"]


@pytest.mark.parametrize("case_id", SPECIAL)
def test_not_a_file(case_id, tmp_path, cli):
    kind, what = case_id.split("-")[0], case_id.split("-")[1]
    target = tmp_path / f"input.{what}"
    if kind == "empty":
        target.write_bytes(b"")
    elif kind == "directory":
        target.mkdir()
    out = tmp_path / "out.dyn"
    if what == "dyn":
        code, stdout, stderr = cli("verify", target)
    else:
        code, stdout, stderr = cli("convert", target, "--out", out, "--arch", "squeezenet1_1")
    check_error(code, stdout, stderr, out)


HOSTILE_SIZES = ["pth-storage-size-lies", "pth-legacy-storage-size-lies", "pth-zip-bomb", "dyn-shape-absurd",
                 "dyn-header-length-2^63", "dyn-tv-num-classes-huge", "dyn-tv-huge-layer-config"]


@pytest.mark.slow
def test_bounded_memory(originals, tmp_path):
    """Files that declare huge sizes are refused without allocating them: peak memory stays near
    the interpreter's own (PyTorch alone is ~0.5 GB) although they declare tens of gigabytes."""
    paths = []
    for case_id, original, mutate, command in CASES:
        if case_id in HOSTILE_SIZES:
            p = tmp_path / (case_id + (".dyn" if command == "verify" else ".pth"))
            p.write_bytes(mutate(originals[original]))
            paths.append(str(p))
    assert len(paths) == len(HOSTILE_SIZES)
    # peak = VmHWM, this process's own high-water mark (ru_maxrss would count the forked pytest's pages)
    code = (
        "import sys\n"
        "from dynconvert.api import verify\n"
        "from dynconvert.io.checkpoint import read_checkpoint\n"
        "from dynconvert.errors import DynError\n"
        "for p in sys.argv[1:]:\n"
        "    try:\n"
        "        (verify if p.endswith('.dyn') else read_checkpoint)(p)\n"
        "        print('ACCEPTED', p)\n"
        "    except DynError:\n"
        "        pass\n"
        "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0]\n"
        "print(int(hwm.split()[1]) // 1024)\n"
    )
    done = run([sys.executable, "-c", code, *paths], cwd=ROOT)
    assert done.returncode == 0 and "ACCEPTED" not in done.stdout, done.stdout + done.stderr
    print(f"peak memory reading {len(paths)} files that declare huge sizes: {done.stdout.split()[-1]} MB")
    assert int(done.stdout.split()[-1]) < 1500, f"peak memory {done.stdout.split()[-1]} MB"


def test_originals_are_valid(originals, tmp_path, cli):
    """The corpus is only meaningful if the unbroken files pass."""
    for name in ("small.dyn", "tv.dyn"):
        (tmp_path / name).write_bytes(originals[name])
        code, stdout, stderr = cli("verify", tmp_path / name)
        assert code == 0 and stdout.startswith("OK"), stderr
    from dynconvert.io.checkpoint import read_checkpoint

    for name in ("sq.pth", "sq.safetensors"):
        (tmp_path / name).write_bytes(originals[name])
        assert len(read_checkpoint(tmp_path / name)) == len(torchvision.models.squeezenet1_1().state_dict())
