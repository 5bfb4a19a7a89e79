"""`dynconvert report`, `export` and `verify`: the commands that read a .dyn file."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from ..errors import DynError
from . import (_parse_size, _split, command, console, model_option, original_option, out,
               trust_pickle_option)


@command
def report(
    dyn: Path = typer.Argument(..., help="A .dyn file."),
    markdown: bool = typer.Option(False, "--markdown", help="Print a Markdown table instead of the rich table."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON (keys documented in docs/report.md)."),
    model: Optional[str] = model_option(),
    input_size: Optional[str] = typer.Option(None, help="C,H,W for the FLOP counts. [default: the file's]"),
    data: Optional[str] = typer.Option(None, help="Also measure top-1/top-5 on this dataset (see `eval`); with --original, the top-1 agreement with it on these images (labels not needed) replaces the file's probe figure."),
    original: Optional[Path] = original_option(" With --data it is also evaluated side by side."),
    trust_pickle: bool = trust_pickle_option(),
    latency: bool = typer.Option(False, "--latency", help="Also measure ONNX Runtime latency at batch 1 of each export beside the original's (see `bench --onnx`); 'default' is what `export --onnx` writes."),
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
        labeled = True
        if original is not None:
            from ..train.evaluation import agreement_file

            rep["network"], labeled = agreement_file(dyn, data, **kw)
        if labeled:
            rep["accuracy"] = {"data": data, "converted": evaluate_file(dyn, data, **kw)}
            if original is not None:
                rep["accuracy"]["original"] = evaluate_file(original, data, **kw)
    if latency:
        from ..deploy.bench import latency_markdown, onnx_latency
        from ..dynamics.workers import available_cores

        rep["latency"] = onnx_latency(dyn, factory=model, original=original, batches=(1,), threads=(available_cores(),))
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
    onnx_arg: Optional[str] = typer.Option(None, "--onnx", show_default=False, help="Write an ONNX graph, verified in ONNX Runtime; `--onnx` alone writes DYN's name with .onnx. Quantized tensors stay integers (folded to float at session load)."),
    layout: str = typer.Option("auto", "--layout", help="With --onnx: converted layers as materialized (dense weights), factorized (two thin convs/matmuls), weight-free (states: Gather, CumSum, MatMul), or auto (per layer, by a measured ONNX Runtime cost rule)."),
    weight_free: bool = typer.Option(False, "--weight-free", help="With --onnx: the same as --layout weight-free."),
    keep_qdq: bool = typer.Option(False, "--keep-qdq", help="With --onnx: quantized weights as DequantizeLinear (for runtimes with integer kernels; ONNX Runtime's default session runs them on every call)."),
    activations: str = typer.Option("float", "--activations", help="With --onnx: int8 = ONNX Runtime's static QDQ quantization (int8 activations and weights), calibrated on --calib."),
    calib: Optional[str] = typer.Option(None, help="With --activations int8: the images to calibrate on (an image folder, 'digits', 'fake'; the ones the file was converted on)."),
    calib_images: int = typer.Option(256, help="How many --calib images to use."),
    allow_larger: bool = typer.Option(False, "--allow-larger", help="With --onnx: write the graph even when its bytes on disk exceed the file's byte budget."),
    external_data: bool = typer.Option(False, "--external-data", help="With --onnx: the weights in one file beside the graph, OUT.onnx.data (automatic above 1.8 GiB of weights: one ONNX file holds at most 2 GiB)."),
    pth_path: Optional[Path] = typer.Option(None, "--pth", help="Write a plain state dict the original architecture loads."),
    st_path: Optional[Path] = typer.Option(None, "--safetensors", help="Write a compact .dyn with the states at --dtype."),
    dtype: str = typer.Option("fp16", help="State precision for --safetensors: fp16, bf16 or fp32."),
    materialize: Optional[List[str]] = typer.Option(None, help="For --safetensors: glob patterns of converted layers to store as dense weights."),
    opset: int = typer.Option(17, help="ONNX opset version."),
    static_batch: bool = typer.Option(False, "--static-batch", help="Fix the ONNX batch axis to 1 (default: dynamic)."),
    tolerance: float = typer.Option(1e-4, help="Allowed ONNX Runtime max abs diff, relative to the output's max magnitude."),
    model: Optional[str] = model_option(),
    original: Optional[Path] = original_option(),
    trust_pickle: bool = trust_pickle_option(),
    input_size: Optional[str] = typer.Option(None, help="C,H,W of the ONNX input. [default: the file's]"),
    force: bool = typer.Option(False, "--force", help="Overwrite existing outputs."),
):
    """Export for deployment: ONNX (checked against PyTorch), .pth, or a compact fp16 .dyn."""
    from ..deploy import export as ex
    from ..deploy.onnx_files import check_external_data_path
    from ..io.fileio import check_output_path, expect_dyn

    expect_dyn(dyn)
    onnx_path = None if onnx_arg is None else Path(onnx_arg) if onnx_arg else dyn.with_suffix(".onnx")

    targets = [p for p in (onnx_path, pth_path, st_path) if p is not None]
    if not targets:
        raise DynError("nothing to export: give --onnx, --pth and/or --safetensors")
    for p in targets:  # refuse bad outputs and options before any work
        check_output_path(p, force)
    if onnx_path is not None:
        check_external_data_path(onnx_path, force)
    if st_path is not None and dtype not in ex.DTYPES:
        raise DynError(f"unknown --dtype {dtype!r}; choose one of {', '.join(ex.DTYPES)}")
    if not tolerance >= 0:
        raise DynError(f"--tolerance must be >= 0, got {tolerance}")
    if weight_free:
        layout = "weight-free"
    if onnx_path is None and (weight_free or keep_qdq or layout != "auto" or activations != "float" or external_data):
        raise DynError("--layout, --weight-free, --keep-qdq, --activations and --external-data apply to --onnx; "
                       "give --onnx OUT.onnx")
    if activations not in ("float", "int8"):
        raise DynError(f"unknown --activations {activations!r}; choose float or int8")
    if activations == "int8" and not calib:
        raise DynError("--activations int8 needs --calib (images to calibrate the activation ranges on)")
    # ONNX first: it is the export that can fail its own check
    if onnx_path is not None:
        size = _parse_size(input_size) if input_size else None
        images = None
        if activations == "int8":
            from ..dynfile.rebuild import read_meta
            from ..io.data import calibration_batches

            meta = read_meta(dyn)
            images = calibration_batches(calib, meta.get("source"), size or tuple(meta.get("input_size") or (3, 224, 224)), calib_images)
        res = ex.export_onnx(
            dyn, onnx_path, factory=model, original=original, trust_pickle=trust_pickle, input_size=size, opset=opset,
            dynamic_batch=not static_batch, rel_tolerance=tolerance, force=force, layout_name=layout, keep_qdq=keep_qdq,
            activations=activations, calib=images, allow_larger=allow_larger, external_data=external_data,
        )
        counts = {k: list(res.layouts.values()).count(k) for k in dict.fromkeys(res.layouts.values())}
        how = ", ".join(f"{n} {k}" for k, n in counts.items()) or "no converted layers"
        budget = f" (budget {res.budget_bytes:,})" if res.budget_bytes else ""
        data = f" in {res.data_path.name}" if res.data_path else ""
        out.print(
            f"wrote {onnx_path} (layout {layout}: {how}; {len(res.quantized)} integer tensors; opset {res.opset}; "
            f"{res.bytes:,} bytes, weights {res.weight_bytes:,}{budget}{data}) in {res.seconds:.1f} s: "
            f"ONNX Runtime vs PyTorch max abs diff {res.max_abs_diff:.3g} "
            f"({res.max_abs_diff / res.output_scale if res.output_scale else 0:.2g} x max |output| {res.output_scale:.3g}; "
            + ("int8 activations: not held to the tolerance)" if activations == "int8" else f"allowed {tolerance:g} x)"),
            soft_wrap=True,
        )
        # the details after the "wrote" line: the file is complete before anything else is said
        if res.data_path is not None:
            why = "--external-data" if external_data else \
                f"{res.weight_bytes / 2**30:.2f} GiB of weights: one ONNX file holds at most 2 GiB"
            console.print(f"  the weights are in {res.data_path.name} beside the graph ({why}): keep the two files "
                          "together; the bytes above count both", soft_wrap=True, highlight=False)
        for name, reason in res.kept:
            console.print(f"  {name}: materialized in the graph ({reason})")
        if res.default_session_diff is not None and res.default_session_diff > res.tolerance:
            console.print(f"  note: checked with float activations ({'='.join(ex.FLOAT_MATMULNBITS)}); a default ONNX "
                          "Runtime session runs DequantizeLinear + MatMul as MatMulNBits with int8 activations: "
                          f"max abs diff {res.default_session_diff:.3g}", soft_wrap=True, highlight=False)
        for line in dict.fromkeys(res.grew):
            console.print(f"  grew: {line}", soft_wrap=True)
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
def verify(
    file: Path = typer.Argument(..., help="A .dyn file."),
    model: Optional[str] = typer.Option(None, help="For files converted with --model: the same package.module:factory, to check the tensors fit it (imports it)."),
    original: Optional[Path] = original_option(" Checks the tensors fit it."),
    trust_pickle: bool = trust_pickle_option(),
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
