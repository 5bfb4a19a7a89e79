"""``dynconvert demo``: the whole job on an embedded example, end to end, offline.

LeNet-5 is trained on scikit-learn's handwritten digits upsampled to 32x32 (the paper's MNIST
setting), its conv2 and fully connected layers are converted to dynamics-based states, the states
are fine-tuned (entropy reduction, with the original as teacher), the result is compared with the
truncated SVD of the same parameter budget fine-tuned the same way, and the fine-tuned model is
exported to ONNX and checked in ONNX Runtime. Accuracies are on a held-out test split.
"""

from __future__ import annotations

import contextlib
import copy
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..api import convert, save
from ..io.checkpoint import Source
from ..io.data import digits, preprocess_for
from ..dynamics.modules import dense_matrix, set_submodule
from ..errors import DynError
from ..train.evaluation import evaluate
from ..deploy.export import export_onnx
from ..train.finetune import FinetuneOptions, finetune, finetune_file
from ..dynamics.fit import svd_truncate
from ..dynfile.rebuild import load

FACTORY = "dynconvert.cli.demo:lenet5"
INPUT_SIZE = (1, 32, 32)
# Per-layer state budgets (fraction of the layer's dense weights). The big fc1 is compressed hardest;
# the small layers get more room because they cost little: together about 1/8.8 of the dense weights.
LAYER_RATIOS = {"conv2": 0.5, "fc1": 0.08, "fc2": 0.15, "fc3": 0.5}


def lenet5(num_classes: int = 10) -> nn.Module:
    """LeNet-5 for 1x32x32 inputs (ReLU and max pooling)."""
    return nn.Sequential(
        _named([
            ("conv1", nn.Conv2d(1, 6, 5)), ("relu1", nn.ReLU()), ("pool1", nn.MaxPool2d(2)),
            ("conv2", nn.Conv2d(6, 16, 5)), ("relu2", nn.ReLU()), ("pool2", nn.MaxPool2d(2)),
            ("flatten", nn.Flatten()),
            ("fc1", nn.Linear(400, 120)), ("relu3", nn.ReLU()),
            ("fc2", nn.Linear(120, 84)), ("relu4", nn.ReLU()),
            ("fc3", nn.Linear(84, num_classes)),
        ])
    )


def _named(items):
    from collections import OrderedDict

    return OrderedDict(items)


class LowRank(nn.Module):
    """The equal-budget baseline: a Linear/Conv2d whose weight is the product of two thin SVD factors
    (a ``trainable.Factorized``: fine-tuning trains the factors like states)."""

    def __init__(self, layer: nn.Module, rank: int):
        super().__init__()
        u, v = svd_truncate(dense_matrix(layer).float(), rank)
        self.u, self.v = nn.Parameter(u.contiguous()), nn.Parameter(v.contiguous())
        self.bias = nn.Parameter(layer.bias.detach().clone()) if layer.bias is not None else None
        self.weight_shape = tuple(layer.weight.shape)
        self.conv = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=layer.groups) if isinstance(layer, nn.Conv2d) else None

    def trainable_factors(self) -> list[nn.Parameter]:
        return [self.u, self.v]

    def num_params(self) -> int:
        return self.u.numel() + self.v.numel()

    def forward(self, x):
        w = (self.u @ self.v).reshape(self.weight_shape)
        return F.conv2d(x, w, self.bias, **self.conv) if self.conv else F.linear(x, w, self.bias)


@dataclass
class DemoSettings:
    train_epochs: int = 30
    finetune_epochs: int = 40
    fit_steps: int = 300
    metric: str = "l1"
    seed: int = 0
    finetune: FinetuneOptions | None = None

    def finetune_options(self) -> FinetuneOptions:
        return self.finetune or FinetuneOptions(
            epochs=self.finetune_epochs, batch_size=64, optimizer="adam", lr=1e-2, train="states+bias",
            distill_weight=0.5, temperature=4.0, stop_tol=0.0, checkpoint_every=10**9, seed=self.seed,
        )


