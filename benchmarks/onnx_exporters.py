"""The legacy ONNX exporter with nn.MultiheadAttention's fast path off (what ``export_onnx`` does)
vs the dynamo exporter: ONNX Runtime parity and file size on a random-init torchvision model.

    python -m benchmarks.onnx_exporters vit_b_16      # or swin_t

The dynamo exporter needs ``onnxscript`` (not a dependency of dynconvert); without it that line
says why it failed.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import warnings

import numpy as np
import onnxruntime as ort
import torch
import torchvision

from dynconvert.deploy.export import mha_fastpath_off


def _size(path: str) -> int:
    folder = os.path.dirname(path)
    return os.path.getsize(path) + sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)
                                       if f.endswith(".data"))


def main(arch: str) -> None:
    torch.manual_seed(0)
    net = getattr(torchvision.models, arch)().eval()
    if hasattr(net, "heads"):  # torchvision starts the ViT head at zero: every output would be 0
        torch.nn.init.normal_(net.heads.head.weight, std=0.02)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        want = net(x).numpy()

    def check(path: str) -> str:
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        return f"max abs diff {np.abs(got - want).max():.3g} (max |output| {np.abs(want).max():.3g}), {_size(path):,} bytes"

    warnings.simplefilter("ignore")
    with tempfile.TemporaryDirectory() as tmp:
        legacy, dynamo = os.path.join(tmp, "legacy.onnx"), os.path.join(tmp, "dynamo", "m.onnx")
        os.makedirs(os.path.dirname(dynamo))
        t = time.perf_counter()
        with torch.no_grad(), mha_fastpath_off():
            torch.onnx.export(net, (x,), legacy, dynamo=False, opset_version=17, input_names=["input"])
        print(f"{arch} legacy, fast path off: {time.perf_counter() - t:.1f} s, {check(legacy)}", flush=True)
        t = time.perf_counter()
        try:
            with torch.no_grad():
                torch.onnx.export(net, (x,), dynamo=True, opset_version=18, input_names=["input"]).save(dynamo)
            print(f"{arch} dynamo: {time.perf_counter() - t:.1f} s, {check(dynamo)}")
        except Exception as e:  # noqa: BLE001 - the exporter raises many types; the line says which
            print(f"{arch} dynamo failed: {str(e).splitlines()[0][:200]}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "vit_b_16")
