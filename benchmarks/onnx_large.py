"""An ONNX export over protobuf's 2 GiB: a torchvision model (random init, head N(0, 0.02)) through
dynconvert's export_onnx, which keeps the weights in one `<out>.data` file beside the graph, then
onnx.checker and ONNX Runtime against PyTorch, as for every export. Prints the bytes of both files,
the difference, the time and this process's peak resident memory.

    python -m benchmarks.onnx_large                       # ViT-H/14, 632M parameters, 2.35 GiB fp32
    python -m benchmarks.onnx_large --model vit_l_16 --external-data   # under 2 GiB: forced
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path

import torch
import torchvision

from dynconvert.deploy.export import export_onnx


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vit_h_14", help="a torchvision.models builder (default vit_h_14)")
    ap.add_argument("--external-data", action="store_true", help="external data even under the threshold")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, help="where to write MODEL.onnx (default: a temporary folder, removed)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    net = getattr(torchvision.models, args.model)().eval()
    head = getattr(getattr(net, "heads", None), "head", None)
    if head is not None:  # torchvision zero-initializes a ViT head: every input would get the same output
        torch.nn.init.normal_(head.weight, std=0.02)
    n = sum(p.numel() for p in net.parameters())
    print(f"{args.model}: {n:,} parameters, {4 * n / 2**30:.2f} GiB fp32; load average {os.getloadavg()[0]:.2f}", flush=True)
    with tempfile.TemporaryDirectory(dir=args.out) as folder:
        out = Path(folder) / f"{args.model}.onnx"
        start = time.perf_counter()
        res = export_onnx(net, out, input_size=(3, 224, 224), external_data=args.external_data)
        seconds = time.perf_counter() - start
        where = f"graph {out.stat().st_size:,} + {res.data_path.name} {res.data_path.stat().st_size:,}" if res.data_path \
            else "one file"
        print(f"{res.bytes:,} bytes on disk ({where}), weights {res.weight_bytes:,}; ONNX Runtime vs PyTorch max abs "
              f"diff {res.max_abs_diff:.3g} of max |output| {res.output_scale:.3g} (allowed {res.tolerance:.3g}); "
              f"{seconds:.0f} s; peak resident memory {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB "
              f"({resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / (4 * n):.1f}x the fp32 bytes); "
              f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
