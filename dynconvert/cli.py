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
            f"err {stats.rel_error:.4f}  svd {stats.svd_rel_error:.4f}", soft_wrap=True,
        )


def progress_bar() -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[err]}"),
        TimeElapsedColumn(), console=console, transient=True,
        disable=not console.is_terminal,  # a log or pipe gets the per-layer lines, not bar redraws
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
    force: bool = typer.Option(False, "--force", help="Overwrite an existing output (and discard an interrupted run's saved layers)."),
    resume: bool = typer.Option(False, "--resume", help="Reuse the layers an interrupted run with the same checkpoint and options finished (kept in OUT.partial/)."),
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
    try:
        with progress_bar() as progress:
            conv = convert_checkpoint(
                checkpoint, out_path, opts, arch=arch or (rec or {}).get("arch"), model=model,
                trust_pickle=trust_pickle, force=force, resume=resume, input_size=size,
                callbacks=RichConvertProgress(progress), on_note=progress.console.print,
            )
    except KeyboardInterrupt:
        from .resume import partial_dir

        if partial_dir(out_path).is_dir():
            console.print(f"finished layers are kept in {partial_dir(out_path)}; rerun with --resume to skip them")
        raise
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
def verify(
    file: Path = typer.Argument(..., help="A .dyn file."),
    model: Optional[str] = typer.Option(None, help="For files converted with --model: the same package.module:factory, to check the tensors fit it (imports it)."),
):
    """Check a .dyn file completely: header, metadata, layer shapes, checksum, and that it rebuilds."""
    from .api import verify as verify_file

    info = verify_file(file, factory=model)
    rebuilt = f"rebuilds as {info['rebuilt']}" if info["rebuilt"] else "architecture not rebuilt (needs --model)" \
        if info["source"].get("kind") == "factory" else "architecture not rebuilt (converted from a pickled module)"
    out.print(
        f"OK {file}: format v{info['format_version']}, {info['layers']} converted layers, {info['tensors']} tensors, "
        f"checksum sha256:{info['tensors_sha256']} verified, {rebuilt}", highlight=False, soft_wrap=True,
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
    try:
        app()
    except KeyboardInterrupt:  # a signal landing outside a command (parsing flags, exiting): still exit 130, no traceback
        console.print("[red]interrupted[/red]")
        raise SystemExit(130) from None
