"""Shared set-up for the fine-tuning tests: a briefly trained LeNet-5 and its conversion."""

from __future__ import annotations

from pathlib import Path

import torch

FACTORY = "dynconvert.cli.demo:lenet5"


def lenet_files(folder: Path, train_epochs: int = 2) -> tuple[Path, Path]:
    """(original .pth, converted .dyn) of a LeNet-5 trained briefly on digits."""
    import dynconvert
    from dynconvert.io.checkpoint import Source
    from dynconvert.io.data import digits, preprocess_for
    from dynconvert.cli.demo import INPUT_SIZE, lenet5, threads, train_original

    pth, dyn = folder / "lenet5.pth", folder / "lenet5.dyn"
    if dyn.exists():
        return pth, dyn
    torch.manual_seed(0)
    with threads(1):
        model = lenet5()
        if train_epochs:
            train_original(model, digits(preprocess_for(None, INPUT_SIZE)).train, train_epochs, 0)
        torch.save(model.state_dict(), pth)
        # a rough conversion (random states, as the authors start) that fine-tuning must repair
        conv = dynconvert.convert(model, ratio=0.25, min_params=1000, metric="l1", steps=30, init="random",
                                  source=Source("factory", factory=FACTORY), input_size=INPUT_SIZE)
        dynconvert.save(conv, dyn)
    return pth, dyn
