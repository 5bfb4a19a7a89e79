"""A budgeted EfficientNet-Lite2 file's agreement with the original, in PyTorch and in ONNX Runtime.

For each .dyn written by ``benchmarks.real_model`` (EfficientNet-Lite2 rows), on the same 512
evaluation crops of held-apart photos (``--eval``, ``--seed`` as that run): top-1 agreement of the
file read back in PyTorch, of its default ONNX export (``dynconvert.export_onnx``, checked in
ONNX Runtime as every export is) run in ONNX Runtime, and the export's bytes on disk.

    python -m benchmarks.onnx_agreement OUT/efficientnet_lite2/dynconvert_1_6.dyn [more .dyn]
"""

from __future__ import annotations

import argparse
import os
from types import SimpleNamespace

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+", help=".dyn files of EfficientNet-Lite2 (benchmarks.real_model rows)")
    ap.add_argument("--eval", type=int, default=512, help="evaluation crops (as the real_model run)")
    ap.add_argument("--seed", type=int, default=0, help="the real_model run's --seed")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import onnxruntime as ort

    import dynconvert
    from benchmarks.real_families import efficientnet_lite2

    family = efficientnet_lite2(SimpleNamespace(calib=1, eval=args.eval, seed=args.seed))
    x = family.eval_x
    with torch.no_grad():
        reference = torch.cat([family.original(b) for b in x.split(32)]).argmax(1)
    for path in args.files:
        net = dynconvert.load(path, model=family.fresh()).eval()
        with torch.no_grad():
            in_torch = torch.cat([net(b) for b in x.split(32)]).argmax(1)
        out = os.path.splitext(path)[0] + ".onnx"
        res = dynconvert.export_onnx(path, out, model=family.fresh(), force=True)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = args.threads
        session = ort.InferenceSession(out, opts, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        in_ort = torch.from_numpy(np.concatenate([session.run(None, {name: b.numpy()})[0] for b in x.split(32)])).argmax(1)
        print(f"{path}: .dyn {os.path.getsize(path):,} B, ONNX {res.bytes:,} B; top-1 agreement with the original "
              f"PyTorch {float((in_torch == reference).float().mean()):.4f}, ONNX Runtime "
              f"{float((in_ort == reference).float().mean()):.4f} ({len(x)} crops)", flush=True)


if __name__ == "__main__":
    main()
