"""`dynconvert convert`: its flags, the progress display and the summary line."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ..dynamics.conversion import ConvertOptions
from ..budget.keep import DEFAULT_KEEP
from ..errors import DynError
from . import _parse_size, _plural, _split, command, console, default, out, shown


class RichConvertProgress:
    """Renders conversion progress: one bar over layers, one over the current layer's fit steps."""

    def __init__(self, progress: Progress):
        self.progress = progress
        self.layers = progress.add_task("layers", total=None, err="")
        self.fit = progress.add_task("fit", total=None, err="")

    def layer_start(self, index, total, item):
        self.progress.update(self.layers, total=total, description=item.name, err="")
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
        TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[err]}"),
        TimeElapsedColumn(), console=console, transient=True,
        disable=not console.is_terminal,  # a log or pipe gets the per-layer lines, not bar redraws
    )


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
    input_size: Optional[str] = typer.Option(None, help="C,H,W the model takes (checked with one forward pass before any work), used for FLOP counts and recorded in the file. [default: 3,224,224]"),
    calib: Optional[str] = typer.Option(None, help="Calibrated conversion: also fit each layer's outputs on images from this source (an image folder, 'digits', 'fake')."),
    calib_images: Optional[int] = typer.Option(None, help="How many calibration images to use. [default: 256 with --size, else 512]"),
    size: Optional[str] = typer.Option(None, "--size", help="Byte budget as a fraction of the original's fp32 bytes (1/8, 0.125, 12.5%): each layer's representation (states, int8/int4, fp32) is chosen by measured sensitivity. Replaces --ratio."),
    target_bytes: Optional[str] = typer.Option(None, "--target-bytes", help="Byte budget as a size (5MB, 800kB): like --size."),
    quant_group: Optional[int] = typer.Option(None, "--quant-group", help="With --size or --keep: inputs per fp16 scale of the int4/int3/int2 choices; a layer whose row length it does not divide gets one scale per output channel (said at the end). [default: the divisor of each row's length nearest 64 in 32-128]"),
    data_free: bool = typer.Option(False, "--data-free", help="With --size or --keep: no images; calibrate on inputs synthesized from the model's BatchNorm statistics (also what happens without --calib)."),
    keep: Optional[str] = typer.Option(None, "--keep", help=f"Quality target: the smallest file whose top-1 agreement with the original on probe images (held apart from --calib, else synthesized) is at least KEEP (0.95, 95%). With no mode flag (--ratio, --size, --target-bytes, --groups/--dim, --recipe) and no states flag (--steps, --metric, ...) convert runs --keep {DEFAULT_KEEP:g}."),
    calib_steps: Optional[int] = typer.Option(None, help="Output-fitting steps per layer with --calib." + shown(ConvertOptions, "calib_steps")),
    reconstruct_steps: Optional[int] = typer.Option(None, "--reconstruct-steps", help="With --size or --keep: steps per block of the block-wise reconstruction (learned rounding, QDrop) after the per-layer fit; 0 turns it off. [default: 100 with --calib images, 0 data-free]"),
    no_reconstruct: bool = typer.Option(False, "--no-reconstruct", help="With --size or --keep: skip the block-wise reconstruction (same as --reconstruct-steps 0)."),
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
        calib_steps=calib_steps, init=init, quant_group=quant_group,
    ))
    from ..budget.allocation import parse_bytes, parse_size

    target = _keep_target(keep, dict(ratio=ratio, size=size, target_bytes=target_bytes, groups=groups, dim=dim,
                                     recipe=recipe),
                          dict(steps=steps, metric=metric, kernel=kernel, max_dim=max_dim, init=init, lr=lr,
                               calib_steps=calib_steps, resume=resume or None))
    fraction = parse_size(size) if size is not None else None
    budget_bytes = parse_bytes(target_bytes) if target_bytes is not None else None
    if (fraction is not None or budget_bytes is not None) and ratio is not None:
        raise DynError("--size/--target-bytes and --ratio both set how small layers get; give one of them")
    if data_free and fraction is None and budget_bytes is None and target is None:
        raise DynError("--data-free needs a byte budget or a quality target: add --size (e.g. --size 1/6) or --keep")
    if no_reconstruct and reconstruct_steps:
        raise DynError("--no-reconstruct and --reconstruct-steps contradict each other; give one of them")
    if (no_reconstruct or reconstruct_steps is not None) and fraction is None and budget_bytes is None and target is None:
        raise DynError("block-wise reconstruction follows a byte-budgeted fit: add --size (e.g. --size 1/8) or --keep")
    shape = _parse_size(input_size) if input_size else (3, 224, 224)
    if not input_size and "input_size" in (rec or {}):
        from ..io.data import check_input_size

        shape = check_input_size(rec["input_size"], f"recipe {recipe}: input_size", "fix the recipe")
    try:
        with progress_bar() as progress, using_threads(threads):
            phases = RichPhaseProgress(progress)
            conv = convert_checkpoint(
                checkpoint, out_path, opts, arch=arch or (rec or {}).get("arch"), model=model,
                trust_pickle=trust_pickle, force=force, resume=resume, input_size=shape,
                callbacks=RichConvertProgress(progress), on_note=progress.console.print,
                calib=calib, calib_images=calib_images, size=fraction, target_bytes=budget_bytes, data_free=data_free,
                keep=target, reconstruct=0 if no_reconstruct else reconstruct_steps, on_progress=phases,
            )
    except KeyboardInterrupt:
        from ..dynfile.resume import partial_dir, saved

        if saved(partial_dir(out_path)):
            console.print(f"finished layers are kept in {partial_dir(out_path)}; rerun with --resume to skip them",
                          markup=False, highlight=False)
        raise
    for s in conv.skipped:  # every layer left as it was, with the reason
        out.print(f"  skipped {s.name}: {s.reason}", highlight=False, soft_wrap=True)
    if conv.keep is not None:
        _print_trials(conv.keep, conv.budget["original_bytes"])
    _print_result(conv, out_path)
    if conv.network is not None:
        from ..budget.probe import warning

        n = conv.network
        out.print(f"network: top-1 agreement {n['agreement']:.3f} with the original on {n['images']} probe images "
                  f"({n['inputs']})", highlight=False, soft_wrap=True, markup=False)
        if warning(n):
            console.print(warning(n), highlight=False, soft_wrap=True, markup=False)
    if conv.keep is not None:
        t = conv.keep["seconds"]
        out.print(f"time: inputs {t['inputs']:.1f} s, candidate fitting {t['candidates']:.1f} s, search {t['search']:.1f} s "
                  f"({len(conv.keep['trials'])} trials), sequential fit {t['fitting']:.1f} s"
                  + (f" ({1 + len(conv.keep['refits'])} fits)" if conv.keep["refits"] else "")
                  + f", reconstruction {t['reconstruction']:.1f} s, writing {t['writing']:.1f} s",
                  highlight=False, soft_wrap=True, markup=False)


