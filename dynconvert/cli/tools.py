"""`dynconvert bench`, `archs`, `version` and `demo`: tools around the conversion."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..errors import DynError
from ..version import __version__
from . import command, console, default, out
from .demo import DemoSettings


@command
def bench(
    json_out: bool = typer.Option(False, "--json", help="Print the rows as one JSON object instead of a table."),
    quick: bool = typer.Option(False, "--quick", help="A smaller run: sizes 1024 and 4096, 5 repeats."),
    sizes: Optional[str] = typer.Option(None, help="Square layer sizes, comma separated. [default: 1024,2048,4096,8192,16384]"),
    repeats: Optional[int] = typer.Option(None, help="Timed repeats per method (after 3 warm-up calls). [default: 15]"),
    groups: int = typer.Option(4, help="Sub-model groups H of the weight-free layers (SVD rank is H*d)."),
    dim: int = typer.Option(4, help="State dimension d."),
    batches: str = typer.Option("1,32", help="Batch sizes, comma separated."),
    threads: str = typer.Option("1,2", help="CPU thread counts to try; each method keeps its best median."),
    no_resnet50: bool = typer.Option(False, "--no-resnet50", help="Leave out ResNet-50's largest layers (fc, layer4 3x3 conv)."),
    device: Optional[str] = typer.Option(None, help="cpu or cuda. [default: cpu, and cuda when present]"),
    onnx: Optional[Path] = typer.Option(None, "--onnx", help="Instead: time a .dyn's ONNX exports (the file in fp32, the default export, each --layout, and DequantizeLinear kept for quantized files) in ONNX Runtime at --batches, intra-op threads from --threads, with file bytes."),
    model: Optional[str] = typer.Option(None, help="With --onnx: the package.module:factory the file was converted with."),
):
    """Time weight-free inference against the dense layer and truncated SVD at the same budget."""
    import json

    import torch

    from ..deploy.bench import SQUARE_SIZES, latency_markdown, onnx_latency, run_bench

    def ints(text, flag):
        try:
            vals = [int(v) for v in text.split(",") if v.strip()]
        except ValueError:
            vals = []
        if not vals or min(vals) < 1:
            raise DynError(f"{flag} {text!r} must be positive integers separated by commas, e.g. 1,32")
        return vals

    if groups < 1 or dim < 1:
        raise DynError("--groups and --dim must be >= 1")
    if device and device.startswith("cuda") and not torch.cuda.is_available():
        raise DynError(f"--device {device} was requested but no CUDA device is available; use --device cpu")
    size_list = ints(sizes, "--sizes") if sizes else ([1024, 4096] if quick else list(SQUARE_SIZES))
    reps = repeats if repeats is not None else (5 if quick else 15)
    if reps < 1:
        raise DynError("--repeats must be >= 1")
    if onnx is not None:
        res = onnx_latency(onnx, factory=model, batches=ints(batches, "--batches"), threads=ints(threads, "--threads"),
                           repeats=repeats or 10, on_row=None if json_out else (lambda r: console.print(f"  {r['export']}: done")))
        typer.echo(json.dumps(res, indent=1) if json_out else latency_markdown(res), nl=not json_out)
        return
    on_row = None if json_out else (lambda r: console.print(f"  {r['layer']} batch {r['batch']} {r['device']}: done"))
    res = run_bench(
        sizes=size_list, batches=ints(batches, "--batches"), devices=[device] if device else None, groups=groups,
        dim=dim, repeats=reps, resnet50=not no_resnet50, threads=ints(threads, "--threads"), on_row=on_row,
    )
    if json_out:
        out.print_json(json.dumps(res))
        return
    from rich.table import Table

    def ms(r, k):
        lo, hi = r[f"{k}_spread_ms"]
        return f"{r[f'{k}_ms']:.3g} \\[{lo:.3g}-{hi:.3g}]"

    table = Table(title=f"H={groups}, d={dim} (H*d={groups * dim}); ms: median \\[min-max] of {reps}; threads {threads}")
    for col in ("m x n", "batch", "dev", "dense ms", "SVD ms", "L1 wf ms", "sql2 wf ms", "dense/L1", "dense/sql2",
                "sql2/SVD", "L1 peak MiB", "dense W MiB"):
        table.add_column(col, justify="right")
    for r in res["rows"]:
        table.add_row(
            f"{r['m']}x{r['n']}", str(r["batch"]), r["device"], ms(r, "dense"), ms(r, "svd"), ms(r, "weightfree"),
            ms(r, "sql2"), f"{r['dense_ms'] / r['weightfree_ms']:.1f}x", f"{r['dense_ms'] / r['sql2_ms']:.1f}x",
            f"{r['sql2_ms'] / r['svd_ms']:.2f}", f"{r['weightfree_peak_bytes'] / 2**20:.1f}", f"{r['dense_matrix_bytes'] / 2**20:.0f}",
        )
    from rich.console import Console

    Console(width=max(out.width, 200)).print(table)
    out.print(f"load average before/after: {res['loadavg_before']} / {res['loadavg_after']} on {res['cpu_count']} CPUs")
    one = [r for r in res["rows"] if r["batch"] == 1 and r["weightfree_largest_bytes"] >= 0]
    if one:
        under = all(r["weightfree_peak_bytes"] < r["dense_matrix_bytes"] for r in one)
        out.print(
            "L1 peak: bytes of live tensors one weight-free forward allocates (scratch buffer included; inputs and "
            f"tables not). At batch 1 it stays below the layer's dense matrix on every CPU row: {'yes' if under else 'NO'}. "
            "It grows with the batch: about 4 x batch x H*d x (n+m) floats."
        )


@command
def archs():
    """List the torchvision architectures that can be inferred or named with --arch."""
    from ..io.checkpoint import torchvision_archs

    out.print(" ".join(torchvision_archs()))


@command
def version():
    """Print the dynconvert version."""
    out.print(__version__)


@command
def demo(
    json_out: bool = typer.Option(False, "--json", help="End with one JSON line of the figures."),
    out_dir: Optional[Path] = typer.Option(None, help="Keep the files (lenet5.pth, .dyn, fine-tuned .dyn, .onnx) in this folder."),
    finetune_epochs: int = typer.Option(default(DemoSettings, "finetune_epochs"), help="Fine-tuning epochs (for both the states and the SVD baseline)."),
    train_epochs: int = typer.Option(default(DemoSettings, "train_epochs"), help="Epochs to train the original LeNet-5."),
    fit_steps: int = typer.Option(default(DemoSettings, "fit_steps"), help="State-fitting steps per converted layer."),
    seed: int = typer.Option(default(DemoSettings, "seed"), help="Random seed."),
):
    """Train LeNet-5 on digits, convert conv2 + FC layers, fine-tune, compare with SVD, export to ONNX."""
    import json

    from .demo import run_demo

    r = run_demo(out_dir, DemoSettings(train_epochs=train_epochs, finetune_epochs=finetune_epochs, fit_steps=fit_steps, seed=seed), log=lambda m: console.print(m, highlight=False, soft_wrap=True))
    out.print(
        f"LeNet-5 on digits ({r['test_images']} held-out test images), {r['converted_layer_compression']:.2f}x fewer parameters "
        f"in converted layers ({r['total_compression']:.2f}x overall):\n"
        f"  original {r['original_accuracy'] * 100:.2f}%  converted {r['converted_accuracy'] * 100:.2f}%  "
        f"fine-tuned {r['finetuned_accuracy'] * 100:.2f}%  |  truncated SVD same budget, same fine-tuning "
        f"{r['svd_finetuned_accuracy'] * 100:.2f}%\n  ONNX Runtime max |diff| {r['onnx_max_abs_diff']:.1e}  in {r['seconds']:.1f} s",
        highlight=False, soft_wrap=True,
    )
    if json_out:
        print(json.dumps(r), flush=True)
