"""One matrix or three: fit an attention in-projection (q, k, v packed, 3E x E) as one dynamics
layer, or as three E x E layers, at the same total state budget (the default ratio 0.25), and
print the relative weight error of each choice (and truncated SVD's at each choice's rank).

    python -m benchmarks.attention_split [--blocks 2] [--steps 300]

Weights: torchvision ViT-B/16 (random init, nothing can be downloaded) and, with --tiny, a small
ViT trained for a few epochs on sklearn's digits, so that the matrices have learned structure.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from benchmarks.digits import tiny_trained_vit
from dynconvert.dynamics.modules import choose_spec
from dynconvert.dynamics.fit import fit_weight, svd_rel_error


def compare(w: torch.Tensor, steps: int, ratio: float = 0.25) -> dict:
    three_e, e = w.shape
    one = choose_spec(three_e, e, ratio, 4, "sql2", "linear")
    part = choose_spec(e, e, ratio, 4, "sql2", "linear")
    res = {"one_spec": (one.groups, one.dim), "three_spec": (part.groups, part.dim),
           "one_params": one.state_params(three_e, e), "three_params": 3 * part.state_params(e, e)}
    t = time.perf_counter()
    res["one_err"] = fit_weight(w, one, steps=steps).rel_error
    res["one_svd"] = svd_rel_error(w, one.rank_budget)
    sq, sq_svd = 0.0, 0.0
    for q in w.chunk(3):
        f = fit_weight(q, part, steps=steps)
        sq += (f.rel_error * q.norm().item()) ** 2
        sq_svd += (svd_rel_error(q, part.rank_budget) * q.norm().item()) ** 2
    res["three_err"] = math.sqrt(sq) / w.norm().item()
    res["three_svd"] = math.sqrt(sq_svd) / w.norm().item()
    res["seconds"] = time.perf_counter() - t
    return res


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--tiny", action="store_true")
    a = p.parse_args()
    torch.manual_seed(0)
    if a.tiny:
        net, acc = tiny_trained_vit()
        print(f"tiny ViT trained on digits, held-out accuracy {acc:.3f}")
    else:
        from torchvision.models import vit_b_16

        net = vit_b_16()
    blocks = list(net.encoder.layers)[: a.blocks]
    for i, blk in enumerate(blocks):
        r = compare(blk.self_attention.in_proj_weight.detach(), a.steps)
        print(f"block {i}: one {r['one_spec']} {r['one_params']} params err {r['one_err']:.4f} (svd {r['one_svd']:.4f}) | "
              f"three {r['three_spec']} {r['three_params']} params err {r['three_err']:.4f} (svd {r['three_svd']:.4f}) "
              f"[{r['seconds']:.0f} s]", flush=True)


if __name__ == "__main__":
    main()
