"""Parameter, FLOP and error accounting for a .dyn file, and its renderings (rich, markdown, JSON).

The JSON keys are documented in ``docs/report.md`` and kept stable; ``build_report`` returns that
same dictionary.

Definitions:
- parameters are ``nn.Module.parameters()`` (buffers such as BatchNorm running statistics are not
  parameters). ``original_params`` counts the original model (every converted layer at its dense
  ``m x n`` weight), ``dyn_params`` the converted model (states, couplings and offsets in place of
  those weights, everything else as it was).
- FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` on one real forward pass (batch 1)
  of the materialized model at the file's input size (1 multiply-add = 2 FLOPs; MACs = FLOPs / 2).
- weight-free FLOPs of a converted layer are counted analytically
  (``dynconvert.dynamics.weightfree.weightfree_flops``); a layer without a weight-free path (``null``) runs
  materialized, so the totals count its dense FLOPs.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from ..budget.pipeline import choice_lines
from .report_budget import BUDGET_COLUMNS, NARROW, budget_rows, budget_title, human, render_budget_rich
from ..dynamics.attention import with_module_calls
from ..dynamics.modules import DynamicsLayer
from ..dynfile.format import STATE_SUFFIXES
from ..errors import DynError, first_line
from ..dynfile.rebuild import materialized, open_converted
from ..dynamics.weightfree import weightfree_flops

REPORT_FORMAT = "dynconvert-report"
REPORT_VERSION = 1


@dataclass
class FlopCount:
    total: int
    per_module: dict[str, int]  # module name (as in named_modules) -> FLOPs inside it
    out_shapes: dict[str, tuple[int, ...]]  # converted layer name -> its output shape


def count_flops(model: nn.Module, input_size: tuple[int, int, int], watch: list[str] = ()) -> FlopCount:
    """FlopCounterMode's count of one batch-1 forward; also records the output shapes of ``watch``."""
    shapes: dict[str, tuple[int, ...]] = {}

    def recorder(name):
        def hook(module, args, out):
            shapes.setdefault(name, tuple(out.shape))  # returns None: the output is left as it is

        return hook

    modules = dict(model.named_modules())  # a converted MHA projection is a parameter again here: no hook
    hooks = [modules[name].register_forward_hook(recorder(name)) for name in watch if name in modules]
    x = torch.zeros(1, *input_size)
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    except RuntimeError as e:
        raise DynError(f"the model does not run at input size {','.join(map(str, input_size))} ({first_line(e)}); pass --input-size C,H,W") from None
    finally:
        for h in hooks:
            h.remove()
    # FlopCounterMode names modules "<RootClass>.<path>"; strip the root to get named_modules() names
    root = type(model).__name__ + "."
    per_module = {
        k[len(root):]: sum(v.values()) for k, v in counter.get_flop_counts().items() if k.startswith(root)
    }
    return FlopCount(counter.get_total_flops(), per_module, shapes)


def _vectors(out_shape: tuple[int, ...]) -> int:
    """Input vectors a layer's matrix multiplies in one forward: batch x output positions."""
    if len(out_shape) == 4:  # conv: N x C x H x W
        return out_shape[0] * out_shape[2] * out_shape[3]
    return math.prod(out_shape[:-1])  # linear: every leading dimension


