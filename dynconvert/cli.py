"""The command line: parses flags, calls the API, renders with rich. No logic of its own."""

from __future__ import annotations

import functools
import signal
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from . import __version__
from .errors import DynError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Convert pretrained vision models into dynamics-based states (Pei & Wang, ICML 2023), "
    "fine-tune them, report the savings honestly and export for deployment.",
)
console = Console(stderr=True)
out = Console()


def _on_sigterm(signum, frame):
    raise KeyboardInterrupt


def command(fn):
    """Register a CLI command whose user errors and interrupts end in one line and an exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except DynError as e:
            console.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            console.print("[red]interrupted[/red]: no partial output was written (an existing output is untouched)")
            raise typer.Exit(130) from None

    return app.command()(wrapper)



class RichConvertProgress:
    """Renders conversion progress: one bar over layers, one over the current layer's fit steps."""

    def __init__(self, progress: Progress):
        self.progress = progress
        self.layers = progress.add_task("layers", total=None, err="")
        self.fit = progress.add_task("fit", total=None, err="")

    def layer_start(self, index, total, item):
        self.progress.update(self.layers, total=total, description=f"[bold]{item.name}", err="")
        self.progress.reset(self.fit, total=None, description=f"  H={item.spec.groups} d={item.spec.dim} {item.spec.metric}")

    def step(self, step, steps, rel_error):
        self.progress.update(self.fit, total=steps, completed=step, err=f"err {rel_error:.4f}")

    def layer_done(self, index, total, stats, fit):
        self.progress.update(self.layers, completed=index + 1)
        self.progress.console.print(
            f"  {stats.name:<40} {str(tuple(stats.matrix_shape)):>14}  ratio {stats.ratio:.3f}  "
            f"err {stats.rel_error:.4f}  svd {stats.svd_rel_error:.4f}"
        )


def progress_bar() -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[err]}"),
        TimeElapsedColumn(), console=console, transient=True,
    )


def _split(values: Optional[List[str]]) -> list[str]:
    return [p for v in values or [] for p in v.split(",") if p]


@command
def convert(
    checkpoint: Path = typer.Argument(..., help="State dict (.pth/.pt/.safetensors), or with --trust-pickle a pickled module / TorchScript file."),
    out_path: Path = typer.Option(..., "--out", "-o", help="Output .dyn file."),
    arch: Optional[str] = typer.Option(None, help="torchvision architecture (inferred from the keys when omitted)."),
    model: Optional[str] = typer.Option(None, help="Your own architecture: an importable package.module:factory returning the nn.Module."),
    recipe: Optional[str] = typer.Option(None, help="Recipe name (see recipes/) or .toml path; flags override its values."),
    ratio: Optional[float] = typer.Option(None, help="State parameters at most RATIO x each converted layer's dense parameters. [default: 0.25]"),
    min_params: Optional[int] = typer.Option(None, help="Skip layers with fewer weights. [default: 10000]"),
    include: Optional[List[str]] = typer.Option(None, help="Only convert layers whose name matches these glob patterns."),
    exclude: Optional[List[str]] = typer.Option(None, help="Never convert layers whose name matches these glob patterns."),
    metric: Optional[str] = typer.Option(None, help="Distance between states: l1, l2 or sql2. [default: sql2]"),
    kernel: Optional[str] = typer.Option(None, help="Relation kernel phi: linear (t) or inverse (1/t)."),
    max_dim: Optional[int] = typer.Option(None, help="Largest state dimension d to consider when --ratio picks H and d."),
    groups: Optional[int] = typer.Option(None, help="Fix the number of sub-model groups H (with --dim) instead of --ratio."),
    dim: Optional[int] = typer.Option(None, help="Fix the state dimension d (with --groups)."),
    steps: Optional[int] = typer.Option(None, help="Fitting steps per layer."),
    lr: Optional[float] = typer.Option(None, help="Fitting step size."),
    seed: int = typer.Option(0, help="Random seed; the same seed gives a byte-identical .dyn."),
    device: str = typer.Option("cpu", help="cpu, cuda or cuda:N."),
    input_size: Optional[str] = typer.Option(None, help="C,H,W used for FLOP counts, recorded in the file. [default: 3,224,224]"),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help="Allow pickled modules and TorchScript: this RUNS CODE from the file."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing output."),
):
    """Convert a pretrained checkpoint into dynamics-based states (a .dyn file)."""
    from .api import convert_checkpoint

    rec = None
    if recipe:
        from .recipes import load_recipe

        rec = load_recipe(recipe)
    from .recipes import options_from

    opts = options_from(rec, dict(
        ratio=ratio, min_params=min_params, include=_split(include), exclude=_split(exclude), metric=metric,
        kernel=kernel, max_dim=max_dim, groups=groups, dim=dim, steps=steps, lr=lr, seed=seed, device=device,
    ))
    size = _parse_size(input_size) if input_size else tuple((rec or {}).get("input_size", (3, 224, 224)))
    with progress_bar() as progress:
        conv = convert_checkpoint(
            checkpoint, out_path, opts, arch=arch or (rec or {}).get("arch"), model=model,
            trust_pickle=trust_pickle, force=force, input_size=size, callbacks=RichConvertProgress(progress),
            on_note=progress.console.print,
        )
    n_dense = sum(s.dense_params for s in conv.layers)
    n_state = sum(s.state_params for s in conv.layers)
    mean_err = sum(s.rel_error for s in conv.layers) / max(len(conv.layers), 1)
    mean_svd = sum(s.svd_rel_error for s in conv.layers) / max(len(conv.layers), 1)
    out.print(
        f"wrote {out_path}: {len(conv.layers)} layers converted ({len(conv.skipped)} skipped), "
        f"{n_dense:,} -> {n_state:,} parameters in converted layers ({n_dense / max(n_state, 1):.2f}x), "
        f"mean weight error {mean_err:.4f} vs truncated SVD {mean_svd:.4f} at the same budget"
    )


