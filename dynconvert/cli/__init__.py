"""The command line: parses flags, calls the API, renders with rich. No logic of its own.

Over ~350 lines because it declares every command's flags with their help in one place; each
command's body only checks flags, calls the owning module and prints.
"""

from __future__ import annotations

import functools
import signal
import sys
from dataclasses import fields
from pathlib import Path
from typing import List, Optional

import typer
from typer.core import TyperGroup

try:  # typer >= 0.22 carries its own copy of click
    from typer._click import exceptions as click_errors
except ImportError:  # pragma: no cover
    from click import exceptions as click_errors
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ..dynamics.conversion import ConvertOptions
from .demo import DemoSettings
from ..errors import DynError
from ..train.finetune import FinetuneOptions
from ..version import __version__


class Commands(TyperGroup):
    """Usage errors (a missing argument, an unknown command or option) end in one `error:` line
    and exit 2, like every other error, instead of typer's multi-line box."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        args = _optional_value(list(sys.argv[1:] if args is None else args), "export", "--onnx")
        try:
            rc = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click_errors.NoArgsIsHelpError as e:  # bare `dynconvert`: the help, as before
            typer.echo(e.format_message())
            rc = 0
        except click_errors.UsageError as e:
            where = e.ctx.command_path if e.ctx else "dynconvert"
            if where == "dynconvert" and args[:1] and args[0] in self.commands:  # errors raised while parsing options
                where += f" {args[0]}"
            msg = e.format_message().rstrip(".")
            typer.echo(f"error: {msg[:1].lower() + msg[1:]}; see `{where} --help`", err=True)
            rc = 2
        except click_errors.ClickException as e:
            typer.echo(f"error: {e.format_message()}", err=True)
            rc = e.exit_code
        except typer.Abort:  # end of input while a prompt waited
            typer.echo("error: aborted", err=True)
            rc = 1
        if standalone_mode:
            sys.exit(rc or 0)
        return rc


def _optional_value(args: list[str], command: str, option: str) -> list[str]:
    """Let ``command``'s ``option`` stand without its value (click options cannot): an empty value
    then asks for the default, derived from the input's name."""
    if args[:1] == [command] and option in args:
        i = args.index(option)
        if i + 1 == len(args) or args[i + 1].startswith("-"):
            args.insert(i + 1, "")
    return args


def default(options, name: str):
    """A field's default in an options dataclass: the one source of the CLI's defaults."""
    f = next(f for f in fields(options) if f.name == name)
    return f.default


def shown(options, name: str) -> str:
    """The default, for the --help of a flag that stays None unless given (so that a recipe can fill it)."""
    return f" [default: {default(options, name)}]"