def build_report(
    source: str | Path | nn.Module,
    *,
    meta: dict | None = None,
    model: nn.Module | None = None,
    factory: str | None = None,
    original: str | Path | None = None,
    trust_pickle: bool = False,
    input_size: tuple[int, int, int] | None = None,
) -> dict:
    """The report of a .dyn file (path), or of a converted module with its ``meta`` (api.dyn_metadata).

    ``model``/``factory``/``original``/``trust_pickle``: as for ``dynconvert.load`` (needed for files
    converted from a factory or a pickled module).
    """
    dyn_bytes = None
    path = None
    if isinstance(source, nn.Module):
        if meta is None:
            raise TypeError("build_report(module) needs meta= (api.dyn_metadata of the conversion)")
        net = source.eval()
    else:
        path = Path(source)
        net, meta = open_converted(path, model=model, factory=factory, original=original, trust_pickle=trust_pickle)
        dyn_bytes = path.stat().st_size
    size = tuple(input_size or meta.get("input_size") or (3, 224, 224))
    if len(size) != 3 or not all(isinstance(v, int) and v > 0 for v in size):
        raise DynError(f"input size {size!r} must be three positive integers C,H,W")

    converted = {n: m for n, m in net.named_modules() if isinstance(m, DynamicsLayer)}
    flops = count_flops(with_module_calls(materialized(net)), size, list(converted))
    layer_meta = meta.get("layers", {})

    layers = []
    for name, layer in converted.items():
        info = layer_meta.get(name, {})
        m, n = layer.matrix_shape
        state_params = sum(getattr(layer, s).numel() for s in STATE_SUFFIXES)
        dense_flops = flops.per_module.get(name, 0)
        wf = weightfree_flops(layer, _vectors(flops.out_shapes[name])) if name in flops.out_shapes else None
        layers.append({
            "name": name,
            "kind": info.get("kind", type(layer).__name__),
            "shape": list(layer.weight_shape),
            "matrix_shape": [m, n],
            "groups": layer.spec.groups,
            "dim": layer.spec.dim,
            "metric": layer.spec.metric,
            "kernel": layer.spec.kernel,
            "dense_params": m * n,
            "state_params": state_params,
            "ratio": state_params / (m * n),
            "weight_rel_error": info.get("rel_error"),
            "svd_rel_error": info.get("svd_rel_error"),
            "svd_rank": info.get("svd_rank"),
            "dense_flops": dense_flops,
            "dense_macs": dense_flops // 2,
            "weightfree_flops": wf,
        })

    dyn_params = sum(p.numel() for p in net.parameters())
    dense_conv = sum(r["dense_params"] for r in layers)
    state_conv = sum(r["state_params"] for r in layers)
    conv_flops = sum(r["dense_flops"] for r in layers)
    wf_total = flops.total - conv_flops + sum(
        r["weightfree_flops"] if r["weightfree_flops"] is not None else r["dense_flops"] for r in layers
    )
    errs = [r["weight_rel_error"] for r in layers if r["weight_rel_error"] is not None]
    svds = [r["svd_rel_error"] for r in layers if r["svd_rel_error"] is not None]
    totals = {
        "original_params": dyn_params - state_conv + dense_conv,
        "dyn_params": dyn_params,
        "converted_dense_params": dense_conv,
        "converted_state_params": state_conv,
        "original_bytes": meta.get("source_bytes"),
        "dyn_bytes": dyn_bytes,
        "dense_flops": flops.total,
        "dense_macs": flops.total // 2,
        "weightfree_flops": wf_total,
        "mean_weight_rel_error": sum(errs) / len(errs) if errs else None,
        "mean_svd_rel_error": sum(svds) / len(svds) if svds else None,
        "converted_layers": len(layers),
        "weightfree_layers": sum(r["weightfree_flops"] is not None for r in layers),
        "skipped_layers": len(meta.get("skipped", [])),
    }
    return {
        "format": REPORT_FORMAT,
        "version": REPORT_VERSION,
        "file": str(path) if path else None,
        "source": meta.get("source"),
        "input_size": list(size),
        "layers": layers,
        "skipped": meta.get("skipped", []),
        "totals": totals,
        "budget": meta.get("budget"),
        "network": meta.get("network"),
        "keep": meta.get("keep"),
    }


# ---------------------------------------------------------------- renderings




def _err(v) -> str:
    return "-" if v is None else f"{v:.4f}"


def _ratio(before, after) -> str:
    return f"{before / after:.2f}x smaller" if before and after else "-"


COLUMNS = ("layer", "shape", "H x d metric", "dense params", "state params", "ratio",
           "weight err", "SVD err", "dense FLOPs", "weight-free FLOPs")


def _row(r: dict) -> list[str]:
    return [
        r["name"], "x".join(map(str, r["shape"])), f"{r['groups']}x{r['dim']} {r['metric']}",
        human(r["dense_params"]), human(r["state_params"]), f"{r['ratio']:.3f}", _err(r["weight_rel_error"]),
        _err(r["svd_rel_error"]), human(r["dense_flops"]), human(r["weightfree_flops"]),
    ]


def summary_lines(rep: dict) -> list[tuple[str, str]]:
    """The figures a user decides on: (label, value) pairs shared by every rendering."""
    t = rep["totals"]
    return [
        ("parameters", f"{t['original_params']:,} -> {t['dyn_params']:,} ({_ratio(t['original_params'], t['dyn_params'])})"),
        ("file bytes", f"{human(t['original_bytes'], 'B')} -> {human(t['dyn_bytes'], 'B')} ({_ratio(t['original_bytes'], t['dyn_bytes'])})"),
        ("FLOPs per image", f"dense {human(t['dense_flops'])} ({human(t['dense_macs'])} MACs) vs weight-free path {human(t['weightfree_flops'])} "
                            f"({t['weightfree_layers']}/{t['converted_layers']} converted layers have one; '-' runs materialized) "
                            f"at input {'x'.join(map(str, rep['input_size']))}"),
        ("mean weight error", f"states {_err(t['mean_weight_rel_error'])} vs truncated SVD {_err(t['mean_svd_rel_error'])} at the same parameter budget"),
        ("layers", f"{t['converted_layers']} converted, {t['skipped_layers']} skipped"),
    ] + _network_lines(rep) + _accuracy_lines(rep)


