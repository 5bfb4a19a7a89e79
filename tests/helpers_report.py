"""Shared builders for the report/export tests: small real models converted through the CLI."""

import json
import struct
import sys

import torch
import torchvision
from _tiny import TINY_NET

BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


def header(path):
    """The safetensors header of ``path``, read by hand (independent of dynconvert)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


def count_params(shapes: dict) -> int:
    """Parameters (not BatchNorm buffers) among name -> shape."""
    total = 0
    for name, shape in shapes.items():
        if name.rsplit(".", 1)[-1] in BUFFER_SUFFIXES:
            continue
        n = 1
        for s in shape:
            n *= s
        total += n
    return total


def convert_torchvision(cli, tmp, arch, include, size=32, metric="l1", **kw):
    """Random-init torchvision ``arch`` (10 classes) -> .pth -> .dyn with only ``include`` converted."""
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(num_classes=10).eval()
    pth, dyn = tmp / f"{arch}.pth", tmp / f"{arch}.dyn"
    torch.save(model.state_dict(), pth)
    args = ["convert", pth, "--out", dyn, "--steps", "2", "--min-params", "0", "--metric", metric,
            "--input-size", f"3,{size},{size}"]
    for pattern in include:
        args += ["--include", pattern]
    code, _, err = cli(*args)
    assert code == 0, err
    return model, pth, dyn


def convert_tiny(cli, tmp, module_name):
    """The TinyNet factory written into ``tmp`` (on sys.path) -> .pth -> .dyn via --model."""
    (tmp / f"{module_name}.py").write_text(TINY_NET)
    sys.path.insert(0, str(tmp))
    torch.manual_seed(0)
    factory = f"{module_name}:build"
    model = __import__(module_name).build().eval()
    pth, dyn = tmp / "tiny.pth", tmp / "tiny.dyn"
    torch.save(model.state_dict(), pth)
    code, _, err = cli("convert", pth, "--out", dyn, "--model", factory, "--steps", "2", "--min-params", "0",
                       "--include", "features.3", "--include", "head", "--metric", "l1", "--input-size", "3,16,16")
    assert code == 0, err
    return model, pth, dyn, factory


