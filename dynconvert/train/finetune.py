"""Fine-tuning by entropy reduction: the task loss moves the states (see docs/finetune.md).

The cross-entropy (an entropy) is the potential; its gradient on each state is the stress force,
and heavy-ball SGD (momentum = damping) integrates ``m q'' + gamma q' = -dL/dq``. Adam is an
option. Distillation from the original model (``teacher``) adds, or replaces, the labels with the
KL divergence between softened logits, so unlabeled images are enough to recover accuracy.

Runs under ``torchrun`` with DistributedDataParallel (gloo on CPU, NCCL on GPU); rank 0 alone
logs and writes checkpoints and the output.

This module holds the options, the loop and the file-level command; what trains is trainable.py,
evaluation evaluation.py, the process group distributed.py, resumable snapshots snapshots.py.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Subset
from torch.utils.data.distributed import DistributedSampler

from ..io.checkpoint import load_model
from ..io.data import Data, check_classes, open_data, preprocess_for
from .distributed import all_sum, finish, init_distributed
from ..dynamics.modules import dense_matrix
from ..dynfile.format import write_dyn
from ..errors import DynError, first_line
from .evaluation import batches, evaluate, output_classes
from ..io.fileio import check_output_path, sha256_file
from ..dynamics.fit import rel_error
from ..dynamics.layers import dense_target
from ..budget.quant import round_to_storage
from ..dynfile.rebuild import load_any
from .snapshots import load_checkpoint, save_checkpoint, state_digest
from .trainable import distill_loss, dyn_layers, lr_factor, param_groups, structural_entropy

OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("cosine", "step", "constant")
TRAINABLE = ("states", "states+bias", "all")
TRACE_ENV = "DYNCONVERT_STATE_TRACE"
"""When set to a path prefix, every rank appends ``step sha256`` of its trained parameters to
``<prefix>.rank<R>`` after every step (used to test that DDP ranks stay identical)."""


@dataclass(frozen=True)
class FinetuneOptions:
    """How fine-tuning runs; the one source of the defaults (the CLI only overrides them)."""

    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 64
    lr: float = 0.1
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "cosine"
    train: str = "states"
    clip_grad: float | None = 5.0
    distill_weight: float = 0.5  # used only with a teacher: giving one means distilling from it
    temperature: float = 4.0
    stop_tol: float = 1e-6
    stop_window: int = 20
    checkpoint_every: int = 200
    seed: int = 0
    device: str = "cpu"
    workers: int = 0
    augment: bool = True

    def validate(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise DynError(f"--optimizer {self.optimizer!r}: choose one of {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise DynError(f"--schedule {self.schedule!r}: choose one of {', '.join(SCHEDULES)}")
        if self.train not in TRAINABLE:
            raise DynError(f"--train {self.train!r}: choose one of {', '.join(TRAINABLE)}")
        if self.epochs < 1 or self.batch_size < 1 or (self.max_steps is not None and self.max_steps < 1):
            raise DynError("--epochs, --batch-size and --max-steps must be >= 1")
        if not self.lr > 0 or self.temperature <= 0 or not 0 <= self.distill_weight <= 1:
            raise DynError("--lr and --temperature must be > 0 and --distill-weight in [0, 1]")
        if self.checkpoint_every < 1 or self.stop_window < 1 or self.stop_tol < 0:
            raise DynError("--checkpoint-every and the stop window must be >= 1, --stop-tol >= 0")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise DynError(f"device {self.device!r} was requested but no CUDA device is available; use --device cpu")


@dataclass
class FinetuneResult:
    steps: int
    epochs_done: int
    stopped_early: bool
    resumed_from: int | None
    history: list[dict] = field(default_factory=list)


# ---------------------------------------------------------------- the loop

LogFn = Callable[[dict], None]


def finetune(
    model: nn.Module,
    data: Data,
    opts: FinetuneOptions,
    *,
    teacher: nn.Module | None = None,
    log: LogFn | None = None,
    checkpoint: str | Path | None = None,
    resume: bool = False,
    fingerprint: str = "",
) -> FinetuneResult:
    """Train ``model``'s states in place on ``data.train``; per-epoch logs go to ``log``.

    ``checkpoint``: where periodic checkpoints go (written atomically by rank 0); with ``resume``
    training continues from it. ``fingerprint`` identifies the input so that a checkpoint of
    another run is refused.
    """
    opts.validate()
    if data.train is None or len(data.train) == 0:
        raise DynError(f"--data {data.name} has no training images (expected {data.name}/train/<class>/... or a folder of images)")
    if not data.labeled and teacher is None:
        raise DynError(f"--data {data.name} has no labels; pass --teacher ORIGINAL_CHECKPOINT to distill from the original model")
    distill_weight = 1.0 if not data.labeled else (opts.distill_weight if teacher is not None else 0.0)
    d = init_distributed(opts.device)
    device = torch.device(f"cuda:{d.local_rank}" if opts.device == "cuda" and d.world > 1 else opts.device)
    torch.manual_seed(opts.seed)
    model.to(device)
    if teacher is not None:
        teacher.to(device).eval().requires_grad_(False)
    groups = param_groups(model, opts.optimizer, opts.train)
    trained = [p for g in groups for p in g["params"]]
    # how far the states move decides the early stop; a file without states watches what trains
    positions = [p for g in groups if g["kind"] == "states" for p in g["params"]] or trained
    for g in groups:
        g["lr"] = opts.lr * g["lr_scale"]
    if opts.optimizer == "sgd":
        opt = torch.optim.SGD(groups, lr=opts.lr, momentum=opts.momentum, weight_decay=opts.weight_decay)
    else:
        opt = torch.optim.Adam(groups, lr=opts.lr, weight_decay=opts.weight_decay)

    per_rank = math.ceil(len(data.train) / d.world)
    steps_per_epoch = math.ceil(per_rank / opts.batch_size)
    total = opts.epochs * steps_per_epoch
    if opts.max_steps is not None:
        total = min(total, opts.max_steps)

    step = epoch = epoch_step = 0
    history: list[dict] = []
    moves: list[float] = []
    resumed_from = None
    ckpt_path = Path(checkpoint) if checkpoint else None
    if resume:
        if ckpt_path is None:
            raise DynError("--resume needs a checkpoint path")
        ck = load_checkpoint(ckpt_path)
        if ck.get("fingerprint") != fingerprint:
            raise DynError(f"--resume: {ckpt_path} belongs to another run (different input model); delete it or use the original input")
        try:
            model.load_state_dict(ck["model"])
            opt.load_state_dict(ck["optimizer"])
            step, epoch, epoch_step = int(ck["step"]), int(ck["epoch"]), int(ck["epoch_step"])
            history, moves = list(ck["history"]), list(ck["moves"])
            torch.set_rng_state(ck["rng"])
        except (KeyError, ValueError, RuntimeError, TypeError) as e:
            raise DynError(f"--resume: {ckpt_path} does not fit this run ({first_line(e, 160)}); "
                           "resume with the same --optimizer and --train, or delete it to start over") from None
        resumed_from = step
        if log and d.main:
            log({"event": "resumed", "step": step, "epoch": epoch + 1, "checkpoint": str(ckpt_path)})

    net: nn.Module = model
    if d.world > 1:
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    trace = os.environ.get(TRACE_ENV)

    def write_checkpoint() -> None:
        if ckpt_path is None or not d.main:
            return
        save_checkpoint(ckpt_path, {
            "fingerprint": fingerprint, "step": step, "epoch": epoch, "epoch_step": epoch_step,
            "model": model.state_dict(), "optimizer": opt.state_dict(), "history": history, "moves": moves,
            "rng": torch.get_rng_state(), "options": asdict(opts),
        })

    stopped = False
    while epoch < opts.epochs and step < total and not stopped:
        sampler = DistributedSampler(data.train, num_replicas=d.world, rank=d.rank, shuffle=True, seed=opts.seed)
        sampler.set_epoch(epoch)
        # skipping the batches already done makes a resumed epoch see the same order
        indices = list(sampler)[epoch_step * opts.batch_size:]
        net.train()
        sums = [0.0, 0.0, 0.0, 0.0]  # loss * n, correct, labeled n, n
        for x, y in batches(Subset(data.train, indices), opts.batch_size, opts.workers):
            x, y = x.to(device), y.to(device)
            before = [p.detach().clone() for p in positions]
            out = net(x)
            labeled = y >= 0
            loss = out.new_zeros(())
            if distill_weight < 1 and labeled.any():
                loss = loss + (1 - distill_weight) * F.cross_entropy(out[labeled], y[labeled])
            if distill_weight > 0:
                with torch.no_grad():
                    t_out = teacher(x)
                loss = loss + distill_weight * distill_loss(out, t_out, opts.temperature)
            if not torch.isfinite(loss):
                raise DynError(f"the loss became {float(loss)} at step {step}; lower --lr (or use --optimizer adam)")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if opts.clip_grad:
                torch.nn.utils.clip_grad_norm_(trained, opts.clip_grad)
            for g in opt.param_groups:
                g["lr"] = opts.lr * g["lr_scale"] * lr_factor(step, total, opts.schedule)
            opt.step()
            step += 1
            epoch_step += 1
            with torch.no_grad():
                move = sum(float((p - b).abs().sum()) for p, b in zip(positions, before)) / sum(p.numel() for p in positions)
            moves = (moves + [move])[-opts.stop_window:]
            sums[0] += float(loss.detach()) * len(y)
            sums[1] += float((out.argmax(1) == y).sum())
            sums[2] += float(labeled.sum())
            sums[3] += len(y)
            if trace:
                with open(f"{trace}.rank{d.rank}", "a") as f:
                    f.write(f"{step} {state_digest(trained)}\n")
            if step % opts.checkpoint_every == 0:
                write_checkpoint()
            # near the schedule's end the step size, not the forces, stills the states: not a stop
            if len(moves) == opts.stop_window and sum(moves) / len(moves) < opts.stop_tol and lr_factor(step, total, opts.schedule) > 0.05:
                stopped = True  # all ranks hold identical states, so they stop together
            if step >= total or stopped:
                break
        loss_sum, correct, n_labeled, seen = all_sum(sums, d, device)
        epoch_done = epoch_step >= steps_per_epoch
        row = {
            "event": "epoch", "epoch": epoch + 1, "epochs": opts.epochs, "step": step, "total_steps": total,
            "loss": loss_sum / max(seen, 1),
            "train_acc": correct / n_labeled if n_labeled else None,
            "movement": sum(moves) / max(len(moves), 1),
            "lr": opts.lr * lr_factor(step, total, opts.schedule),
        }
        if d.main:
            if data.val is not None and data.num_classes is not None:
                row["val_top1"] = evaluate(model, data.val, batch_size=max(opts.batch_size, 256), device=device, workers=opts.workers)["top1"]
            row["structural_entropy"] = {n: structural_entropy(m) for n, m in dyn_layers(model).items()}
        history.append(row)
        if epoch_done:
            epoch, epoch_step = epoch + 1, 0
        write_checkpoint()
        if log and d.main:
            log(row)
    if stopped and log and d.main:
        log({"event": "stabilized", "step": step, "movement": sum(moves) / len(moves), "stop_tol": opts.stop_tol})
    model.eval()
    return FinetuneResult(step, epoch, stopped, resumed_from, history)


# ---------------------------------------------------------------- files: what the CLI calls


def finetune_file(
    path: str | Path,
    out: str | Path,
    data: str,
    opts: FinetuneOptions,
    *,
    teacher: str | Path | None = None,
    factory: str | None = None,
    original: str | Path | None = None,
    trust_pickle: bool = False,
    unlabeled: bool = False,
    resume: bool = False,
    checkpoint: str | Path | None = None,
    force: bool = False,
    keep_checkpoint: bool = False,
    log: LogFn | None = None,
) -> FinetuneResult:
    """.dyn -> fine-tuned .dyn: what ``dynconvert finetune`` does. The output is written atomically."""
    opts.validate()
    out = check_output_path(out, force or resume)
    path = Path(path)
    if not path.is_file():
        raise DynError(f"{path}: no such file; give the .dyn written by `dynconvert convert`")
    model, meta, source, size = load_any(path, factory=factory, original=original, trust_pickle=trust_pickle)
    if meta is None:
        raise DynError(f"{path} is not a .dyn file; convert it first with `dynconvert convert`")
    classes = output_classes(model, size)
    d = open_data(data, preprocess_for(source, size), num_classes=classes, augment=opts.augment)
    if unlabeled:
        d = d.unlabeled()
    check_classes(d, classes)
    teacher_model = None
    if teacher is not None:
        src = meta["source"]
        loaded = load_model(teacher, arch=src.get("arch") if src.get("kind") == "torchvision" else None,
                            model=factory if src.get("kind") == "factory" else None, trust_pickle=trust_pickle)
        teacher_model = loaded.model
        if output_classes(teacher_model, size) != classes:
            raise DynError(f"--teacher {teacher} predicts {output_classes(teacher_model, size)} classes but the converted model {classes}; give the original of {path}")
    ckpt = Path(checkpoint) if checkpoint else Path(f"{out}.ckpt")
    result = finetune(model, d, opts, teacher=teacher_model, log=log, checkpoint=ckpt, resume=resume,
                      fingerprint=sha256_file(path))
    if int(os.environ.get("RANK", "0")) == 0:
        last = result.history[-1] if result.history else {}
        new_meta = {k: v for k, v in meta.items() if k not in ("format", "format_version", "dynconvert_version", "tensors_sha256")}
        new_meta["finetune"] = {
            "from_sha256": sha256_file(path), "data": str(data), "labeled": d.labeled,
            "teacher": str(teacher) if teacher else None, "teacher_sha256": sha256_file(teacher) if teacher else None,
            "options": asdict(opts), "steps": result.steps, "stopped_early": result.stopped_early,
            "resumed_from": result.resumed_from, "world_size": int(os.environ.get("WORLD_SIZE", "1")),
            "final": {k: v for k, v in last.items() if k not in ("event",)},
        }
        if teacher_model is not None:  # how far fine-tuning moved each layer from the original weights
            new_meta["finetune"]["rel_error_vs_original"] = {
                name: rel_error(dense_matrix(dense_target(teacher_model, name)), layer.weight_matrix().detach().cpu())
                for name, layer in dyn_layers(model).items()
            }
        # a byte-budgeted file stays at its bytes: what was stored quantized is rounded back onto its grid
        quantized = round_to_storage(model.cpu(), meta.get("quantized") or {})
        write_dyn(out, model.cpu().state_dict(), new_meta, quantized=quantized)
        if not keep_checkpoint:
            ckpt.unlink(missing_ok=True)
    finish()
    return result