def _network_lines(rep: dict) -> list[tuple[str, str]]:
    """The network-level probe (budget/probe.py) and what ``--keep`` searched (budget/keep.py)."""
    lines = []
    n = rep.get("network")
    if n:
        lines.append(("network", f"top-1 agreement {n['agreement']:.3f} with the original on {n['images']} probe "
                                 f"images ({n['inputs']})"))
    k = rep.get("keep")
    if k:
        lines.append(("quality target", f"--keep {k['target']:g} {'met' if k['met'] else 'NOT met'}: "
                                        f"{k['reached']:.3f} on {k['probe_images']} probe images ({k['probe']}) at "
                                        f"{k['fraction']:.3f}x the fp32 bytes, chosen from {len(k['trials'])} trials"
                                        + (f" (no trial reached the target; the search aimed at the {k['ceiling']:.3f} every "
                                           "layer at its dearest reached)" if "ceiling" in k else "")
                                        + (f" (the fitted network read {k['close']['reached']:.3f}, within "
                                           f"{k['close']['slack']:g} of the target: not fitted again)"
                                           if "close" in k and not k["met"] else "")))
    return lines


def _accuracy_lines(rep: dict) -> list[tuple[str, str]]:
    acc = rep.get("accuracy")
    if not acc:
        return []
    conv = acc["converted"]
    text = f"converted top-1 {conv['top1']:.4f} top-5 {conv['top5']:.4f}"
    if acc.get("original"):
        orig = acc["original"]
        text = f"original top-1 {orig['top1']:.4f} top-5 {orig['top5']:.4f} vs " + text
    return [("accuracy", f"{text} on {acc['data']} ({conv['n']} images)")]


NARROW_COLUMNS = ("layer", "H x d", "dense -> states", "ratio", "err", "SVD err")


def _narrow_row(r: dict) -> list[str]:
    return [r["name"], f"{r['groups']}x{r['dim']} {r['metric']}", f"{human(r['dense_params'])} -> {human(r['state_params'])}",
            f"{r['ratio']:.3f}", _err(r["weight_rel_error"]), _err(r["svd_rel_error"])]


def render_rich(rep: dict, console) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    if not console.is_terminal and "COLUMNS" not in os.environ:  # files and pipes: every column, unless told a width
        console = Console(file=console.file, width=160, markup=False)
    narrow = console.width < NARROW

    t = rep["totals"]
    title = f"dynconvert report: {rep['file'] or 'model'}"
    if narrow:
        table = Table(title=title, box=box.SIMPLE_HEAD, padding=(0, 1))
        for i, col in enumerate(NARROW_COLUMNS):
            table.add_column(col, justify="left" if i < 2 else "right", overflow="fold")
        for r in rep["layers"]:
            table.add_row(*_narrow_row(r))
        table.add_section()
        table.add_row("total", "", f"{human(t['converted_dense_params'])} -> {human(t['converted_state_params'])}",
                      f"{t['converted_state_params'] / max(t['converted_dense_params'], 1):.3f}",
                      _err(t["mean_weight_rel_error"]), _err(t["mean_svd_rel_error"]), style="bold")
    else:
        table = Table(title=title, show_lines=False)
        for i, col in enumerate(COLUMNS):
            table.add_column(col, justify="left" if i < 3 else "right", no_wrap=i == 0)
        for r in rep["layers"]:
            table.add_row(*_row(r))
        table.add_section()
        table.add_row(
            "total (converted layers)", "", "", human(t["converted_dense_params"]), human(t["converted_state_params"]),
            f"{t['converted_state_params'] / max(t['converted_dense_params'], 1):.3f}", _err(t["mean_weight_rel_error"]),
            _err(t["mean_svd_rel_error"]), "", "", style="bold",
        )
    console.print(table)
    summary = Table(show_header=False, box=None, padding=(0, 2))
    summary.add_column(style="bold", no_wrap=True)
    summary.add_column()
    for label, value in summary_lines(rep):
        summary.add_row(label, value)
    console.print(summary)
    if rep.get("budget"):
        render_budget_rich(rep, console)
    if narrow:
        console.print(f"(narrow terminal, {console.width} columns: shapes and per-layer FLOPs left out; --markdown and --json "
                      "have every column)", highlight=False)


def render_markdown(rep: dict) -> str:
    lines = [f"# dynconvert report: {rep['file'] or 'model'}", ""]
    lines += [f"- **{label}**: {value}" for label, value in summary_lines(rep)]
    if rep.get("budget"):
        lines += ["", f"## {budget_title(rep)}", "", "| " + " | ".join(BUDGET_COLUMNS) + " |",
                  "|" + "|".join("---:" if 3 <= i <= 6 else "---" for i in range(len(BUDGET_COLUMNS))) + "|"]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in budget_rows(rep)]
        lines += [""] + [f"- {line}" for line in choice_lines(rep["budget"])]
    lines += ["", "| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" if i < 3 else "---:" for i in range(len(COLUMNS))) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in _row(r)) + " |" for r in rep["layers"]]
    return "\n".join(lines) + "\n"


def render_json(rep: dict) -> str:
    return json.dumps(rep, indent=2) + "\n"