def _keep_target(keep, modes: dict, states: dict) -> float | None:
    """--keep's value; the default target when no flag chooses a mode; None for the other routes."""
    from ..budget.keep import parse_keep

    given = [f"--{k.replace('_', '-')}" for k, v in modes.items() if v is not None]
    shaping = [f"--{k.replace('_', '-')}" for k, v in states.items() if v is not None]
    if keep is not None:
        target = parse_keep(keep)
        if given:
            raise DynError(f"--keep and {given[0]} each choose how small the file gets; give one of them")
        if shaping:
            raise DynError(f"--keep chooses every layer's representation itself; {shaping[0]} applies to the states "
                           "route (the research route: --ratio, e.g. --ratio 0.25)")
        return target
    return None if given or shaping else DEFAULT_KEEP


def _print_trials(k: dict, original_bytes: int) -> None:
    from ..budget.keep import REFIT_STEP, tradeoff_line

    out.print(f"--keep {k['target']:g}: trials on {k['probe_images']} probe images ({k['probe']})",
              highlight=False, soft_wrap=True, markup=False)
    out.print(f"  {'budget':>14}  {'x fp32':>7}  {'agreement':>9}", highlight=False, markup=False)
    for t in k["trials"]:
        mark = "  <- chosen" if t["budget"] == k["budget_bytes"] else ""
        out.print(f"  {t['budget']:>14,}  {t['fraction']:>7.3f}  {t['agreement']:>9.3f}{mark}", highlight=False, markup=False)
    line = tradeoff_line(k["target"], k["budget_bytes"], original_bytes, k["trials"])
    if line:
        out.print(line, highlight=False, soft_wrap=True, markup=False)
    if not k["met"]:
        if "ceiling" in k:
            why = (f"no budget reaches it on this probe; every layer at its dearest reached {k['ceiling']:.3f}, and this "
                   "is the smallest file whose trial reached that")
        elif "close" in k:
            why = (f"the fitted network read {k['close']['reached']:.3f}, within {k['close']['slack']:g} of it, so it was "
                   f"not fitted again: a refit at {REFIT_STEP:g}x the bytes lands further above the target than this is below")
        elif any(t["agreement"] >= k["target"] for t in k["trials"]):
            why = "the trial at this budget did; the sequential fit moved it"
        else:
            why = "no trial reached it, up to every layer at fp32"
        console.print(f"warning: the target {k['target']:g} was not reached: {k['reached']:.3f} on the probe ({why})",
                      highlight=False, soft_wrap=True, markup=False)


def _print_result(conv, out_path: Path) -> None:
    if conv.budget is not None:
        b = conv.budget
        from ..budget.pipeline import choice_lines

        out.print(
            f"wrote {out_path}: {out_path.stat().st_size:,} bytes for a budget of {b['target_bytes']:,} "
            f"({b['original_bytes'] / out_path.stat().st_size:.2f}x smaller than {b['original_bytes']:,}); "
            f"calibration: {b['calibration']}, {b['calibration_images']} images. "
            f"`dynconvert report {out_path}` shows the allocation", soft_wrap=True,
        )
        for line in choice_lines(b):
            out.print(f"  {line}", highlight=False, soft_wrap=True)
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