def train_original(model: nn.Module, train_set, epochs: int, seed: int) -> None:
    """Plain Adam training with a cosine schedule."""
    x, y = train_set.tensors
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    steps = epochs * ((len(x) + 63) // 64)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), 64):
            b = perm[i:i + 64]
            loss = F.cross_entropy(model(x[b]), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()


@contextlib.contextmanager
def threads(n: int):
    """A tiny model runs fastest on one thread, above all on a shared machine."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def run_demo(out_dir: str | Path | None = None, settings: DemoSettings | None = None, log=print) -> dict:
    """Run the demo; returns the figures printed by ``dynconvert demo --json``."""
    s = settings or DemoSettings()
    start = time.perf_counter()
    keep = out_dir is not None
    with contextlib.ExitStack() as stack:
        stack.enter_context(threads(1))
        if out_dir is None:
            out_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="dynconvert-demo-"))
        out = Path(out_dir)
        if not out.is_dir():
            raise DynError(f"--out-dir {out}: no such folder")
        torch.manual_seed(s.seed)
        data = digits(preprocess_for({"kind": "factory"}, INPUT_SIZE))
        x_test = data.val.tensors[0]

        original = lenet5()
        train_original(original, data.train, s.train_epochs, s.seed)
        torch.save(original.state_dict(), out / "lenet5.pth")
        acc_orig = evaluate(original, data.val)["top1"]
        log(f"original LeNet-5: test accuracy {acc_orig:.4f} ({len(data.train)} train / {len(data.val)} test images)")

        model = copy.deepcopy(original)
        conv = convert(model, include=list(LAYER_RATIOS), layers={n: {"ratio": r} for n, r in LAYER_RATIOS.items()},
                       min_params=0, metric=s.metric, steps=s.fit_steps, seed=s.seed,
                       source=Source("factory", factory=FACTORY), input_size=INPUT_SIZE)
        layers = conv.layers
        dyn_path = out / "lenet5.dyn"
        save(conv, dyn_path)
        acc_conv = evaluate(model, data.val)["top1"]
        dense_p = sum(l.dense_params for l in layers)
        state_p = sum(l.state_params for l in layers)
        log(f"converted {', '.join(l.name for l in layers)}: {dense_p:,} -> {state_p:,} parameters "
            f"({dense_p / state_p:.2f}x), test accuracy before fine-tuning {acc_conv:.4f}")

        opts = s.finetune_options()
        ft_path = out / "lenet5-ft.dyn"
        finetune_file(dyn_path, ft_path, "digits", opts, teacher=out / "lenet5.pth", factory=FACTORY, force=True)
        tuned = load(ft_path, factory=FACTORY)
        acc_ft = evaluate(tuned, data.val)["top1"]
        log(f"fine-tuned states: test accuracy {acc_ft:.4f}")

        svd = copy.deepcopy(original)
        for l in layers:
            set_submodule(svd, l.name, LowRank(svd.get_submodule(l.name), l.svd_rank))
        svd_p = sum(m.num_params() for m in svd.modules() if isinstance(m, LowRank))
        acc_svd0 = evaluate(svd, data.val)["top1"]
        finetune(svd, data, copy.deepcopy(opts), teacher=copy.deepcopy(original).eval())
        acc_svd = evaluate(svd, data.val)["top1"]
        log(f"truncated SVD at the same budget ({svd_p:,} parameters): {acc_svd0:.4f} before, {acc_svd:.4f} after the same fine-tuning")

        onnx = export_onnx(tuned, out / "lenet5-ft.onnx", input_size=tuple(x_test.shape[1:]), force=True)
        diff = onnx.max_abs_diff
        # a temporary folder is gone when the demo ends: name a file only when it is kept
        where = f"wrote {onnx.path}" if keep else "pass --out-dir DIR to keep the files"
        log(f"ONNX Runtime vs PyTorch: max |diff| {diff:.2e} ({where})")

        total_orig = sum(p.numel() for p in original.parameters())
        total_conv = sum(p.numel() for p in tuned.parameters())
        return {
            "original_accuracy": acc_orig,
            "converted_accuracy": acc_conv,
            "finetuned_accuracy": acc_ft,
            "svd_accuracy": acc_svd0,
            "svd_finetuned_accuracy": acc_svd,
            "converted_layers": [l.name for l in layers],
            "converted_layer_dense_params": dense_p,
            "converted_layer_state_params": state_p,
            "svd_params": svd_p,
            "converted_layer_compression": dense_p / state_p,
            "total_params_original": total_orig,
            "total_params_converted": total_conv,
            "total_compression": total_orig / total_conv,
            "onnx_max_abs_diff": diff,
            "test_images": len(x_test),
            "seconds": time.perf_counter() - start,
        }
