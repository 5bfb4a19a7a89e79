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
    seed: Optional[int] = typer.Option(None, help="Random seed; the same seed gives a byte-identical .dyn. [default: 0]"),
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
def report(
    dyn: Path = typer.Argument(..., help="A .dyn file."),
    markdown: bool = typer.Option(False, "--markdown", help="Print a Markdown table instead of the rich table."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON (keys documented in docs/report.md)."),
    model: Optional[str] = typer.Option(None, help="The package.module:factory the file was converted with (needed for --model conversions)."),
    input_size: Optional[str] = typer.Option(None, help="C,H,W for the FLOP counts. [default: the file's]"),
):
    """Per-layer and total parameters, bytes, FLOPs (dense vs weight-free) and errors vs truncated SVD."""
    from .report import build_report, render_json, render_markdown, render_rich

    if markdown and json_out:
        raise DynError("choose one of --markdown and --json")
    rep = build_report(dyn, factory=model, input_size=_parse_size(input_size) if input_size else None)
    if json_out:
        typer.echo(render_json(rep), nl=False)
    elif markdown:
        typer.echo(render_markdown(rep), nl=False)
    else:
        render_rich(rep, out)


@command
def export(
    dyn: Path = typer.Argument(..., help="A .dyn file."),
    onnx_path: Optional[Path] = typer.Option(None, "--onnx", help="Write a materialized ONNX graph, verified in ONNX Runtime."),
    pth_path: Optional[Path] = typer.Option(None, "--pth", help="Write a plain state dict the original architecture loads."),
    st_path: Optional[Path] = typer.Option(None, "--safetensors", help="Write a compact .dyn with the states at --dtype."),
    dtype: str = typer.Option("fp16", help="State precision for --safetensors: fp16, bf16 or fp32."),
    materialize: Optional[List[str]] = typer.Option(None, help="For --safetensors: glob patterns of converted layers to store as dense weights."),
    opset: int = typer.Option(17, help="ONNX opset version."),
    static_batch: bool = typer.Option(False, "--static-batch", help="Fix the ONNX batch axis to 1 (default: dynamic)."),
    tolerance: float = typer.Option(1e-4, help="Allowed ONNX Runtime max abs diff, relative to the output's max magnitude."),
    model: Optional[str] = typer.Option(None, help="The package.module:factory the file was converted with (needed for --model conversions)."),
    input_size: Optional[str] = typer.Option(None, help="C,H,W of the ONNX input. [default: the file's]"),
    force: bool = typer.Option(False, "--force", help="Overwrite existing outputs."),
):
    """Export for deployment: ONNX (checked against PyTorch), .pth, or a compact fp16 .dyn."""
    from . import export as ex
    from .fileio import check_output_path

    targets = [p for p in (onnx_path, pth_path, st_path) if p is not None]
    if not targets:
        raise DynError("nothing to export: give --onnx, --pth and/or --safetensors")
    for p in targets:  # refuse bad outputs and options before any work
        check_output_path(p, force)
    if st_path is not None and dtype not in ex.DTYPES:
        raise DynError(f"unknown --dtype {dtype!r}; choose one of {', '.join(ex.DTYPES)}")
    if not tolerance >= 0:
        raise DynError(f"--tolerance must be >= 0, got {tolerance}")
    # ONNX first: it is the export that can fail its own check
    if onnx_path is not None:
        res = ex.export_onnx(
            dyn, onnx_path, factory=model, input_size=_parse_size(input_size) if input_size else None, opset=opset,
            dynamic_batch=not static_batch, rel_tolerance=tolerance, force=force,
        )
        out.print(
            f"wrote {onnx_path} (opset {res.opset}, {onnx_path.stat().st_size:,} bytes) in {res.seconds:.1f} s: "
            f"ONNX Runtime vs PyTorch max abs diff {res.max_abs_diff:.3g} "
            f"({res.max_abs_diff / res.output_scale if res.output_scale else 0:.2g} x max |output| {res.output_scale:.3g}; "
            f"allowed {tolerance:g} x)",
            soft_wrap=True,
        )
    if st_path is not None:
        ex.export_safetensors(dyn, st_path, dtype=dtype, materialize_layers=_split(materialize), force=force)
        out.print(f"wrote {st_path} ({st_path.stat().st_size:,} bytes, states in {dtype})")
    if pth_path is not None:
        ex.export_pth(dyn, pth_path, factory=model, force=force)
        out.print(f"wrote {pth_path} ({pth_path.stat().st_size:,} bytes, materialized state dict)")


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
