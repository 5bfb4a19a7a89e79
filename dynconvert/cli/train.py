"""`dynconvert finetune` and `eval`: training the states and measuring accuracy."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..train.finetune import FinetuneOptions
from . import _parse_size, command, default, original_option, out


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
    original: Optional[Path] = original_option(),
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
