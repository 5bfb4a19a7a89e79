"""What every row builder of the real-model benchmark returns (``Built``: the file whose bytes
count and a predictor of the model read back from it), and the helpers the builders share."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from benchmarks.real_families import Bench, torch_predictor


@dataclass
class Built:
    path: Path                                          # the file whose bytes count
    predict: Callable[[torch.Tensor], torch.Tensor]     # logits of the model read back from it
    extra: dict = field(default_factory=dict)


def dyn_read_back(bench: Bench, conv, path: Path) -> Built:
    import dynconvert

    dynconvert.save(conv, path)
    net = dynconvert.load(path, model=bench.family.fresh())
    return Built(path, torch_predictor(net))


def progress_printer(what: str):
    """Prints each phase of a long conversion at every 10% (the run is long; silence looks like a hang)."""
    start = time.perf_counter()

    def show(phase: str, done: int, total: int) -> None:
        if done == total or done % max(1, total // 10) == 0:
            print(f"  {what}: {phase} {done}/{total} ({time.perf_counter() - start:.0f} s)", flush=True)

    return show