app = typer.Typer(
    cls=Commands,
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


class RichPhaseProgress:
    """One bar per long phase of a budgeted conversion (synthesis, sensitivity, fitting)."""

    def __init__(self, progress: Progress):
        self.progress, self.tasks = progress, {}

    def __call__(self, phase: str, done: int, total: int) -> None:
        if phase not in self.tasks:
            self.tasks[phase] = self.progress.add_task(phase, total=total)
        self.progress.update(self.tasks[phase], completed=done, total=total)


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
    model: Optional[str] = typer.Option(None, help="Your own architecture: package.module:factory returning the nn.Module (the current folder is searched too), or timm:NAME for a timm architecture (the [timm] extra)."),
    recipe: Optional[str] = typer.Option(None, help="Recipe name (resnet18, resnet50, mobilenet_v2, vgg16: recipes/) or a .toml path; flags override its values."),
    ratio: Optional[float] = typer.Option(None, help="State parameters at most RATIO x each converted layer's dense parameters." + shown(ConvertOptions, "ratio")),
    min_params: Optional[int] = typer.Option(None, help="Skip layers with fewer weights." + shown(ConvertOptions, "min_params")),
    include: Optional[List[str]] = typer.Option(None, help="Only convert layers whose name matches these glob patterns."),
    exclude: Optional[List[str]] = typer.Option(None, help="Never convert layers whose name matches these glob patterns."),
    metric: Optional[str] = typer.Option(None, help="Distance between states: l1, l2 or sql2." + shown(ConvertOptions, "metric")),
    kernel: Optional[str] = typer.Option(None, help="Relation kernel phi: linear (t), inverse (1/t) or gauss (exp(-t^2))." + shown(ConvertOptions, "kernel")),
    max_dim: Optional[int] = typer.Option(None, help="Largest state dimension d to consider when --ratio picks H and d." + shown(ConvertOptions, "max_dim")),
    groups: Optional[int] = typer.Option(None, help="Fix the number of sub-model groups H (with --dim) instead of --ratio."),
    dim: Optional[int] = typer.Option(None, help="Fix the state dimension d (with --groups)."),
    steps: Optional[int] = typer.Option(None, help="Fitting steps per layer." + shown(ConvertOptions, "steps")),
    init: Optional[str] = typer.Option(None, help="Start of sql2 fits: svd (the truncated SVD, fast) or random (the authors' uniform [0, 1))." + shown(ConvertOptions, "init")),
    lr: Optional[float] = typer.Option(None, help="Fitting step size." + shown(ConvertOptions, "lr")),
    seed: Optional[int] = typer.Option(None, help="Random seed; the same seed gives a byte-identical .dyn." + shown(ConvertOptions, "seed")),
    device: str = typer.Option(default(ConvertOptions, "device"), help="cpu, cuda or cuda:N."),
    input_size: Optional[str] = typer.Option(None, help="C,H,W used for FLOP counts, recorded in the file. [default: 3,224,224]"),
    calib: Optional[str] = typer.Option(None, help="Calibrated conversion: also fit each layer's outputs on images from this source (an image folder, 'digits', 'fake')."),
    calib_images: Optional[int] = typer.Option(None, help="How many calibration images to use. [default: 256 with --size, else 512]"),
    size: Optional[str] = typer.Option(None, "--size", help="Byte budget as a fraction of the original's fp32 bytes (1/8, 0.125, 12.5%): each layer's representation (states, int8/int4, fp32) is chosen by measured sensitivity. Replaces --ratio."),
    target_bytes: Optional[str] = typer.Option(None, "--target-bytes", help="Byte budget as a size (5MB, 800kB): like --size."),
    data_free: bool = typer.Option(False, "--data-free", help="With --size: no images; calibrate on inputs synthesized from the model's BatchNorm statistics (also what happens without --calib)."),
    calib_steps: Optional[int] = typer.Option(None, help="Output-fitting steps per layer with --calib." + shown(ConvertOptions, "calib_steps")),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help="Allow pickled modules and TorchScript: this RUNS CODE from the file."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing output (and discard an interrupted run's saved layers)."),
    resume: bool = typer.Option(False, "--resume", help="Reuse the layers an interrupted run with the same checkpoint and options finished (kept in OUT.partial/)."),
    threads: Optional[int] = typer.Option(None, "--threads", "--workers", help="CPU threads: layers are fitted THREADS at a time, each in a one-thread worker process; the output is the same for every value. [default: the cores this process may use, at most OMP_NUM_THREADS]"),
):
    """Convert a pretrained checkpoint into dynamics-based states (a .dyn file)."""
    from ..api import convert_checkpoint
    from ..dynamics.workers import using_threads

    rec = None
    if recipe:
        from ..dynamics.recipes import load_recipe

        rec = load_recipe(recipe)
    from ..dynamics.recipes import options_from

    opts = options_from(rec, dict(
        ratio=ratio, min_params=min_params, include=_split(include), exclude=_split(exclude), metric=metric,
        kernel=kernel, max_dim=max_dim, groups=groups, dim=dim, steps=steps, lr=lr, seed=seed, device=device,
        calib_steps=calib_steps, init=init,
    ))
    from ..budget.allocation import parse_bytes, parse_size

    fraction = parse_size(size) if size is not None else None
    budget_bytes = parse_bytes(target_bytes) if target_bytes is not None else None
    if (fraction is not None or budget_bytes is not None) and ratio is not None:
        raise DynError("--size/--target-bytes and --ratio both set how small layers get; give one of them")
    if data_free and fraction is None and budget_bytes is None:
        raise DynError("--data-free needs a byte budget: add --size (e.g. --size 1/6)")
    shape = _parse_size(input_size) if input_size else tuple((rec or {}).get("input_size", (3, 224, 224)))
    try:
        with progress_bar() as progress, using_threads(threads):
            phases = RichPhaseProgress(progress)
            conv = convert_checkpoint(
                checkpoint, out_path, opts, arch=arch or (rec or {}).get("arch"), model=model,
                trust_pickle=trust_pickle, force=force, resume=resume, input_size=shape,
                callbacks=RichConvertProgress(progress), on_note=progress.console.print,
                calib=calib, calib_images=calib_images, size=fraction, target_bytes=budget_bytes, data_free=data_free,
                on_progress=phases,
            )
    except KeyboardInterrupt:
        from ..dynfile.resume import partial_dir

        if partial_dir(out_path).is_dir():
            console.print(f"finished layers are kept in {partial_dir(out_path)}; rerun with --resume to skip them")
        raise
    for s in conv.skipped:  # every layer left as it was, with the reason
        out.print(f"  skipped {s.name}: {s.reason}", highlight=False, soft_wrap=True)
    if conv.budget is not None:
        b = conv.budget
        from collections import Counter

        kinds = Counter({"dyn": "states int8"}.get(row["kind"], row["kind"]) for row in b["layers"])
        split = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
        out.print(
            f"wrote {out_path}: {out_path.stat().st_size:,} bytes for a budget of {b['target_bytes']:,} "
            f"({b['original_bytes'] / out_path.stat().st_size:.2f}x smaller than {b['original_bytes']:,}); "
            f"calibration: {b['calibration']}, {b['calibration_images']} images; layers: {split}. "
            f"`dynconvert report {out_path}` shows the allocation"
        )
        return
    n_dense = sum(s.dense_params for s in conv.layers)
    n_state = sum(s.state_params for s in conv.layers)
    mean_err = sum(s.rel_error for s in conv.layers) / max(len(conv.layers), 1)
    mean_svd = sum(s.svd_rel_error for s in conv.layers) / max(len(conv.layers), 1)
    out.print(
        f"wrote {out_path}: {_plural(len(conv.layers), 'layer')} converted ({len(conv.skipped)} skipped), "
        f"{n_dense:,} -> {n_state:,} parameters in converted layers ({n_dense / max(n_state, 1):.2f}x), "
        f"mean weight error {mean_err:.4f} vs truncated SVD {mean_svd:.4f} at the same budget"
    )


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


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
    data: Optional[str] = typer.Option(None, help="Also measure top-1/top-5 on this dataset (see `eval`)."),
    original: Optional[Path] = typer.Option(None, help="The checkpoint the .dyn was converted from (sha256-checked): needed to rebuild files converted from a pickled module, TorchScript or a module in Python. With --data it is also evaluated side by side."),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help="Allow a pickled/TorchScript --original: this RUNS CODE from the file."),
    latency: bool = typer.Option(False, "--latency", help="Also measure ONNX Runtime latency at batch 1 of each export (see `bench --onnx`)."),
):
    """Per-layer and total parameters, bytes, FLOPs (dense vs weight-free) and errors vs truncated SVD."""
    from ..deploy.report import build_report, render_json, render_markdown, render_rich

    if markdown and json_out:
        raise DynError("choose one of --markdown and --json")
    size = _parse_size(input_size) if input_size else None
    rep = build_report(dyn, factory=model, original=original, trust_pickle=trust_pickle, input_size=size)
    if data is not None:
        from ..train.evaluation import evaluate_file

        kw = dict(factory=model, original=original, trust_pickle=trust_pickle, input_size=tuple(rep["input_size"]))
        rep["accuracy"] = {"data": data, "converted": evaluate_file(dyn, data, **kw)}
        if original is not None:
            rep["accuracy"]["original"] = evaluate_file(original, data, **kw)
    if latency:
        from ..deploy.bench import latency_markdown, onnx_latency
        from ..dynamics.workers import available_cores

        rep["latency"] = onnx_latency(dyn, factory=model, batches=(1,), threads=(available_cores(),))
    if json_out:
        typer.echo(render_json(rep), nl=False)
    elif markdown:
        typer.echo(render_markdown(rep), nl=False)
    else:
        render_rich(rep, out)
    if latency and not json_out:
        typer.echo("\nONNX Runtime latency (batch 1)\n\n" + latency_markdown(rep["latency"]), nl=False)


