"""Top-1/top-5 evaluation: shared by `eval`, `report --data`, fine-tuning's per-epoch check and the demo."""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from ..io.data import check_classes, open_data, preprocess_for, probe_forward
from ..errors import DynError
from ..dynfile.rebuild import load_any


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, *, batch_size: int = 256, device="cpu", workers: int = 0) -> dict:
    """Top-1 and top-5 accuracy (fractions) of ``model`` on a labeled dataset."""
    was_training = model.training
    model.eval()
    correct1 = correct5 = total = 0
    for x, y in batches(dataset, batch_size, workers):
        x, y = x.to(device), y.to(device)
        if (y < 0).any():
            raise DynError("evaluation needs labeled images; this data has none (use an ImageFolder tree with class subfolders)")
        out = model(x)
        top = out.topk(min(5, out.shape[-1]), dim=1).indices
        correct1 += int((top[:, 0] == y).sum())
        correct5 += int((top == y[:, None]).any(1).sum())
        total += len(y)
    model.train(was_training)
    if total == 0:
        raise DynError("the evaluation set is empty")
    return {"top1": correct1 / total, "top5": correct5 / total, "n": total}


def batches(dataset: Dataset, batch_size: int, workers: int):
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)
    try:
        yield from loader
    except DynError as e:  # raised in a worker: keep only its one-line message
        raise DynError(str(e).strip().splitlines()[-1].split("DynError: ", 1)[-1]) from None


def output_classes(model: nn.Module, input_size) -> int:
    """How many logits the model produces (one dummy forward)."""
    with torch.no_grad():
        was = model.training
        out = model.eval()(torch.zeros(1, *input_size, device=next(model.parameters()).device))
        model.train(was)
    return int(out.shape[-1])


def evaluate_file(path, data: str, *, factory=None, arch=None, original=None, trust_pickle=False, input_size=None,
                  batch_size: int = 256, device: str = "cpu", workers: int = 0) -> dict:
    """Top-1/top-5 of a .dyn or an original checkpoint on ``data`` (its val split, or the test split)."""
    model, _, source, size = load_any(path, factory=factory, arch=arch, original=original, trust_pickle=trust_pickle,
                                      input_size=input_size)
    probe_forward(model, size)
    d = open_data(data, preprocess_for(source, size), num_classes=output_classes(model, size))
    if not d.labeled:
        raise DynError(f"--data {data} has no labels; evaluation needs class subfolders ({data}/<class>/<image>)")
    check_classes(d, output_classes(model, size))
    dataset = d.val if d.val is not None else d.train
    return evaluate(model.to(device), dataset, batch_size=batch_size, device=device, workers=workers)


@torch.no_grad()
def agreement_file(path, data: str, *, original, factory=None, trust_pickle=False, input_size=None,
                   batch_size: int = 64, workers: int = 0) -> tuple[dict, bool]:
    """(top-1 agreement of a .dyn with the checkpoint it was converted from on ``data``'s images,
    labels not needed; whether ``data`` has labels): what ``report --data --original`` puts in
    place of the file's own probe (budget/probe.py)."""
    model, _, source, size = load_any(path, factory=factory, original=original, trust_pickle=trust_pickle,
                                      input_size=input_size)
    reference = load_any(original, factory=factory, trust_pickle=trust_pickle, input_size=size)[0]
    d = open_data(data, preprocess_for(source, size), augment=False)
    dataset = d.val if d.val is not None else d.train
    model.eval()
    reference.eval()
    same = total = 0
    for item in batches(dataset, batch_size, workers):
        x = item[0] if isinstance(item, (tuple, list)) else item
        same += int((model(x).argmax(1) == reference(x).argmax(1)).sum())
        total += len(x)
    if total == 0:
        raise DynError(f"--data {data}: no images to compare on")
    return {"agreement": round(same / total, 4), "images": total, "inputs": f"images from {data}"}, bool(d.labeled)
