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

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+", help=".dyn files of EfficientNet-Lite2 (benchmarks.real_model rows)")
    ap.add_argument("--eval", type=int, default=512, help="evaluation crops (as the real_model run)")
    ap.add_argument("--seed", type=int, default=0, help="the real_model run's --seed")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import dynconvert
    from benchmarks.baselines import ort_predictor
    from benchmarks.real_families import efficientnet_lite2, predict_all, torch_predictor
    from benchmarks.real_measure import agreement

    family = efficientnet_lite2(SimpleNamespace(calib=1, eval=args.eval, seed=args.seed))
    x = family.eval_x
    reference = predict_all(torch_predictor(family.original), x, 32)
    for path in args.files:
        in_torch = predict_all(torch_predictor(dynconvert.load(path, model=family.fresh())), x, 32)
        out = os.path.splitext(path)[0] + ".onnx"
        res = dynconvert.export_onnx(path, out, model=family.fresh(), force=True)
        in_ort = predict_all(ort_predictor(out, args.threads), x, 32)
        print(f"{path}: .dyn {os.path.getsize(path):,} B, ONNX {res.bytes:,} B; top-1 agreement with the original "
              f"PyTorch {agreement(in_torch, reference)[0]:.4f}, ONNX Runtime {agreement(in_ort, reference)[0]:.4f} "
              f"({len(x)} crops)", flush=True)


if __name__ == "__main__":
    main()