@command
def export(
    dyn: Path = typer.Argument(..., help="A .dyn file."),
    onnx_arg: Optional[str] = typer.Option(None, "--onnx", show_default=False, help="Write an ONNX graph (materialized weights unless --weight-free), verified in ONNX Runtime; `--onnx` alone writes DYN's name with .onnx."),
    weight_free: bool = typer.Option(False, "--weight-free", help="With --onnx: carry the states and sort orders instead of weight matrices (Gather, CumSum, MatMul)."),
    pth_path: Optional[Path] = typer.Option(None, "--pth", help="Write a plain state dict the original architecture loads."),
    st_path: Optional[Path] = typer.Option(None, "--safetensors", help="Write a compact .dyn with the states at --dtype."),
    dtype: str = typer.Option("fp16", help="State precision for --safetensors: fp16, bf16 or fp32."),
    materialize: Optional[List[str]] = typer.Option(None, help="For --safetensors: glob patterns of converted layers to store as dense weights."),
    opset: int = typer.Option(17, help="ONNX opset version."),
    static_batch: bool = typer.Option(False, "--static-batch", help="Fix the ONNX batch axis to 1 (default: dynamic)."),
    tolerance: float = typer.Option(1e-4, help="Allowed ONNX Runtime max abs diff, relative to the output's max magnitude."),
    model: Optional[str] = typer.Option(None, help="The package.module:factory the file was converted with (needed for --model conversions)."),
    original: Optional[Path] = typer.Option(None, help="The checkpoint the .dyn was converted from (sha256-checked): needed to rebuild files converted from a pickled module, TorchScript or a module in Python."),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help="Allow a pickled/TorchScript --original: this RUNS CODE from the file."),
    input_size: Optional[str] = typer.Option(None, help="C,H,W of the ONNX input. [default: the file's]"),
    force: bool = typer.Option(False, "--force", help="Overwrite existing outputs."),
):
    """Export for deployment: ONNX (checked against PyTorch), .pth, or a compact fp16 .dyn."""
    from ..deploy import export as ex
    from ..io.fileio import check_output_path, expect_dyn

    expect_dyn(dyn)
    onnx_path = None if onnx_arg is None else Path(onnx_arg) if onnx_arg else dyn.with_suffix(".onnx")

    targets = [p for p in (onnx_path, pth_path, st_path) if p is not None]
    if not targets:
        raise DynError("nothing to export: give --onnx, --pth and/or --safetensors")
    for p in targets:  # refuse bad outputs and options before any work
        check_output_path(p, force)
    if st_path is not None and dtype not in ex.DTYPES:
        raise DynError(f"unknown --dtype {dtype!r}; choose one of {', '.join(ex.DTYPES)}")
    if not tolerance >= 0:
        raise DynError(f"--tolerance must be >= 0, got {tolerance}")
    if weight_free and onnx_path is None:
        raise DynError("--weight-free applies to --onnx; give --onnx OUT.onnx")
    # ONNX first: it is the export that can fail its own check
    if onnx_path is not None:
        res = ex.export_onnx(
            dyn, onnx_path, factory=model, original=original, trust_pickle=trust_pickle, input_size=_parse_size(input_size) if input_size else None, opset=opset,
            dynamic_batch=not static_batch, rel_tolerance=tolerance, force=force, weight_free=weight_free,
        )
        for name, reason in res.kept:
            console.print(f"  {name}: materialized in the graph ({reason})")
        out.print(
            f"wrote {onnx_path} ({'weight-free, ' if weight_free else ''}opset {res.opset}, {onnx_path.stat().st_size:,} bytes) in {res.seconds:.1f} s: "
            f"ONNX Runtime vs PyTorch max abs diff {res.max_abs_diff:.3g} "
            f"({res.max_abs_diff / res.output_scale if res.output_scale else 0:.2g} x max |output| {res.output_scale:.3g}; "
            f"allowed {tolerance:g} x)",
            soft_wrap=True,
        )
        if res.output_scale == 0:
            console.print("warning: every output of the model is 0 on the check inputs (a zero-initialized head?), "
                          "so the ONNX Runtime check compared zeros and proves nothing about this graph", soft_wrap=True)
    if st_path is not None:
        ex.export_safetensors(dyn, st_path, dtype=dtype, materialize_layers=_split(materialize), force=force)
        out.print(f"wrote {st_path} ({st_path.stat().st_size:,} bytes, states in {dtype})")
    if pth_path is not None:
        ex.export_pth(dyn, pth_path, factory=model, original=original, trust_pickle=trust_pickle, force=force)
        out.print(f"wrote {pth_path} ({pth_path.stat().st_size:,} bytes, materialized state dict)")


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
    onnx: Optional[Path] = typer.Option(None, "--onnx", help="Instead: time a .dyn's ONNX exports (materialized, factorized, weight-free, int8) in ONNX Runtime at --batches, intra-op threads from --threads, with file bytes."),
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
def verify(
    file: Path = typer.Argument(..., help="A .dyn file."),
    model: Optional[str] = typer.Option(None, help="For files converted with --model: the same package.module:factory, to check the tensors fit it (imports it)."),
    original: Optional[Path] = typer.Option(None, help="The checkpoint the .dyn was converted from (sha256-checked): needed to rebuild files converted from a pickled module, TorchScript or a module in Python. Checks the tensors fit it."),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help="Allow a pickled/TorchScript --original: this RUNS CODE from the file."),
):
    """Check a .dyn file completely: header, metadata, layer shapes, checksum, and that it rebuilds."""
    from ..dynfile.rebuild import verify as verify_file

    info = verify_file(file, factory=model, original=original, trust_pickle=trust_pickle)
    rebuilt = f"rebuilds as {info['rebuilt']}" if info["rebuilt"] else "architecture not rebuilt (needs --model)" \
        if info["source"].get("kind") == "factory" else "architecture not rebuilt (needs --original, the file it was converted from)"
    out.print(
        f"OK {file}: format v{info['format_version']}, {info['layers']} converted layers, {info['tensors']} tensors, "
        f"checksum sha256:{info['tensors_sha256']} verified, {rebuilt}", highlight=False, soft_wrap=True,
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
def finetune(
    dyn: Path = typer.Argument(..., help="The converted model (.dyn) whose states are trained."),
    data: str = typer.Option(..., help="ImageFolder tree (DIR/train + DIR/val, or DIR/<class>/*), a folder of unlabeled images (needs --teacher), 'digits' or 'fake'."),
    out_path: Path = typer.Option(..., "--out", "-o", help="Output .dyn (written atomically at the end)."),
    epochs: int = typer.Option(default(FinetuneOptions, "epochs"), help="Passes over the training images."),
    max_steps: Optional[int] = typer.Option(None, help="Stop after this many optimizer steps."),
    batch_size: int = typer.Option(default(FinetuneOptions, "batch_size"), help="Images per step (per process under torchrun)."),
    lr: float = typer.Option(default(FinetuneOptions, "lr"), help="Step size for the state positions; couplings get a scaled one (see docs/finetune.md)."),
    optimizer: str = typer.Option(default(FinetuneOptions, "optimizer"), help="sgd (damped dynamics: momentum) or adam."),
    momentum: float = typer.Option(default(FinetuneOptions, "momentum"), help="SGD momentum (1 - damping)."),
    weight_decay: float = typer.Option(default(FinetuneOptions, "weight_decay"), help="Weight decay."),
    schedule: str = typer.Option(default(FinetuneOptions, "schedule"), help="Learning-rate schedule: cosine, step (x0.1 at 1/2 and 3/4) or constant."),
    train: str = typer.Option(default(FinetuneOptions, "train"), help="What trains: states (positions, couplings, offsets), states+bias (also biases and norm parameters) or all."),
    clip_grad: float = typer.Option(default(FinetuneOptions, "clip_grad"), help="Clip the gradient norm (0: off)."),
    teacher: Optional[Path] = typer.Option(None, help="The original checkpoint: distill from its logits (KL)."),
    distill_weight: float = typer.Option(default(FinetuneOptions, "distill_weight"), help="With --teacher: weight of the KL term; 1 - it weighs the labels."),
    temperature: float = typer.Option(default(FinetuneOptions, "temperature"), help="Distillation temperature."),
    unlabeled: bool = typer.Option(False, "--unlabeled", help="Ignore the labels (distillation only)."),
    stop_tol: float = typer.Option(default(FinetuneOptions, "stop_tol"), help="Stop early when the states' mean movement per step, over the last 20 steps, falls below this (0: never)."),
    checkpoint_every: int = typer.Option(default(FinetuneOptions, "checkpoint_every"), help="Write a checkpoint every N steps (and after each epoch)."),
    checkpoint: Optional[Path] = typer.Option(None, help="Checkpoint file. [default: OUT.ckpt]"),
    resume: bool = typer.Option(False, "--resume", help="Continue from the checkpoint of an interrupted run."),
    keep_checkpoint: bool = typer.Option(False, "--keep-checkpoint", help="Keep the checkpoint after the output is written."),
    model: Optional[str] = typer.Option(None, help="The package.module:factory the .dyn was converted with (for your own architectures)."),
    original: Optional[Path] = typer.Option(None, help="The checkpoint the .dyn was converted from (sha256-checked): needed to rebuild files converted from a pickled module, TorchScript or a module in Python."),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help="Allow a pickled --teacher/--original: this RUNS CODE from the file."),
    seed: int = typer.Option(default(FinetuneOptions, "seed"), help="Random seed (data order, augmentation)."),
    device: str = typer.Option(default(FinetuneOptions, "device"), help="cpu, cuda or cuda:N (under torchrun: cuda uses each process's LOCAL_RANK)."),
    workers: int = typer.Option(default(FinetuneOptions, "workers"), help="Data-loading worker processes."),
    augment: bool = typer.Option(default(FinetuneOptions, "augment"), help="Random crops and flips on ImageFolder training images."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing output."),
):
    """Fine-tune the states on the task loss (entropy reduction), optionally distilling from the original."""
    import os

    from ..io.fileio import expect_dyn
    from ..train.finetune import finetune_file

    expect_dyn(dyn)

    opts = FinetuneOptions(
        epochs=epochs, max_steps=max_steps, batch_size=batch_size, lr=lr, optimizer=optimizer, momentum=momentum,
        weight_decay=weight_decay, schedule=schedule, train=train, clip_grad=clip_grad or None,
        distill_weight=distill_weight, temperature=temperature, stop_tol=stop_tol, checkpoint_every=checkpoint_every,
        seed=seed, device=device, workers=workers, augment=augment,
    )
    main_rank = int(os.environ.get("RANK", "0")) == 0
    result = finetune_file(
        dyn, out_path, data, opts, teacher=teacher, factory=model, original=original, trust_pickle=trust_pickle, unlabeled=unlabeled,
        resume=resume, checkpoint=checkpoint, force=force, keep_checkpoint=keep_checkpoint, log=_render_log,
    )
    if main_rank:
        out.print(f"wrote {out_path}: {result.steps} steps" + (" (states stabilized: stopped early)" if result.stopped_early else ""), soft_wrap=True)


def _render_log(row: dict) -> None:
    if row["event"] == "resumed":
        out.print(f"resumed from {row['checkpoint']} at step {row['step']} (epoch {row['epoch']})", soft_wrap=True)
    elif row["event"] == "stabilized":
        out.print(f"states stabilized at step {row['step']}: mean movement {row['movement']:.2e} < {row['stop_tol']:.0e}", soft_wrap=True)
    elif row["event"] == "epoch":
        parts = [f"epoch {row['epoch']}/{row['epochs']}", f"step {row['step']}/{row['total_steps']}", f"loss {row['loss']:.4f}"]
        if row.get("train_acc") is not None:
            parts.append(f"train acc {row['train_acc']:.4f}")
        if row.get("val_top1") is not None:
            parts.append(f"val top-1 {row['val_top1']:.4f}")
        parts.append(f"movement {row['movement']:.2e}")
        ent = row.get("structural_entropy") or {}
        if ent:
            parts.append("entropy " + " ".join(f"{k}={v:.4f}" for k, v in ent.items()))
        out.print("  ".join(parts), highlight=False, soft_wrap=True)


@command
def eval(
    path: Path = typer.Argument(..., help="A .dyn, or an original checkpoint (.pth/.pt/.safetensors)."),
    data: str = typer.Option(..., help="ImageFolder tree (its val/ split is used when present), 'digits' (its test split) or 'fake'."),
    original: Optional[Path] = typer.Option(None, help="Also evaluate this original checkpoint and show both side by side; for a .dyn, the file it was converted from (also rebuilds files converted from a pickled module)."),
    model: Optional[str] = typer.Option(None, help="package.module:factory for your own architecture."),
    arch: Optional[str] = typer.Option(None, help="torchvision architecture of an original checkpoint (inferred when omitted)."),
    input_size: Optional[str] = typer.Option(None, help="C,H,W for an original checkpoint's preprocessing. [default: the .dyn's, else 3,224,224]"),
    batch_size: int = typer.Option(256, help="Images per batch."),
    device: str = typer.Option("cpu", help="cpu, cuda or cuda:N."),
    workers: int = typer.Option(0, help="Data-loading worker processes."),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help="Allow pickled checkpoints: this RUNS CODE from the file."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
):
    """Top-1/top-5 accuracy of a .dyn or an original checkpoint on a dataset."""
    import json

    from ..train.evaluation import evaluate_file

    size = _parse_size(input_size) if input_size else None
    if size is None and original is not None and path.suffix == ".dyn":
        from ..dynfile.rebuild import read_meta

        size = tuple(read_meta(path).get("input_size", (3, 224, 224)))
    kw = dict(factory=model, arch=arch, trust_pickle=trust_pickle, input_size=size, batch_size=batch_size, device=device, workers=workers)
    rows = {str(path): evaluate_file(path, data, original=original, **kw)}
    if original is not None:
        rows = {str(original): evaluate_file(original, data, **kw), **rows}
    if json_out:
        out.print_json(json.dumps(rows))
        return
    for name, r in rows.items():
        out.print(f"{name:<40} top-1 {r['top1'] * 100:6.2f}%  top-5 {r['top5'] * 100:6.2f}%  ({r['n']} images)", highlight=False, soft_wrap=True)


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


def main() -> None:
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        app()
    except KeyboardInterrupt:  # a signal landing outside a command (parsing flags, exiting): still exit 130, no traceback
        console.print("[red]interrupted[/red]")
        raise SystemExit(130) from None
    finally:
        # The command has finished (its output is whole or absent); a signal arriving while the
        # interpreter shuts down would only print a traceback from its threading module.
        _ignore_signals_on_the_way_out()


def _ignore_signals_on_the_way_out() -> None:
    """Ignore SIGINT/SIGTERM from here on. A signal can land between these very calls (its handler
    raises in the middle of them): the command is done by then, so that is retried, not reported."""
    while True:
        try:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            return
        except (KeyboardInterrupt, SystemExit):
            continue
