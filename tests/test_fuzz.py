"""Property-based fuzzing of the .dyn reader: whatever the bytes, reading either succeeds or raises
DynError (one line), quickly. Two generators: raw byte mutations of a valid file, and structure-aware
edits of its header and metadata JSON (which get past the JSON parser into the deeper checks)."""

import functools
import json
import os
import struct
import tempfile
import time
from pathlib import Path

import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dynconvert
from dynconvert.api import verify
from dynconvert.dynfile.format import META_KEY
from dynconvert.errors import DynError

# DYN_FUZZ_EXAMPLES=20000 for a long run; the suite's default is quick and reproducible (derandomized)
BYTE_EXAMPLES = STRUCT_EXAMPLES = int(os.environ.get("DYN_FUZZ_EXAMPLES", "400"))
DERANDOMIZE = "DYN_FUZZ_EXAMPLES" not in os.environ
WORK = Path(tempfile.mkdtemp(prefix="dynfuzz-"))


@functools.lru_cache(maxsize=1)
def valid_dyn() -> bytes:
    conv = dynconvert.convert(nn.Sequential(nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 8)), steps=1, min_params=50)
    dynconvert.save(conv, WORK / "valid.dyn")
    return (WORK / "valid.dyn").read_bytes()


def check(blob: bytes) -> None:
    path = WORK / "case.dyn"
    path.write_bytes(blob)
    start = time.monotonic()
    try:
        verify(path)
    except DynError as e:
        assert "\n" not in str(e) and str(e)
    assert time.monotonic() - start < 5, "reading a small file took too long"


mutation = st.one_of(
    st.tuples(st.just("set"), st.floats(0, 1, exclude_max=True), st.integers(0, 255)),
    st.tuples(st.just("insert"), st.floats(0, 1), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("delete"), st.floats(0, 1, exclude_max=True), st.integers(1, 64)),
    st.tuples(st.just("truncate"), st.floats(0, 1), st.just(None)),
)


def apply(blob: bytes, ops) -> bytes:
    b = bytearray(blob)
    for kind, where, arg in ops:
        i = int(where * len(b)) if b else 0
        if kind == "set" and b:
            b[min(i, len(b) - 1)] = arg
        elif kind == "insert":
            b[i:i] = arg
        elif kind == "delete":
            del b[i : i + arg]
        elif kind == "truncate":
            del b[i:]
    return bytes(b)


@settings(max_examples=BYTE_EXAMPLES, deadline=None, derandomize=DERANDOMIZE, suppress_health_check=list(HealthCheck))
@given(st.lists(mutation, min_size=1, max_size=6))
def test_byte_mutations(ops):
    check(apply(valid_dyn(), ops))


json_value = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12)
    | st.sampled_from([float("inf"), float("-inf"), float("nan"), 2**64, 2**40, -1, 0, 1.5, "F32", "l1", "linear"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def paths(obj, prefix=()):
    """Every (path) to a value inside nested dicts/lists."""
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from paths(v, prefix + (i,))


@functools.lru_cache(maxsize=1)
def parsed():
    blob = valid_dyn()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + n])
    meta = json.loads(header["__metadata__"][META_KEY])
    return header, meta, blob[8 + n :]


@settings(max_examples=STRUCT_EXAMPLES, deadline=None, derandomize=DERANDOMIZE, suppress_health_check=list(HealthCheck))
@given(st.data())
def test_structure_mutations(data):
    header, meta, payload = json.loads(json.dumps(parsed()[0])), json.loads(json.dumps(parsed()[1])), parsed()[2]
    target = data.draw(st.sampled_from(["header", "meta"]))
    doc = header if target == "header" else meta
    choices = [p for p in paths(doc) if p and not (target == "header" and p[0] == "__metadata__")]
    for _ in range(data.draw(st.integers(1, 3))):
        where = data.draw(st.sampled_from(choices))
        parent = doc
        for key in where[:-1]:
            parent = parent[key]
        if data.draw(st.booleans()) or not isinstance(parent, dict):
            parent[where[-1]] = data.draw(json_value)
        else:
            del parent[where[-1]]
        choices = [p for p in paths(doc) if p and not (target == "header" and p[0] == "__metadata__")] or [("x",)]
    header["__metadata__"] = {META_KEY: json.dumps(meta, allow_nan=True)}
    raw = json.dumps(header, allow_nan=True).encode()
    check(struct.pack("<Q", len(raw)) + raw + payload)


def test_valid_file_passes():
    assert verify_ok(valid_dyn())


def verify_ok(blob: bytes) -> bool:
    (WORK / "ok.dyn").write_bytes(blob)
    return verify(WORK / "ok.dyn")["layers"] == 2