def _parse_size(text: str) -> tuple[int, int, int]:
    try:
        c, h, w = (int(v) for v in text.split(","))
    except ValueError:
        raise DynError(f"--input-size {text!r} must look like 3,224,224") from None
    return c, h, w


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
):
    """Time weight-free inference against the dense layer and truncated SVD at the same budget."""
    import json

    import torch

    from .bench import SQUARE_SIZES, run_bench

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
def export_wf(
    dyn: Path = typer.Argument(..., help="A .dyn file."),
    onnx_path: Path = typer.Option(..., "--onnx", help="Output ONNX graph (states + sort orders, no weight matrices)."),
    opset: int = typer.Option(17, help="ONNX opset version."),
    tolerance: float = typer.Option(1e-4, help="Allowed ONNX Runtime max abs diff, relative to the output's max magnitude."),
    model: Optional[str] = typer.Option(None, help="The package.module:factory the file was converted with (needed for --model conversions)."),
    input_size: Optional[str] = typer.Option(None, help="C,H,W of the ONNX input. [default: the file's]"),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing output."),
):
    """Export a weight-free ONNX graph (Gather, CumSum, MatMul over the states), checked in ONNX Runtime."""
    from .api import build_from
    from .dynfile import read_dyn
    from .fileio import check_output_path
    from .weightfree import export_weight_free_onnx

    check_output_path(onnx_path, force)
    tensors, meta = read_dyn(dyn)
    net = build_from(tensors, meta, factory=model, path=dyn)
    size = _parse_size(input_size) if input_size else tuple(meta.get("input_size") or (3, 224, 224))
    res = export_weight_free_onnx(net, onnx_path, size, opset=opset, rel_tolerance=tolerance, force=force)
    for name, reason in res.kept:
        console.print(f"  {name}: materialized in the graph ({reason})")
    out.print(
        f"wrote {onnx_path} (weight-free, opset {opset}, {onnx_path.stat().st_size:,} bytes) in {res.seconds:.1f} s: "
        f"ONNX Runtime vs PyTorch max abs diff {res.max_abs_diff:.3g} "
        f"({res.max_abs_diff / res.output_scale if res.output_scale else 0:.2g} x max |output| {res.output_scale:.3g}; "
        f"allowed {tolerance:g} x)"
    )


@command
def archs():
    """List the torchvision architectures that can be inferred or named with --arch."""
    from .checkpoint import torchvision_archs

    out.print(" ".join(torchvision_archs()))


@command
def version():
    """Print the dynconvert version."""
    out.print(__version__)


def main() -> None:
    signal.signal(signal.SIGTERM, _on_sigterm)
    app()
